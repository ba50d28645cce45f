"""A herald backend for the JavaScript client's tests, over Python grpcio
stubs generated at run time from proto/ (`python -m grpc_tools.protoc`).

With --serve it serves calls (ServeCalls) for these methods:
  echo.reverse   answers the data reversed: text as text, bytes as bytes;
  math.add       reads {"a": A, "b": B} (JSON text) and answers A + B as text;
  refuse.always  refuses with code 422 and the message "the backend says no";
  refuse.oddly   refuses with code 7, outside the codes clients may see;
  never.answers  never answers.
With --consume GROUP it consumes the connection events of GROUP
(ConsumeEvents), acknowledging each.

It speaks JSON lines on its standard output: {"ready": true} once it serves
and consumes; then {"call": {"method", "connection", "user_id",
"timeout_ms"}} for each call and {"event": {"kind", "connection", "user_id",
"content"}} for each event, where connection is {"worker_id",
"connection_id"} and content {"text": T} or {"binary": BASE64}. It runs until
its standard input closes or it is killed.

Usage: backend.py --proto DIR --broker HOST:PORT [--serve] [--consume GROUP]
"""

import argparse
import base64
import importlib
import json
import queue
import subprocess
import sys
import tempfile
import threading

import grpc

PATIENCE = 10.0
lock = threading.Lock()


def say(value):
    with lock:
        print(json.dumps(value), flush=True)


def generate_stubs(proto, out_dir):
    """Runs protoc on herald/v1/broker.proto; returns (messages, services)."""
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "herald/v1/broker.proto",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"protoc failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    sys.path.insert(0, out_dir)
    return (
        importlib.import_module("herald.v1.broker_pb2"),
        importlib.import_module("herald.v1.broker_pb2_grpc"),
    )


def address(connection):
    return {"worker_id": connection.worker_id, "connection_id": connection.connection_id}


def content(value):
    if value.WhichOneof("body") == "binary":
        return {"binary": base64.b64encode(value.binary).decode()}
    return {"text": value.text}


def answer(pb, call):
    """The answer to a call, or None for no answer."""
    data = call.call.data
    method = call.call.method
    if method == "echo.reverse":
        if data.WhichOneof("body") == "binary":
            return pb.CallAnswer(call_id=call.call_id, data=pb.Content(binary=data.binary[::-1]))
        return pb.CallAnswer(call_id=call.call_id, data=pb.Content(text=data.text[::-1]))
    if method == "math.add":
        numbers = json.loads(data.text)
        return pb.CallAnswer(call_id=call.call_id, data=pb.Content(text=str(numbers["a"] + numbers["b"])))
    if method == "refuse.always":
        return pb.CallAnswer(call_id=call.call_id, error=pb.CallError(code=422, message="the backend says no"))
    if method == "refuse.oddly":
        return pb.CallAnswer(call_id=call.call_id, error=pb.CallError(code=7, message="an odd code"))
    return None


METHODS = ["echo.reverse", "math.add", "refuse.always", "refuse.oddly", "never.answers"]


def serve(pb, stub):
    """Starts serving the calls; returns once the broker took the backend on."""
    requests = queue.Queue()
    requests.put(pb.ServeCallsRequest(start=pb.ServeCallsStart(methods=METHODS)))
    calls = stub.ServeCalls(iter(requests.get, None))
    # The broker answers with headers once the backend is registered.
    calls.initial_metadata()

    def run():
        try:
            for call in calls:
                say(
                    {
                        "call": {
                            "method": call.call.method,
                            "connection": address(call.call.connection),
                            "user_id": call.call.user_id,
                            "timeout_ms": call.call.timeout_ms,
                        }
                    }
                )
                reply = answer(pb, call)
                if reply is not None:
                    requests.put(pb.ServeCallsRequest(answer=reply))
        except grpc.RpcError as error:
            print(f"backend: ServeCalls ended: {error.code()} {error.details()}", file=sys.stderr, flush=True)

    threading.Thread(target=run, daemon=True).start()


def consume(pb, stub, group):
    """Starts consuming the group's events; returns once attached."""
    batches = stub.ConsumeEvents(pb.ConsumeEventsRequest(group=group))
    batches.initial_metadata()

    def run():
        try:
            for batch in batches:
                for consumed in batch.events:
                    event = consumed.event
                    kind = event.WhichOneof("kind")
                    said = {"kind": kind, "connection": address(event.connection), "user_id": event.user_id}
                    if kind == "message":
                        said["content"] = content(event.message.content)
                    say({"event": said})
                ack_ids = [consumed.ack_id for consumed in batch.events]
                stub.AckEvents(pb.AckEventsRequest(group=group, ack_ids=ack_ids), timeout=PATIENCE)
        except grpc.RpcError as error:
            print(f"backend: ConsumeEvents ended: {error.code()} {error.details()}", file=sys.stderr, flush=True)

    threading.Thread(target=run, daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proto", required=True, help="the directory holding herald/v1/broker.proto")
    parser.add_argument("--broker", required=True, help="the broker's address, host:port")
    parser.add_argument("--serve", action="store_true", help="serve the calls")
    parser.add_argument("--consume", metavar="GROUP", help="consume this group's events")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="herald-js-backend-") as out_dir:
        pb, pb_grpc = generate_stubs(args.proto, out_dir)
    channel = grpc.insecure_channel(args.broker)
    grpc.channel_ready_future(channel).result(timeout=PATIENCE)
    stub = pb_grpc.BrokerServiceStub(channel)
    if args.serve:
        serve(pb, stub)
    if args.consume:
        consume(pb, stub, args.consume)
    say({"ready": True})
    # Until the test is done with it.
    sys.stdin.read()


if __name__ == "__main__":
    main()

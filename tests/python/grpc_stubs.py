"""Drives a herald broker through Python grpcio stubs generated from proto/.

The stubs are generated at run time, into a temporary directory, with
`python -m grpc_tools.protoc`, exactly as a service using herald would.

The broker must have exactly one WebSocket gateway linked to it, with one
anonymous client connected at --worker-id/--connection-id. Besides its own
checks, this script publishes, in this order, what that client must receive:
"py-broadcast", "batch-1" (both broadcasts) and "hello from python grpcio"
(to the client alone).

Besides a plain listener, the script plays a WebSocket gateway of its own over
a raw Subscribe stream: it claims a worker id, reports its connections "7",
"8" and "9" in a DirectoryReport (a broker refuses a publish to a connection
it was not told about), and carries out the Control the broker hands it,
confirming it with a ControlDone. Query then sees what the control changed.

Usage: grpc_stubs.py --broker HOST:PORT --worker-id W --connection-id C
Exits non-zero, saying what differed, on any mismatch.
"""

import argparse
import importlib
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[2]
PATIENCE = 10.0
QUIET = 0.3


def step(text):
    print(f"- {text}", flush=True)


def generate_stubs(out_dir):
    """Runs protoc on proto/herald/v1/broker.proto; returns (messages, services)."""
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{REPO / 'proto'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "herald/v1/broker.proto",
    ]
    step("generating stubs: " + " ".join(command[1:]))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"protoc failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    sys.path.insert(0, str(out_dir))
    return (
        importlib.import_module("herald.v1.broker_pb2"),
        importlib.import_module("herald.v1.broker_pb2_grpc"),
    )


class Session:
    """One Subscribe stream: commands go in through a queue, and a reader
    thread hands every response (or the error that ended the stream) back."""

    END = object()

    def __init__(self, stub, name):
        self.name = name
        self._commands = queue.Queue()
        self._responses = queue.Queue()
        self._call = stub.Subscribe(iter(self._commands.get, self.END))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(None)
        except grpc.RpcError as error:
            self._responses.put(error)

    def send(self, request):
        self._commands.put(request)

    def next(self, what):
        try:
            item = self._responses.get(timeout=PATIENCE)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no {what} within {PATIENCE}s") from None
        assert not isinstance(item, grpc.RpcError), f"{self.name}: stream failed while waiting for {what}: {item}"
        assert item is not None, f"{self.name}: stream ended while waiting for {what}"
        return item

    def expect_ack(self, request_id):
        response = self.next(f"ack {request_id}")
        assert response.WhichOneof("kind") == "ack", f"{self.name}: expected ack {request_id}, got {response}"
        assert response.ack.request_id == request_id, (
            f"{self.name}: ack for request {response.ack.request_id}, expected {request_id}"
        )

    def expect_event(self, what):
        response = self.next(what)
        assert response.WhichOneof("kind") == "event", f"{self.name}: expected an event ({what}), got {response}"
        return response.event

    def expect_control(self, what):
        response = self.next(what)
        assert response.WhichOneof("kind") == "control", f"{self.name}: expected a control ({what}), got {response}"
        return response.control

    def expect_failure(self, what):
        try:
            item = self._responses.get(timeout=PATIENCE)
        except queue.Empty:
            raise AssertionError(f"{self.name}: stream still open, expected {what}") from None
        assert isinstance(item, grpc.RpcError), f"{self.name}: expected {what}, got {item}"
        return item

    def expect_silence(self):
        try:
            item = self._responses.get(timeout=QUIET)
        except queue.Empty:
            return
        raise AssertionError(f"{self.name}: expected nothing, got {item}")

    def close(self):
        self._commands.put(self.END)
        self._call.cancel()


def expect_rpc_error(code, call, what):
    try:
        reply = call()
    except grpc.RpcError as error:
        assert error.code() == code, f"{what}: expected {code}, got {error.code()}: {error.details()}"
        return error
    raise AssertionError(f"{what}: expected {code}, got a reply: {reply}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, help="broker address, host:port")
    parser.add_argument("--worker-id", required=True, help="worker id of the gateway's client")
    parser.add_argument("--connection-id", required=True, help="connection id of the gateway's client")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="herald-stubs-") as out_dir:
        pb, pb_grpc = generate_stubs(Path(out_dir))

    channel = grpc.insecure_channel(args.broker)
    grpc.channel_ready_future(channel).result(timeout=PATIENCE)
    stub = pb_grpc.BrokerServiceStub(channel)

    def text(value):
        return pb.Content(text=value)

    broadcast = pb.Target(broadcast=pb.Broadcast())

    def to_connection(worker_id, connection_id):
        return pb.Target(connection=pb.ConnectionAddress(worker_id=worker_id, connection_id=connection_id))

    def publish(target, content):
        return stub.Publish(pb.PublishRequest(target=target, content=content), timeout=PATIENCE)

    step("Subscribe: one stream listens on 'broadcast' and 'news.eu'")
    listener = Session(stub, "listener")
    listener.send(pb.SubscribeRequest(request_id=1, subscribe=pb.SubscribeChannels(channels=["broadcast"])))
    listener.send(pb.SubscribeRequest(request_id=2, subscribe=pb.SubscribeChannels(channels=["news.eu"])))
    listener.expect_ack(1)
    listener.expect_ack(2)

    step("Publish a broadcast: the listener and the gateway get it")
    reply = publish(broadcast, text("py-broadcast"))
    assert reply.subscribers == 2, f"broadcast handed to {reply.subscribers} sessions, expected 2 (listener, gateway)"
    event = listener.expect_event("the broadcast")
    assert event.channel == "broadcast", f"broadcast arrived on channel {event.channel!r}"
    assert event.target.WhichOneof("kind") == "broadcast", f"broadcast event target: {event.target}"
    assert event.content.text == "py-broadcast", f"broadcast content: {event.content}"

    step("Publish binary content on 'news.eu': only the listener gets it")
    reply = publish(pb.Target(channel="news.eu"), pb.Content(binary=b"\x00\x01eu\xff"))
    assert reply.subscribers == 1, f"news.eu handed to {reply.subscribers} sessions, expected 1"
    event = listener.expect_event("the news.eu message")
    assert event.channel == "news.eu", f"news.eu message arrived on channel {event.channel!r}"
    assert event.target.channel == "news.eu", f"news.eu event target: {event.target}"
    assert event.content.WhichOneof("body") == "binary", f"news.eu content: {event.content}"
    assert event.content.binary == b"\x00\x01eu\xff", f"news.eu content: {event.content.binary!r}"

    worker_id = "py-" + secrets.token_hex(4)
    step(f"ClaimWorker {worker_id!r}: a connection-targeted publish reaches the claiming stream")
    holder = Session(stub, "holder")
    holder.send(
        pb.SubscribeRequest(request_id=10, claim_worker=pb.ClaimWorker(worker_id=worker_id, instance_id="py-a"))
    )
    holder.expect_ack(10)
    error = expect_rpc_error(
        grpc.StatusCode.UNAVAILABLE,
        lambda: publish(to_connection(worker_id, "7"), text("too early")),
        "a publish to a gateway that has not reported its connections yet",
    )
    assert "has not reported its connections" in error.details(), f"unreported gateway: {error.details()}"
    step(f"  before the first report (retry): {error.details()}")

    step("DirectoryReport: the fake gateway reports its connections 7, 8 and 9 as opened")
    holder.send(
        pb.SubscribeRequest(
            request_id=11,
            report=pb.DirectoryReport(
                changes=[
                    pb.DirectoryChange(connection_id=c, opened=pb.ConnectionState()) for c in ("7", "8", "9")
                ]
            ),
        )
    )
    holder.expect_ack(11)
    reply = publish(to_connection(worker_id, "7"), text("for connection 7"))
    assert reply.subscribers == 1, f"targeted publish handed to {reply.subscribers} sessions, expected 1"
    event = holder.expect_event("the targeted message")
    assert event.channel == f"worker.{worker_id}", f"targeted message arrived on channel {event.channel!r}"
    assert event.target.connection.worker_id == worker_id, f"targeted event target: {event.target}"
    assert event.target.connection.connection_id == "7", f"targeted event target: {event.target}"
    assert event.content.text == "for connection 7", f"targeted content: {event.content}"

    step("PublishBatch: each message is routed or refused on its own, in order")
    reply = stub.PublishBatch(
        pb.PublishBatchRequest(
            requests=[
                pb.PublishRequest(target=broadcast, content=text("batch-1")),
                pb.PublishRequest(target=to_connection("nobody-" + worker_id, "1"), content=text("lost")),
                pb.PublishRequest(target=to_connection(worker_id, "8"), content=text("batch-3")),
            ]
        ),
        timeout=PATIENCE,
    )
    outcomes = [result.WhichOneof("outcome") for result in reply.results]
    assert outcomes == ["published", "error", "published"], f"batch outcomes: {outcomes}"
    assert reply.results[0].published.subscribers == 2, f"batch broadcast: {reply.results[0]}"
    assert reply.results[1].error.code == grpc.StatusCode.NOT_FOUND.value[0] == 5, f"batch error: {reply.results[1]}"
    assert "no live gateway holds worker id" in reply.results[1].error.message, f"batch error: {reply.results[1]}"
    assert reply.results[2].published.subscribers == 1, f"batch targeted: {reply.results[2]}"
    assert listener.expect_event("batch-1").content.text == "batch-1"
    event = holder.expect_event("batch-3")
    assert (event.target.connection.connection_id, event.content.text) == ("8", "batch-3"), f"batch-3 event: {event}"

    step("A second ClaimWorker for the held id, from another instance: ALREADY_EXISTS")
    intruder = Session(stub, "intruder")
    intruder.send(
        pb.SubscribeRequest(request_id=20, claim_worker=pb.ClaimWorker(worker_id=worker_id, instance_id="py-b"))
    )
    error = intruder.expect_failure("ALREADY_EXISTS")
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS, f"second claim: {error.code()}: {error.details()}"
    assert "request 20" in error.details(), f"the refusal names the request: {error.details()}"
    step(f"  refused: {error.details()}")
    publish(to_connection(worker_id, "9"), text("still the holder's"))
    assert holder.expect_event("a message after the refused claim").content.text == "still the holder's"

    step("Control: bind connection 7 to a user; the fake gateway carries it out and confirms it")
    pending = stub.Control.future(
        pb.ControlRequest(
            bind_user=pb.BindUser(
                connection=pb.ConnectionAddress(worker_id=worker_id, connection_id="7"), user_id="py-user"
            )
        ),
        timeout=PATIENCE,
    )
    control = holder.expect_control("the bind_user control")
    assert control.request.WhichOneof("op") == "bind_user", f"control: {control}"
    assert control.request.bind_user.connection.connection_id == "7", f"control: {control}"
    assert control.request.bind_user.user_id == "py-user", f"control: {control}"
    holder.send(
        pb.SubscribeRequest(
            request_id=30,
            report=pb.DirectoryReport(
                changes=[pb.DirectoryChange(connection_id="7", state=pb.ConnectionState(user_id="py-user"))],
                done=[pb.ControlDone(control_id=control.control_id, connections=1)],
            ),
        )
    )
    holder.expect_ack(30)
    reply = pending.result(timeout=PATIENCE)
    assert reply.connections == 1, f"control applied to {reply.connections} connections, expected 1"
    assert list(reply.missing_workers) == [], f"control missing workers: {reply.missing_workers}"

    step("Control on a connection that is not live: NOT_FOUND")
    error = expect_rpc_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: stub.Control(
            pb.ControlRequest(unbind_user=pb.ConnectionAddress(worker_id=worker_id, connection_id="99")),
            timeout=PATIENCE,
        ),
        "a control on connection 99",
    )
    step(f"  refused: {error.details()}")

    step("Query: the user is online on connection 7, and the totals count every connection")
    answer = stub.Query(pb.QueryRequest(user_online="py-user"), timeout=PATIENCE)
    assert answer.online, f"user_online: {answer}"
    answer = stub.Query(pb.QueryRequest(user_connections="py-user"), timeout=PATIENCE)
    addresses = [(c.address.worker_id, c.address.connection_id, c.user_id) for c in answer.connections]
    assert addresses == [(worker_id, "7", "py-user")], f"user_connections: {answer}"
    assert answer.count == 1 and list(answer.missing_workers) == [], f"user_connections: {answer}"
    answer = stub.Query(pb.QueryRequest(totals=pb.Totals()), timeout=PATIENCE)
    assert (answer.count, answer.users) == (4, 1), f"totals (3 fake connections, 1 real, 1 user): {answer}"
    answer = stub.Query(
        pb.QueryRequest(connection=pb.ConnectionAddress(worker_id=args.worker_id, connection_id=args.connection_id)),
        timeout=PATIENCE,
    )
    assert answer.online and answer.count == 1, f"the real gateway's client: {answer}"
    assert answer.connections[0].user_id == "", f"the real gateway's client is anonymous: {answer}"
    answer = stub.Query(pb.QueryRequest(user_online="nobody"), timeout=PATIENCE)
    assert not answer.online, f"user_online for nobody: {answer}"

    step("Publish to the user: only the gateway holding it gets it, told to deliver to that user")
    reply = publish(pb.Target(user="py-user"), text("for py-user"))
    event = holder.expect_event("the user message")
    assert event.delivery.WhichOneof("to") == "user", f"user message delivery: {event.delivery}"
    assert event.delivery.user == "py-user", f"user message delivery: {event.delivery}"
    assert event.content.text == "for py-user", f"user message content: {event.content}"

    step("Publish without a target, or without content: INVALID_ARGUMENT")
    error = expect_rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Publish(pb.PublishRequest(content=text("x"))), "no target"
    )
    step(f"  no target: {error.details()}")
    error = expect_rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Publish(pb.PublishRequest(target=broadcast)), "no content"
    )
    step(f"  no content: {error.details()}")

    step(f"Publish to the gateway's client {args.worker_id}/{args.connection_id}")
    reply = publish(to_connection(args.worker_id, args.connection_id), text("hello from python grpcio"))
    assert reply.subscribers == 1, f"publish to the gateway handed to {reply.subscribers} sessions, expected 1"

    listener.expect_silence()
    holder.expect_silence()
    for session in (listener, holder, intruder):
        session.close()
    channel.close()
    print("grpc_stubs: all checks passed", flush=True)


if __name__ == "__main__":
    main()

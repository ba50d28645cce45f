"""An echo backend for herald, built on the event stream and the publish API,
for the WebSocket conformance run (tests/e2e/conformance.rs).

It consumes the connection events of a consumer group (ConsumeEvents) and,
for each `message` event (a frame a classic raw client sent), publishes the
same content back to that connection (Publish to Target.connection): text
stays text, binary stays binary. The gateway must run with
`--greeting none --events message,disconnect` (or `--events message`), so
that a client sees nothing but its echoes.

Order: a connection's messages are echoed in the order the client sent them.
The stream delivers a connection's events in order; each connection is given
to one of --workers threads when its first message comes (the one with the
fewest live connections; a `disconnect` event, when the gateway reports them,
ends a connection's stay), and a worker handles its messages one after the
other: it takes what is queued, publishes it (one
Publish, or a PublishBatch, which the broker routes in order) and only then
takes more. Connections on different workers are echoed in parallel, so the
suite's parallel cases do not wait on each other. An event is acknowledged
(AckEvents, by one acker thread, in bulk) once its echo is published; one
delivered again (after the ack wait) is echoed once.

Stub generation follows tests/python/grpc_stubs.py: protoc from proto/ at run
time. grpcio's 4 MiB default is too small for the 16 MiB messages of the
suite's 9.* cases, so the channel takes large messages both ways.

Usage: conformance_echo.py --broker HOST:PORT [--group echo] [--workers 4]
Prints "conformance_echo: consuming" on stdout once the stream is open, and
on stderr counts every --stats seconds and a summary when it ends (SIGTERM
or SIGINT).
"""

import argparse
import collections
import queue
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from grpc_stubs import generate_stubs

PATIENCE = 10.0
# The suite's largest message is 16 MiB (9.1.6, 9.2.6), and several can come
# in one batch of events.
MAX_RECEIVE = 256 * 1024 * 1024
MAX_SEND = 32 * 1024 * 1024
# A PublishBatch stays well under the broker's request limit
# (--max-content-bytes plus 1 MiB) and its --max-batch (default 1000).
BATCH_BYTES = 1024 * 1024
BATCH_COUNT = 500
# AckEvents takes at most 10,000 ack ids.
ACK_COUNT = 10_000
# Event ids remembered, to skip redeliveries.
SEEN = 100_000
STOP = object()


def log(text):
    print(f"conformance_echo: {text}", file=sys.stderr, flush=True)


def size_of(content):
    body = content.WhichOneof("body")
    return len(getattr(content, body)) if body else 0


class Acker(threading.Thread):
    """Acknowledges, in bulk, the events whose echoes are published."""

    def __init__(self, pb, stub, group):
        super().__init__(daemon=True, name="acker")
        self.pb, self.stub, self.group = pb, stub, group
        self.queue = queue.Queue()
        self.counts = collections.Counter()

    def ack(self, ack_ids):
        self.queue.put(ack_ids)

    def run(self):
        stopping = False
        while not stopping:
            ids = []
            item = self.queue.get()
            while True:
                if item is STOP:
                    stopping = True
                else:
                    ids.extend(item)
                if stopping or len(ids) >= ACK_COUNT:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            for start in range(0, len(ids), ACK_COUNT):
                chunk = ids[start : start + ACK_COUNT]
                try:
                    self.stub.AckEvents(self.pb.AckEventsRequest(group=self.group, ack_ids=chunk), timeout=PATIENCE)
                    self.counts["acked"] += len(chunk)
                except grpc.RpcError as error:
                    # They come again after the ack wait, and are skipped then.
                    self.counts["ack_failed"] += len(chunk)
                    log(f"ack failed: {error.code().name}: {error.details()}")


class Worker(threading.Thread):
    """Echoes the messages of the connections given to it, in order."""

    def __init__(self, index, pb, stub, acker):
        super().__init__(daemon=True, name=f"worker-{index}")
        self.pb, self.stub, self.acker = pb, stub, acker
        self.queue = queue.Queue()
        self.counts = collections.Counter()
        self.live = 0  # connections given to it and not gone (kept by the reader)

    def run(self):
        while True:
            item = self.queue.get()
            if item is STOP:
                return
            # Take what is queued (up to a batch), in order.
            batch, size = [item], size_of(item[1])
            while len(batch) < BATCH_COUNT and size < BATCH_BYTES:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is STOP:
                    self.queue.put(STOP)
                    break
                batch.append(item)
                size += size_of(item[1])
            self.publish(batch)
            self.acker.ack([ack_id for _, _, ack_id in batch])

    def publish(self, batch):
        requests = [self.pb.PublishRequest(target=target, content=content) for target, content, _ in batch]
        if len(requests) == 1:
            try:
                self.stub.Publish(requests[0], timeout=PATIENCE)
                self.counts["echoed"] += 1
            except grpc.RpcError as error:
                self.refused(error.code().name, error.details())
            return
        try:
            reply = self.stub.PublishBatch(self.pb.PublishBatchRequest(requests=requests), timeout=PATIENCE)
        except grpc.RpcError as error:
            self.counts[f"batch_refused_{error.code().name}"] += 1
            log(f"publish batch of {len(requests)} refused: {error.code().name}: {error.details()}")
            return
        self.counts["batches"] += 1
        for result in reply.results:
            if result.WhichOneof("outcome") == "published":
                self.counts["echoed"] += 1
            else:
                name = grpc.StatusCode.NOT_FOUND.name if result.error.code == 5 else f"CODE_{result.error.code}"
                self.refused(name, result.error.message)

    def refused(self, code, details):
        # A connection that closed before its echo went out (many cases close
        # right after they send, or the gateway closed it) is NOT_FOUND: no
        # one to echo to. Anything else is shown.
        self.counts[f"refused_{code}"] += 1
        if code != "NOT_FOUND":
            log(f"publish refused: {code}: {details}")


class Echo:
    """Reads the event stream and hands each connection's messages to its worker."""

    def __init__(self, pb, stub, group, workers):
        self.pb = pb
        self.acker = Acker(pb, stub, group)
        self.workers = [Worker(i, pb, stub, self.acker) for i in range(workers)]
        self.owner = {}  # (worker_id, connection_id) -> Worker
        self.seen = collections.OrderedDict()
        self.counts = collections.Counter()

    def start(self):
        self.acker.start()
        for worker in self.workers:
            worker.start()

    def stop(self):
        for worker in self.workers:
            worker.queue.put(STOP)
        for worker in self.workers:
            worker.join()
        self.acker.queue.put(STOP)
        self.acker.join()

    def handle(self, batch):
        unused = []  # ack ids of events with nothing to echo
        for consumed in batch.events:
            event = consumed.event
            self.counts["events"] += 1
            if consumed.delivery > 1:
                self.counts["redelivered"] += 1
            if event.id in self.seen:
                self.counts["duplicates"] += 1
                unused.append(consumed.ack_id)
                continue
            self.seen[event.id] = None
            if len(self.seen) > SEEN:
                self.seen.popitem(last=False)
            kind = event.WhichOneof("kind")
            key = (event.connection.worker_id, event.connection.connection_id)
            if kind != "message":
                if kind == "disconnect" and key in self.owner:
                    # Its messages are queued already: the worker still
                    # echoes them (or finds the connection gone).
                    self.owner.pop(key).live -= 1
                self.counts[kind] += 1
                unused.append(consumed.ack_id)
                continue
            content = event.message.content
            if content.WhichOneof("body") is None:
                self.counts["message_without_content"] += 1
                unused.append(consumed.ack_id)
                continue
            worker = self.owner.get(key)
            if worker is None:
                worker = self.owner[key] = min(self.workers, key=lambda w: w.live)
                worker.live += 1
                self.counts["connections"] += 1
            worker.queue.put((self.pb.Target(connection=event.connection), content, consumed.ack_id))
        if unused:
            self.acker.ack(unused)

    def summary(self):
        counts = self.counts + self.acker.counts
        for worker in self.workers:
            counts += worker.counts
        return " ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, help="broker gRPC address, host:port")
    parser.add_argument("--group", default="echo", help="consumer group (default: echo)")
    parser.add_argument("--max-unacked", type=int, default=1000, help="events held unacknowledged (default: 1000)")
    parser.add_argument("--workers", type=int, default=4, help="connections echoed in parallel (default: 4)")
    parser.add_argument("--stats", type=float, default=0, help="print counts every this many seconds (0: never)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="herald-stubs-") as out_dir:
        pb, pb_grpc = generate_stubs(Path(out_dir))

    options = [
        ("grpc.max_receive_message_length", MAX_RECEIVE),
        ("grpc.max_send_message_length", MAX_SEND),
    ]
    channel = grpc.insecure_channel(args.broker, options=options)
    grpc.channel_ready_future(channel).result(timeout=PATIENCE)
    stub = pb_grpc.BrokerServiceStub(channel)
    echo = Echo(pb, stub, args.group, max(1, args.workers))
    echo.start()

    stream = stub.ConsumeEvents(pb.ConsumeEventsRequest(group=args.group, max_unacked=args.max_unacked))
    stopping = threading.Event()

    def stop(*_):
        stopping.set()
        stream.cancel()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.stats > 0:

        def report():
            while not stopping.wait(args.stats):
                log(echo.summary())

        threading.Thread(target=report, daemon=True).start()

    # The stream's headers come once the broker has made this an instance of
    # the group: every event reported from then on is delivered here.
    stream.initial_metadata()
    print("conformance_echo: consuming", flush=True)
    started = time.monotonic()
    failed = False
    try:
        for batch in stream:
            echo.handle(batch)
    except grpc.RpcError as error:
        if not stopping.is_set():
            log(f"stream ended: {error.code().name}: {error.details()}")
            failed = True
    echo.stop()
    log(f"done after {time.monotonic() - started:.1f}s: {echo.summary()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

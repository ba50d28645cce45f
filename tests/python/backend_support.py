"""What the backend_* scripts share: grpcio stubs, consumer-group instances
that record every delivery as it came, WebSocket clients (the `websockets`
library) that connect, talk and leave, and the events each must cause.

Nothing here de-duplicates: an instance keeps every delivery it was handed,
so that a script can count them by event id.
"""

import asyncio
import os
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from websockets.asyncio.client import connect

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpc_stubs import generate_stubs  # noqa: E402

PATIENCE = 10.0

# The disconnect a client's own close (code 1000) must cause.
CLIENT_CLOSE = ("disconnect", "DISCONNECT_CAUSE_CLIENT", 1000, "client_closed")


def step(text):
    print(f"- {text}", flush=True)


def stubs():
    """Generates the stubs from proto/ into a temporary directory; returns (messages, services)."""
    with tempfile.TemporaryDirectory(prefix="herald-stubs-") as out_dir:
        return generate_stubs(Path(out_dir))


def serve(server, tls):
    """Serves `server` (an http.server) in a thread of its own, over HTTPS when `tls` is a
    (certificate, key) pair of PEM files; returns the scheme of its URLs."""
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return "http" if tls is None else "https"


def tls_arguments(parser):
    """Adds --tls-cert and --tls-key to `parser`; see `tls_of`."""
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")


def tls_of(args):
    """The (certificate, key) pair the arguments give, or None for plain HTTP."""
    return (args.tls_cert, args.tls_key) if args.tls_cert else None


def wait_until(what, condition, within=PATIENCE):
    """Polls `condition` until it holds; fails naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.05)


def happened_at(event):
    """When the gateway saw an event, in nanoseconds: the order a connection's events happened in
    (event ids are opaque)."""
    return event.at.seconds * 1_000_000_000 + event.at.nanos


class Instance:
    """One instance of a consumer group over gRPC, on the first broker of its
    list that takes it.

    A reader thread records every delivery it is handed, raw. Deliveries are
    acknowledged on the broker it consumes from: each batch at once, or,
    with `ack_every`, all that came in the last `ack_every` seconds
    together (so that the instance holds some at any time). When the stream
    breaks (its broker died), it moves to the next broker of its list,
    acknowledges there what it had not managed to, and consumes again.
    """

    def __init__(self, pb, pb_grpc, group, name, brokers, max_unacked=0, ack_every=0.0):
        self.pb = pb
        self.pb_grpc = pb_grpc
        self.group = group
        self.name = name
        self.brokers = list(brokers)
        self.max_unacked = max_unacked
        self.ack_every = ack_every
        self.at = 0
        self.deliveries = []  # (ConnectionEvent, delivery count), as handed over
        self.unacked = []  # (ack id, the broker that handed it over), not acknowledged yet
        self.moves = []  # (from broker, to broker, why)
        self.failed_acks = 0
        # Deliveries acknowledged on another broker than the one that handed them over.
        self.reacked = 0
        self.lock = threading.Lock()
        self.ack_lock = threading.Lock()
        self.stopped = False
        self.call = None
        self.channels = {}

    @property
    def broker(self):
        return self.brokers[self.at]

    def stub(self, broker):
        if broker not in self.channels:
            self.channels[broker] = grpc.insecure_channel(broker)
        return self.pb_grpc.BrokerServiceStub(self.channels[broker])

    def start(self):
        """Attaches (the broker has made this an instance when this returns) and starts reading."""
        self.attach()
        threading.Thread(target=self.read, name=self.name, daemon=True).start()
        if self.ack_every:
            threading.Thread(target=self.ack_now_and_then, name=f"{self.name}-acks", daemon=True).start()
        return self

    def attach(self):
        """Consumes on the current broker, moving down the list while one cannot be reached."""
        deadline = time.monotonic() + PATIENCE
        while True:
            request = self.pb.ConsumeEventsRequest(group=self.group, max_unacked=self.max_unacked)
            call = self.stub(self.broker).ConsumeEvents(request)
            # The broker answers with headers once the instance is attached;
            # a call that failed is done without them.
            call.initial_metadata()
            if not call.done():
                self.call = call
                return
            why = f"{call.code().name}: {call.details()}"
            assert time.monotonic() < deadline, f"{self.name}: no broker of {self.brokers} took it: {why}"
            self.move_on(why)
            time.sleep(0.1)

    def move_on(self, why):
        before = self.broker
        self.at = (self.at + 1) % len(self.brokers)
        self.moves.append((before, self.broker, why))
        step(f"{self.name}: {before} -> {self.broker} ({why})")

    def read(self):
        while not self.stopped:
            broker = self.broker
            try:
                for response in self.call:
                    with self.lock:
                        for consumed in response.events:
                            self.deliveries.append((consumed.event, consumed.delivery))
                            self.unacked.append((consumed.ack_id, broker))
                    if not self.ack_every:
                        self.ack()
                why = "stream ended"
            except grpc.RpcError as error:
                why = f"{error.code().name}: {error.details()}"
            if self.stopped:
                return
            self.move_on(why)
            self.recover()

    def ack_now_and_then(self):
        while not self.stopped:
            time.sleep(self.ack_every)
            self.ack()

    def recover(self):
        """On a new broker: acknowledges what was not, then consumes again."""
        deadline = time.monotonic() + PATIENCE
        while not self.stopped:
            if self.ack():
                try:
                    self.attach()
                    return
                except AssertionError as error:
                    why = str(error)
            else:
                why = "acknowledging failed"
            assert time.monotonic() < deadline, f"{self.name}: could not recover: {why}"
            self.move_on(why)
            time.sleep(0.1)

    def ack(self):
        """Acknowledges every delivery not acknowledged yet, on the current broker; whether it worked."""
        with self.ack_lock:
            with self.lock:
                pending = list(self.unacked)
            if not pending:
                return True
            broker = self.broker
            try:
                self.stub(broker).AckEvents(
                    self.pb.AckEventsRequest(group=self.group, ack_ids=[i for i, _ in pending]), timeout=PATIENCE
                )
            except grpc.RpcError as error:
                self.failed_acks += 1
                step(f"{self.name}: acknowledging {len(pending)} on {broker} failed: {error.code().name}")
                return False
            self.reacked += sum(1 for _, source in pending if source != broker)
            with self.lock:
                self.unacked = self.unacked[len(pending) :]
            return True

    def events(self):
        with self.lock:
            return list(self.deliveries)

    def stop(self):
        self.stopped = True
        if self.call is not None:
            self.call.cancel()
        for channel in self.channels.values():
            channel.close()


def describe(pb, event):
    """What an event says, comparable with a connection's expectations."""
    kind = event.WhichOneof("kind")
    if kind == "connect":
        return ("connect",)
    if kind == "message":
        body = event.message.content.WhichOneof("body")
        return ("message", body, getattr(event.message.content, body) if body else None)
    if kind == "disconnect":
        d = event.disconnect
        return ("disconnect", pb.DisconnectCause.Name(d.cause), d.code, d.reason)
    if kind in ("subscribe", "unsubscribe"):
        return (kind, getattr(event, kind).channel)
    return (kind,)


@dataclass
class Connection:
    """One client connection, as its greeting named it, and what it sent."""

    label: str
    worker_id: str
    connection_id: str
    # The client's end of the TCP connection, "ip:port", when the client knows it.
    local_address: str | None
    # The user the connection is bound to; "" when anonymous.
    user_id: str = ""
    sent: list = field(default_factory=list)  # ("text", str) or ("binary", bytes)

    @property
    def address(self):
        return (self.worker_id, self.connection_id)

    def expected(self):
        """The events this connection must cause, in order."""
        return [("connect",)] + [("message", kind, value) for kind, value in self.sent] + [CLIENT_CLOSE]


def parse_text_greeting(greeting):
    """`Worker ID:W Connection ID:C connected` -> (W, C)."""
    assert isinstance(greeting, str), f"the greeting is not text: {greeting!r}"
    assert greeting.startswith("Worker ID:") and greeting.endswith(" connected"), f"not a greeting: {greeting!r}"
    worker, _, connection = greeting[len("Worker ID:") : -len(" connected")].partition(" Connection ID:")
    return worker, connection


async def talk_and_leave(url, label, pause=0.0, user_agent=None):
    """Connects a raw client, reads its greeting, sends a text and a binary
    message (`pause` seconds apart), and closes with 1000; returns the Connection."""
    options = {} if user_agent is None else {"user_agent_header": user_agent}
    async with connect(url, open_timeout=PATIENCE, close_timeout=PATIENCE, **options) as ws:
        greeting = await asyncio.wait_for(ws.recv(), PATIENCE)
        worker_id, connection_id = parse_text_greeting(greeting)
        host, port = ws.local_address[:2]
        conn = Connection(label, worker_id, connection_id, f"{host}:{port}")
        conn.sent.append(("text", f"{label}: olá, herald ✓"))
        conn.sent.append(("binary", bytes([0, 1, 2, 255]) + label.encode()))
        await ws.send(conn.sent[0][1])
        if pause:
            await asyncio.sleep(pause)
        await ws.send(conn.sent[1][1])
        await ws.close(1000, "bye")
    return conn


def check_group(pb, group, instances, connections, redelivery_allowed=False):
    """Checks one group's deliveries against the connections: every event of
    every connection exactly once (counted by event id, raw), in the order
    each connection caused them, and nothing else. Returns a summary line."""
    deliveries = [(inst.name, event, n) for inst in instances for event, n in inst.events()]
    counts = Counter(event.id for _, event, _ in deliveries)
    repeated = {event_id: n for event_id, n in counts.items() if n > 1}
    by_address = defaultdict(dict)
    for _, event, _ in deliveries:
        address = (event.connection.worker_id, event.connection.connection_id)
        by_address[address][event.id] = event
    problems = []
    if repeated:
        problems.append(f"event ids delivered more than once: {sorted(repeated.items())[:20]}")
    known = {conn.address: conn for conn in connections}
    for address in set(by_address) - set(known):
        events = sorted(by_address[address].values(), key=happened_at)
        problems.append(f"events of a connection no client had: {address}: {[describe(pb, e) for e in events]}")
    for conn in connections:
        events = sorted(by_address.get(conn.address, {}).values(), key=happened_at)
        seen = [describe(pb, e) for e in events]
        if seen != conn.expected():
            problems.append(f"{conn.label} {conn.address}: expected {conn.expected()}, got {seen}")
            continue
        strays = [(e.id, e.user_id) for e in events if e.user_id != conn.user_id]
        if strays:
            problems.append(f"{conn.label}: events not of user {conn.user_id!r}: {strays}")
        stale = [e.id for e in events if abs(e.at.ToMilliseconds() / 1000 - time.time()) > 120]
        if stale:
            problems.append(f"{conn.label}: events stamped more than 2 minutes away from now: {stale}")
        connect_event = events[0].connect
        if conn.local_address is not None and connect_event.remote_address != conn.local_address:
            problems.append(
                f"{conn.label}: connect event from {connect_event.remote_address}, the client is {conn.local_address}"
            )
        if not connect_event.remote_address.startswith("127.0.0.1:"):
            problems.append(f"{conn.label}: connect event from {connect_event.remote_address}")
    late = [(event.id, n) for _, event, n in deliveries if n != 1]
    if late and not redelivery_allowed:
        problems.append(f"deliveries counted past 1: {late[:20]}")
    per_instance = ", ".join(f"{inst.name}: {len(inst.events())}" for inst in instances)
    summary = (
        f"group {group}: {len(deliveries)} deliveries of {len(counts)} event ids "
        f"({len(repeated)} ids more than once, {len(late)} deliveries counted past 1) [{per_instance}]"
    )
    assert not problems, f"group {group}:\n  " + "\n  ".join(problems) + f"\n  {summary}"
    return summary


def expected_count(connections):
    return sum(len(conn.expected()) for conn in connections)


def group_has_all(instances, connections):
    """Whether a group's instances were handed, together, at least every expected event."""
    ids = {event.id for inst in instances for event, _ in inst.events()}
    return len(ids) >= expected_count(connections)

"""Receives herald's webhooks with the Python standard library's http.server,
verifying each request's signature as a backend would, while `websockets`
raw clients connect, talk and leave.

A request carries `Herald-Signature: t=<unix seconds>,v1=<hex>`, the hex
being HMAC-SHA256 with the shared secret over `<t>.<body>`. The receiver
accepts (204) a request only when the signature verifies and `t` is within
five minutes of now; its body is `{"events": [...]}`, each event
`{"id", "kind", "connection": {"worker_id", "connection_id"}, "user_id",
"at_ms", ...fields of its kind, "delivery"}`.

1. The verifier itself: a body signed here verifies; the same with one byte
   of the body changed, another secret, or an old timestamp, does not.
2. Clients connect, send a text and a binary message, and close: every event
   of each arrives once, in an accepted request, with what it should say,
   in batches of at most --batch events. A real request's body, tampered
   with, no longer verifies.
3. The receiver answers 500 to the next --refuse requests; more clients come
   and go: herald POSTs again until accepted, every event still arrives once
   in accepted requests, the refused ones' events included, none lost.

The caller drives it: the script prints `listening <URL>` once its receiver
listens, then waits for `go <WS URL>` on its standard input (herald, started
meanwhile, POSTs to URL).

Usage: backend_webhook.py --secret SECRET [--batch N] [--refuse N] [--tls-cert PEM --tls-key PEM]
(with a certificate, the receiver serves HTTPS)
Exits non-zero, saying what differed, on any mismatch.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import sys
import threading
import time
from collections import Counter

from backend_support import expected_count, serve, step, talk_and_leave, tls_arguments, tls_of, wait_until

TOLERANCE = 300
QUIET = 2.5


def sign(secret, timestamp, body):
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret, header, body, now=None):
    """Checks a Herald-Signature header against the body; returns None when it verifies, else why not."""
    if not header:
        return "no Herald-Signature header"
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if "t" not in fields or "v1" not in fields:
        return f"malformed Herald-Signature {header!r}"
    try:
        timestamp = int(fields["t"])
    except ValueError:
        return f"timestamp {fields['t']!r} is not a number"
    now = time.time() if now is None else now
    if abs(now - timestamp) > TOLERANCE:
        return f"timestamp {timestamp} is {now - timestamp:.0f}s away from now"
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, fields["v1"]):
        return "the signature does not match the body"
    return None


class Receiver:
    """The webhook endpoint: records every request, refusing the next `refuse` of them with 500."""

    def __init__(self, secret, tls=None):
        self.secret = secret
        self.lock = threading.Lock()
        self.accepted = []  # (header, body, events)
        self.refused = []  # (header, body, events)
        self.problems = []
        self.refuse = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as herald's client expects to reuse

            def do_POST(self):  # noqa: N802 (the name http.server dispatches to)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                status = receiver.take(self.path, self.headers, body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = serve(self.server, tls)

    @property
    def url(self):
        return "%s://%s:%d/hook" % (self.scheme, *self.server.server_address)

    def take(self, path, headers, body):
        header = headers.get("herald-signature")
        why = verify(self.secret, header, body)
        with self.lock:
            if path != "/hook":
                self.problems.append(f"POST to {path}")
                return 404
            if why is not None:
                self.problems.append(f"a request did not verify: {why}")
                return 401
            if "json" not in headers.get("content-type", ""):
                self.problems.append(f"content-type {headers.get('content-type')!r}")
            try:
                document = json.loads(body)
                events = document["events"]
                assert set(document) == {"events"}, f"keys {sorted(document)}"
            except (ValueError, KeyError, AssertionError) as error:
                self.problems.append(f"a body that is not {{'events': [...]}} ({error}): {body[:200]!r}")
                return 400
            if self.refuse > 0:
                self.refuse -= 1
                self.refused.append((header, body, events))
                return 500
            self.accepted.append((header, body, events))
            return 204

    def accepted_events(self):
        with self.lock:
            return [event for _, _, events in self.accepted for event in events]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def describe(event):
    """What a webhook event says, as backend_support's Connection.expected() puts it."""
    kind = event.get("kind")
    if kind == "connect":
        return ("connect",)
    if kind == "message":
        content = event.get("content") or {}
        if "text" in content:
            return ("message", "text", content["text"])
        if "binary" in content:
            return ("message", "binary", base64.b64decode(content["binary"]))
        return ("message", None, None)
    if kind == "disconnect":
        cause = "DISCONNECT_CAUSE_" + str(event.get("cause")).upper()
        return ("disconnect", cause, event.get("code"), event.get("reason"))
    return (kind,)


KIND_FIELDS = {
    "connect": {"remote_address", "headers", "client_protocol", "groups"},
    "message": {"content"},
    "disconnect": {"cause", "code", "reason"},
}
COMMON_FIELDS = {"id", "kind", "connection", "user_id", "at_ms", "delivery"}


def check_events(events, connections):
    """Every event of every connection exactly once, as it should read, and nothing else."""
    problems = []
    counts = Counter(event["id"] for event in events)
    repeated = {i: n for i, n in counts.items() if n > 1}
    if repeated:
        problems.append(f"events accepted more than once: {sorted(repeated.items())}")
    by_address = {}
    for event in events:
        fields = set(event)
        expected_fields = COMMON_FIELDS | KIND_FIELDS.get(event.get("kind"), set())
        if fields != expected_fields:
            problems.append(f"event {event.get('id')} has fields {sorted(fields)}, expected {sorted(expected_fields)}")
            continue
        if abs(event["at_ms"] / 1000 - time.time()) > 120:
            problems.append(f"event {event['id']} at_ms {event['at_ms']} is not recent")
        address = (event["connection"]["worker_id"], event["connection"]["connection_id"])
        by_address.setdefault(address, {})[event["id"]] = event
    known = {conn.address: conn for conn in connections}
    for address in set(by_address) - set(known):
        problems.append(f"events of a connection no client had: {address}: {list(by_address[address].values())}")
    for conn in connections:
        # at_ms is in milliseconds, which two events may share: of those the
        # connect goes first and the disconnect last, and only their places
        # are checked (redelivered events arrive late).
        rank = {"connect": 0, "message": 1, "disconnect": 2}
        mine = sorted(by_address.get(conn.address, {}).values(), key=lambda e: (e["at_ms"], rank.get(e["kind"], 1)))
        seen = [describe(e) for e in mine]
        expected = conn.expected()
        if sorted(map(repr, seen)) != sorted(map(repr, expected)):
            problems.append(f"{conn.label} {conn.address}: expected {expected}, got {seen}")
            continue
        if (seen[0], seen[-1]) != (expected[0], expected[-1]):
            problems.append(f"{conn.label} {conn.address}: not connect first and disconnect last: {seen}")
            continue
        connect = mine[0]
        got = (connect["remote_address"], connect["headers"], connect["client_protocol"], connect["groups"])
        if got != (conn.local_address, {}, "", []):
            problems.append(f"{conn.label}: connect event says {got}")
        if any(e["user_id"] != "" for e in mine):
            problems.append(f"{conn.label}: an anonymous connection's events name a user: {mine}")
    assert not problems, "\n  ".join(["webhook events:"] + problems)


def come_and_go(url, labels):
    async def run():
        return await asyncio.gather(*(talk_and_leave(url, label, pause=0.01 * n) for n, label in enumerate(labels)))

    return list(asyncio.run(run()))


def all_arrived(receiver, connections):
    with receiver.lock:
        assert not receiver.problems, "\n".join(receiver.problems)
    return len({e["id"] for e in receiver.accepted_events()}) >= expected_count(connections)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secret", required=True, help="herald's --webhook-secret")
    parser.add_argument("--batch", type=int, default=10, help="herald's --webhook-batch")
    parser.add_argument("--refuse", type=int, default=3, help="requests answered 500 in step 3")
    tls_arguments(parser)
    args = parser.parse_args()

    step("1. the verifier: a signed body verifies; tampered, re-keyed or stale, it does not")
    body = b'{"events":[{"id":"w.x.1","kind":"connect"}]}'
    now = int(time.time())
    header = sign(args.secret, now, body)
    assert verify(args.secret, header, body) is None, "a body signed here does not verify"
    assert verify(args.secret, header, body.replace(b"w.x.1", b"w.x.2")) is not None, "a tampered body verifies"
    assert verify(args.secret + "!", header, body) is not None, "another secret verifies"
    assert verify(args.secret, sign(args.secret, now - 3600, body), body) is not None, "a stale signature verifies"
    assert verify(args.secret, None, body) is not None, "an unsigned body verifies"

    receiver = Receiver(args.secret, tls_of(args))
    print(f"listening {receiver.url}", flush=True)
    command, _, ws_url = sys.stdin.readline().strip().partition(" ")
    assert command == "go" and ws_url, f"expected 'go <ws url>', got {command!r} {ws_url!r}"
    try:
        step("2. five clients connect, talk and leave")
        first = come_and_go(ws_url, [f"raw-{n}" for n in range(5)])
        wait_until(f"the {expected_count(first)} events of step 2", lambda: all_arrived(receiver, first))
        time.sleep(QUIET)
        with receiver.lock:
            accepted = list(receiver.accepted)
            assert not receiver.problems, "\n".join(receiver.problems)
        check_events(receiver.accepted_events(), first)
        sizes = [len(events) for _, _, events in accepted]
        step(f"  {len(accepted)} requests accepted, of {sizes} events")
        assert max(sizes) <= args.batch, f"a request of {max(sizes)} events, over --webhook-batch {args.batch}"
        assert all(e["delivery"] == 1 for e in receiver.accepted_events()), "a delivery counted past 1"
        header, body, _ = accepted[0]
        assert verify(args.secret, header, body) is None, "a request herald signed does not verify"
        tampered = body.replace(b'"kind":"connect"', b'"kind":"disconnect"', 1)
        assert tampered != body, "the tampering changed nothing"
        assert verify(args.secret, header, tampered) is not None, "herald's request, tampered with, still verifies"

        step(f"3. the receiver answers 500 to the next {args.refuse} requests; three more clients come and go")
        with receiver.lock:
            receiver.refuse = args.refuse
        second = come_and_go(ws_url, [f"again-{n}" for n in range(3)])
        everyone = first + second
        wait_until(f"all {expected_count(everyone)} events", lambda: all_arrived(receiver, everyone), within=20)
        time.sleep(QUIET)
        with receiver.lock:
            refused = list(receiver.refused)
            assert not receiver.problems, "\n".join(receiver.problems)
        assert len(refused) == args.refuse, f"{len(refused)} requests refused, expected {args.refuse}"
        events = receiver.accepted_events()
        check_events(events, everyone)
        accepted_ids = {e["id"] for e in events}
        lost = [e["id"] for _, _, batch in refused for e in batch if e["id"] not in accepted_ids]
        assert not lost, f"events of refused requests never accepted: {lost}"
        deliveries = Counter(e["delivery"] for e in events)
        step(f"  {len(refused)} requests refused, of {[len(b) for _, _, b in refused]} events; "
             f"accepted events by delivery count: {dict(sorted(deliveries.items()))}")
    finally:
        receiver.close()
    print("backend_webhook: all checks passed", flush=True)


if __name__ == "__main__":
    main()

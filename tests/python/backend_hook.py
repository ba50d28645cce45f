"""Plays a backend's connect hook with the Python standard library's
http.server, and checks with `websockets` clients what herald makes of its
answers.

Two herald processes ask this hook, both with `--greeting json` and
`--connect-hook-timeout 500ms`: A (`--connect-hook-down refuse`, the
default; `--events all --event-headers user-agent`) and B
(`--connect-hook-down anonymous`). The hook reads `name` from the
handshake's query string:

  ana:    200 {"user_id": "ana", "groups": ["staff"]}
  bob:    200 with an empty body (anonymous)
  eve:    403 "go away" (and a second line, which herald must not pass on)
  mallory: 401 "who are you?"
  odd:    200 {"user_id": 5}: malformed
  slow:   200 {"user_id": "slow"}, but only after 1.5 s: past the timeout
  broken: 500

Checked: bob gets in anonymous; ana gets in as user ana (her JSON greeting
says so), and a publish to group "staff" through A's HTTP gateway
(`POST /v1/publish`) reaches her and not bob; the hook was told the path,
the headers by lower-case name, the client's address and its subprotocol;
eve's handshake is refused with HTTP 403 and the body "go away", mallory's
with 401 "who are you?"; the slow hook, the broken one and a malformed
answer count as down: A refuses with 503 (the slow one
within about the timeout), B lets the client in anonymous; idle keep-alive
connections the hook closes do not make the next handshake fail; with the
hook stopped, A refuses with 503 and B lets clients in anonymous. A
consumer group on A's broker sees exactly bob's and ana's events: ana's
with her user id, the groups the hook gave her, and her user-agent header
(--event-headers); none for the refused handshakes.

The caller drives it: the script prints `listening <URL>` once the hook
listens, then waits for `go {"a_ws", "a_http", "a_broker", "b_ws"}` (JSON)
on its standard input.

Usage: backend_hook.py [--tls-cert PEM --tls-key PEM]   (with a certificate, the hook serves HTTPS)
Exits non-zero, saying what differed, on any mismatch.
"""

import argparse
import asyncio
import http.server
import json
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request

from backend_support import Connection, Instance, check_group, serve, step, stubs, tls_arguments, tls_of, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

PATIENCE = 10
QUIET = 0.5
SLOW = 1.5
TIMEOUT = 0.5
DOWN_REASON = "the server cannot check connections right now: retry later"


class Hook:
    """The connect hook: answers by the `name` in the handshake's query; records what it was asked."""

    def __init__(self, tls=None):
        self.lock = threading.Lock()
        self.asked = {}  # name -> the JSON body herald POSTed
        self.problems = []
        self.sockets = set()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with hook.lock:
                    hook.sockets.add(self.connection)

            def finish(self):
                with hook.lock:
                    hook.sockets.discard(self.connection)
                super().finish()

            def do_POST(self):  # noqa: N802 (the name http.server dispatches to)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                status, answer = hook.answer(self.path, body)
                self.send_response(status)
                self.send_header("content-type", "application/json" if status == 200 else "text/plain")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = serve(self.server, tls)

    @property
    def url(self):
        return "%s://%s:%d/connect" % (self.scheme, *self.server.server_address)

    def answer(self, path, body):
        try:
            asked = json.loads(body)
            query = urllib.parse.urlsplit(asked["path"]).query
            name = urllib.parse.parse_qs(query).get("name", [""])[0]
        except (ValueError, KeyError, TypeError) as error:
            with self.lock:
                self.problems.append(f"the hook was POSTed {body!r} ({error})")
            return 400, b"bad request"
        with self.lock:
            if path != "/connect":
                self.problems.append(f"the hook was POSTed at {path}")
            self.asked[name] = asked
        if name == "ana":
            return 200, json.dumps({"user_id": "ana", "groups": ["staff"]}).encode()
        if name == "bob":
            return 200, b""
        if name == "eve":
            return 403, b"go away\nand this second line stays here"
        if name == "slow":
            time.sleep(SLOW)
            return 200, json.dumps({"user_id": "slow"}).encode()
        if name == "mallory":
            return 401, b"who are you?"
        if name == "broken":
            return 500, b"the hook is broken"
        if name == "odd":
            return 200, json.dumps({"user_id": 5}).encode()
        return 400, b"who is this?"

    def close_idle(self):
        """Closes the keep-alive connections it holds, as a server does after its keep-alive timeout."""
        with self.lock:
            held = list(self.sockets)
        for sock in held:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(held)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.close_idle()


async def open_client(url, name, user_agent=None):
    """Connects with `?name=NAME`; returns (ws, JSON greeting), or raises InvalidStatus when refused."""
    options = {} if user_agent is None else {"user_agent_header": user_agent}
    ws = await connect(f"{url}/?name={name}", open_timeout=PATIENCE, close_timeout=PATIENCE, **options)
    greeting = json.loads(await asyncio.wait_for(ws.recv(), PATIENCE))
    assert greeting.get("type") == "connected", f"{name}: not a JSON greeting: {greeting}"
    return ws, greeting


async def refused(url, name, status, reason):
    """Asserts that `name`'s handshake is refused with `status` and the body `reason`; returns the seconds it took."""
    started = time.monotonic()
    try:
        ws, greeting = await open_client(url, name)
    except InvalidStatus as error:
        took = time.monotonic() - started
        got = (error.response.status_code, error.response.body.decode(errors="replace"))
        assert got == (status, reason + "\n"), f"{name} at {url}: expected HTTP {status} {reason!r}, got {got}"
        step(f"  {name} at {url}: HTTP {status} {reason!r} after {took:.2f}s")
        return took
    await ws.close()
    raise AssertionError(f"{name} at {url}: expected HTTP {status}, got in: {greeting}")


async def anonymous(url, name):
    """Asserts that `name` gets in anonymous; returns the seconds it took."""
    started = time.monotonic()
    ws, greeting = await open_client(url, name)
    took = time.monotonic() - started
    await ws.close()
    assert "user_id" not in greeting, f"{name} at {url}: expected an anonymous greeting, got {greeting}"
    step(f"  {name} at {url}: in, anonymous, after {took:.2f}s")
    return took


def publish(http_url, request):
    data = json.dumps(request).encode()
    call = urllib.request.Request(f"{http_url}/v1/publish", data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(call, timeout=PATIENCE) as answer:
        return answer.status, json.loads(answer.read())


async def scenario(hook, urls, pb, pb_grpc):
    a_ws, b_ws = urls["a_ws"], urls["b_ws"]
    # The group exists once ConsumeEvents answered (start() waits for its headers): bob's connect is its.
    audit = Instance(pb, pb_grpc, "audit", "audit-1", [urls["a_broker"]]).start()
    try:
        step("bob: the hook answers 200 with no body: in, anonymous")
        bob_ws, greeting = await open_client(a_ws, "bob")
        assert "user_id" not in greeting, f"bob's greeting names a user: {greeting}"
        bob = Connection("bob", greeting["worker_id"], greeting["connection_id"], "%s:%d" % bob_ws.local_address[:2])
        wait_until("bob's connect event", lambda: audit.events())

        step("ana: the hook answers user ana in group staff: her greeting names her")
        agent = "herald-e2e ana/1.0"
        ana_ws, greeting = await open_client(a_ws, "ana", user_agent=agent)
        assert greeting.get("user_id") == "ana", f"ana's greeting: {greeting}"
        ana = Connection(
            "ana", greeting["worker_id"], greeting["connection_id"], "%s:%d" % ana_ws.local_address[:2], user_id="ana"
        )
        with hook.lock:
            asked = hook.asked["ana"]
        assert set(asked) == {"remote_address", "path", "headers", "client_protocol"}, f"the hook was told {asked}"
        assert asked["path"] == "/?name=ana", f"the hook was told the path {asked['path']!r}"
        assert asked["remote_address"] == ana.local_address, (
            f"the hook was told ana is at {asked['remote_address']}; she is at {ana.local_address}"
        )
        assert asked["client_protocol"] == "", f"the hook was told the subprotocol {asked['client_protocol']!r}"
        headers = asked["headers"]
        assert all(name == name.lower() for name in headers), f"header names not in lower case: {sorted(headers)}"
        assert headers.get("user-agent") == agent, f"the hook was told the user-agent {headers.get('user-agent')!r}"
        assert headers.get("upgrade", "").lower() == "websocket", f"the hook was told the headers {headers}"

        step("a publish to group staff through A's HTTP gateway reaches ana, not bob")
        status, answer = publish(urls["a_http"], {"target": {"group": "staff"}, "content": {"text": "for the staff"}})
        assert status == 200, f"POST /v1/publish: HTTP {status} {answer}"
        got = await asyncio.wait_for(ana_ws.recv(), PATIENCE)
        assert got == "for the staff", f"ana received {got!r}"
        try:
            stray = await asyncio.wait_for(bob_ws.recv(), QUIET)
            raise AssertionError(f"bob, not in staff, received {stray!r}")
        except TimeoutError:
            pass
        ana.sent.append(("text", "ana here"))
        await ana_ws.send("ana here")

        step("eve: the hook answers 403: her handshake is refused with 403 and its first line")
        await refused(a_ws, "eve", 403, "go away")

        step("mallory: the hook answers 401: her handshake is refused with 401")
        await refused(a_ws, "mallory", 401, "who are you?")

        step(f"slow: the hook answers after {SLOW}s, past the {TIMEOUT}s timeout: down")
        took = await refused(a_ws, "slow", 503, DOWN_REASON)
        assert took < SLOW - 0.2, f"A waited {took:.2f}s for a hook it gives {TIMEOUT}s"
        took = await anonymous(b_ws, "slow")
        assert took < SLOW - 0.2, f"B waited {took:.2f}s for a hook it gives {TIMEOUT}s"

        step("broken: the hook answers 500: down")
        await refused(a_ws, "broken", 503, DOWN_REASON)
        await anonymous(b_ws, "broken")

        step("odd: the hook answers 200 with a user id that is not a string: down")
        await refused(a_ws, "odd", 503, DOWN_REASON)
        await anonymous(b_ws, "odd")

        step("the hook closes its idle keep-alive connections: the next handshakes still ask it")
        closed = hook.close_idle()
        time.sleep(0.3)
        step(f"  closed {closed} idle connections")
        await refused(a_ws, "eve", 403, "go away")
        await refused(b_ws, "eve", 403, "go away")

        step("the hook stops: A refuses with 503, B lets clients in anonymous")
        hook.stop()
        await refused(a_ws, "ana", 503, DOWN_REASON)
        await anonymous(b_ws, "ana")

        step("ana and bob leave")
        await ana_ws.close(1000, "bye")
        await bob_ws.close(1000, "bye")
        connections = [bob, ana]
        wait_until("ana's and bob's events", lambda: len(audit.events()) >= 5)
        time.sleep(QUIET)
        step(check_group(pb, "audit", [audit], connections))
        events = [event for event, _ in audit.events()]
        connects = {e.connection.connection_id: e.connect for e in events if e.WhichOneof("kind") == "connect"}
        got = connects[ana.connection_id]
        assert list(got.groups) == ["staff"], f"ana's connect event has the groups {list(got.groups)}"
        assert dict(got.headers) == {"user-agent": agent}, f"ana's connect event has the headers {dict(got.headers)}"
        assert got.client_protocol == "", f"ana's connect event has the subprotocol {got.client_protocol!r}"
        got = connects[bob.connection_id]
        assert list(got.groups) == [], f"bob's connect event has the groups {list(got.groups)}"
        assert list(got.headers) == ["user-agent"], f"bob's connect event has the headers {dict(got.headers)}"
        with hook.lock:
            assert not hook.problems, "\n".join(hook.problems)
    finally:
        audit.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tls_arguments(parser)
    args = parser.parse_args()
    pb, pb_grpc = stubs()
    hook = Hook(tls_of(args))
    print(f"listening {hook.url}", flush=True)
    command, _, argument = sys.stdin.readline().strip().partition(" ")
    assert command == "go", f"expected 'go {{...}}', got {command!r}"
    try:
        asyncio.run(scenario(hook, json.loads(argument), pb, pb_grpc))
    finally:
        hook.stop()
    print("backend_hook: all checks passed", flush=True)


if __name__ == "__main__":
    main()

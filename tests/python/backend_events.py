"""Consumes herald's connection events in consumer groups with Python grpcio
stubs while real clients connect, talk and leave, and checks that each group
got every event exactly once.

Two groups: "billing" (two instances, which must share its events) and
"audit" (one). Every instance records every delivery raw and acknowledges
what it got, at once or every fraction of a second (so that it holds a few
deliveries at any time); nothing is de-duplicated, so an event id delivered twice to a
group is a failure. Each client connection must cause, in each group,
exactly: connect (from the client's own address), its text message, its
binary message, and a disconnect with cause CLIENT and code 1000, all on the
address its greeting named.

standalone: one herald (--events all) at --broker/--ws. The clients are
  `websockets` raw clients and a headless Chromium page (its own WebSocket
  API, no library) when --chromium and --chromedriver are given.

cluster: --consumer GROUP=BROKER,BROKER,... (repeatable; an instance fails
  over down its list), clients spread over every --ws gateway for
  --duration seconds. After --kill-after seconds the script prints `kill`
  and waits for a line on its standard input (the caller SIGKILLs the
  broker --killed meanwhile); the instances that were on it must move to
  another broker, acknowledge there what they had not (at least one of
  them held some), and go on. A
  redelivery (delivery count past 1) is allowed there for events no
  instance had been handed; an id handed twice is not.

Usage: backend_events.py standalone --broker HOST:PORT --ws URL [--chromium PATH --chromedriver PATH]
       backend_events.py cluster --consumer GROUP=B1,B2,B3 ... --ws URL ... --killed B1
Exits non-zero, saying what differed, on any mismatch.
"""

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import threading
import time

from backend_support import (
    Connection,
    Instance,
    check_group,
    describe,
    expected_count,
    group_has_all,
    parse_text_greeting,
    step,
    stubs,
    talk_and_leave,
    wait_until,
)

QUIET = 0.5

BROWSER_SOCKETS = """
const [url, count] = arguments;
window.sockets = [];
for (let i = 0; i < count; i++) {
  const s = {
    greeting: null, text: `browser socket ${i}: héllo ✓`, bytes: [255, 0, i, 127, 128], close: null, errors: 0,
  };
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (e) => {
    if (s.greeting !== null) return;
    s.greeting = e.data;
    ws.send(s.text);
    ws.send(new Uint8Array(s.bytes));
    ws.close(1000, "done");
  };
  ws.onerror = () => { s.errors += 1; };
  ws.onclose = (e) => { s.close = [e.code, e.reason, e.wasClean]; };
  window.sockets.push(s);
}
"""

BROWSER_REPORT = """
return window.sockets.map(({ greeting, text, bytes, close, errors }) => ({ greeting, text, bytes, close, errors }));
"""


class Browser:
    """Headless Chromium on a page of its own, started in the background (the slow part)."""

    def __init__(self, chromium, chromedriver):
        os.environ["SE_OFFLINE"] = "true"
        from browser_alerts import serve_page, start_browser

        self.profile = tempfile.mkdtemp(prefix="herald-chromium-")
        self.page = serve_page()
        self.driver = None
        self.error = None
        self.ready = threading.Event()

        def run():
            try:
                self.driver = start_browser(chromium, chromedriver, self.profile)
                self.driver.get("http://%s:%d/" % self.page.server_address)
            except Exception as error:  # noqa: BLE001 (reported by connections())
                self.error = error
            self.ready.set()

        threading.Thread(target=run, daemon=True).start()

    def connections(self, url, count):
        """Opens `count` WebSockets in the page; each sends a text and a binary message after its greeting,
        then closes with 1000. Returns their Connections once all are closed."""
        assert self.ready.wait(30), "Chromium did not start within 30s"
        assert self.error is None, f"Chromium did not start: {self.error}"
        self.driver.execute_script(BROWSER_SOCKETS, url, count)
        deadline = time.monotonic() + 10
        while True:
            report = self.driver.execute_script(BROWSER_REPORT)
            if all(s["close"] for s in report) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        connections = []
        for i, s in enumerate(report):
            assert s["close"] == [1000, "done", True], f"browser socket {i} did not close cleanly: {s}"
            assert s["errors"] == 0, f"browser socket {i} had errors: {s}"
            worker_id, connection_id = parse_text_greeting(s["greeting"])
            conn = Connection(f"browser-{i}", worker_id, connection_id, None)
            conn.sent = [("text", s["text"]), ("binary", bytes(s["bytes"]))]
            connections.append(conn)
        return connections

    def close(self):
        if self.driver is not None:
            self.driver.quit()
        self.page.shutdown()
        shutil.rmtree(self.profile, ignore_errors=True)


def wait_for_connects(groups, conns, within=10):
    """Waits until every group has the connect event of every connection in `conns`:
    the groups exist, and events reach them."""
    addresses = {c.address for c in conns}

    def seen(instances):
        got = {
            (e.connection.worker_id, e.connection.connection_id)
            for inst in instances
            for e, _ in inst.events()
            if e.WhichOneof("kind") == "connect"
        }
        return addresses <= got

    wait_until("the probes' connect events in every group", lambda: all(seen(i) for i in groups.values()), within)


def settle(everything_arrived, within):
    """Waits until every event arrived, or `within` seconds; the checks that follow say what is missing."""
    try:
        wait_until("every event in every group", everything_arrived, within)
    except AssertionError as error:
        step(f"{error}: what is missing follows")


def standalone(args, pb, pb_grpc):
    browser = Browser(args.chromium, args.chromedriver) if args.chromium else None
    try:
        step("consumers: billing-1 and billing-2 (at most 4 unacknowledged each, acknowledged every 0.1s), audit-1")
        groups = {
            "billing": [
                Instance(pb, pb_grpc, "billing", f"billing-{n}", [args.broker], max_unacked=4, ack_every=0.1).start()
                for n in (1, 2)
            ],
            "audit": [Instance(pb, pb_grpc, "audit", "audit-1", [args.broker]).start()],
        }
        # The groups exist once ConsumeEvents answered (start() waits for its headers).
        step("a probe connects, talks and leaves at once: its events are the groups' too")
        probe = asyncio.run(talk_and_leave(args.ws, "probe"))

        async def raw_clients():
            clients = (talk_and_leave(args.ws, f"raw-{n}", pause=0.02 * n) for n in range(args.clients))
            return await asyncio.gather(*clients)

        async def everyone():
            raw = raw_clients()
            if browser is None:
                return list(await raw)
            in_browser = asyncio.to_thread(browser.connections, args.ws, args.browser_sockets)
            raw, in_browser = await asyncio.gather(raw, in_browser)
            return list(raw) + in_browser

        in_browser = args.browser_sockets if browser else 0
        step(f"{args.clients} raw clients and {in_browser} browser sockets connect, talk, leave")
        connections = [probe] + asyncio.run(everyone())
        for conn in connections:
            step(f"  {conn.label}: {conn.worker_id}/{conn.connection_id} from {conn.local_address or 'Chromium'}")
        total = expected_count(connections)
        step(f"expected events: {total} per group")
        settle(lambda: all(group_has_all(i, connections) for i in groups.values()), within=10)
        time.sleep(QUIET)
        for name, instances in groups.items():
            step(check_group(pb, name, instances, connections))
        for inst in groups["billing"]:
            assert inst.events(), f"{inst.name} got no event: billing's events were not shared"
        arrivals = {}
        for event, _ in groups["audit"][0].events():
            address = (event.connection.worker_id, event.connection.connection_id)
            arrivals.setdefault(address, []).append(describe(pb, event))
        for conn in connections:
            assert arrivals[conn.address] == conn.expected(), (
                f"audit-1, alone in its group, got {conn.label}'s events out of order: {arrivals[conn.address]}"
            )
        for instances in groups.values():
            for inst in instances:
                inst.stop()
    finally:
        if browser is not None:
            browser.close()


def cluster(args, pb, pb_grpc):
    groups = {}
    for spec in args.consumer:
        group, _, brokers = spec.partition("=")
        name = f"{group}-{len(groups.get(group, [])) + 1}"
        step(f"consumer {name} on {brokers}")
        instance = Instance(pb, pb_grpc, group, name, brokers.split(","), ack_every=args.ack_every)
        groups.setdefault(group, []).append(instance.start())
    on_killed = [inst.name for instances in groups.values() for inst in instances if inst.broker == args.killed]

    step(f"a probe on each of {len(args.ws)} gateways: their events reach every group")
    async def probe_each():
        return await asyncio.gather(*(talk_and_leave(url, f"probe-{i}") for i, url in enumerate(args.ws)))

    probes = list(asyncio.run(probe_each()))
    wait_for_connects(groups, probes)

    async def steady():
        loop = asyncio.get_running_loop()
        started = loop.time()
        tasks = []
        killed = False
        n = 0
        while loop.time() - started < args.duration:
            url = args.ws[n % len(args.ws)]
            tasks.append(asyncio.create_task(talk_and_leave(url, f"c{n}", pause=random.uniform(0, 0.8))))
            n += 1
            if not killed and loop.time() - started >= args.kill_after:
                killed = True
                step(f"kill {args.killed} ({len(tasks)} clients so far)")
                print("kill", flush=True)
                answer = await asyncio.to_thread(sys.stdin.readline)
                assert answer.strip() == "killed", f"expected 'killed', got {answer!r}"
                step(f"{args.killed} is dead")
            await asyncio.sleep(args.interval)
        return await asyncio.gather(*tasks)

    step(f"clients connect, talk and leave for {args.duration}s across the gateways")
    connections = probes + list(asyncio.run(steady()))
    step(f"{len(connections)} connections; expected events: {expected_count(connections)} per group")
    settle(lambda: all(group_has_all(i, connections) for i in groups.values()), within=args.settle)
    step(f"waiting {args.quiet}s (past the ack wait) for any event handed out again")
    time.sleep(args.quiet)
    for instances in groups.values():
        for inst in instances:
            step(
                f"{inst.name}: {len(inst.events())} deliveries, {inst.failed_acks} failed acks, "
                f"{inst.reacked} acknowledged on another broker; now on {inst.broker}, moves {inst.moves}"
            )
    moved = [i for instances in groups.values() for i in instances if i.name in on_killed]
    for inst in moved:
        assert inst.moves, f"{inst.name} was on {args.killed} and never moved"
    assert any(inst.reacked for inst in moved), (
        f"none of {on_killed} held an unacknowledged delivery when {args.killed} died: nothing was re-acknowledged"
    )
    summaries = [
        check_group(pb, name, instances, connections, redelivery_allowed=True) for name, instances in groups.items()
    ]
    for summary in summaries:
        step(summary)
    for instances in groups.values():
        for inst in instances:
            inst.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    one = modes.add_parser("standalone")
    one.add_argument("--broker", required=True, help="the broker, host:port")
    one.add_argument("--ws", required=True, help="the WebSocket listener, ws://host:port")
    one.add_argument("--clients", type=int, default=6, help="raw clients besides the probe")
    one.add_argument("--browser-sockets", type=int, default=2)
    one.add_argument("--chromium")
    one.add_argument("--chromedriver")
    many = modes.add_parser("cluster")
    many.add_argument("--consumer", action="append", required=True, help="GROUP=BROKER,BROKER,...")
    many.add_argument("--ws", action="append", required=True, help="a gateway, ws://host:port")
    many.add_argument("--killed", required=True, help="the broker the caller kills, host:port")
    many.add_argument("--duration", type=float, default=6.0)
    many.add_argument("--interval", type=float, default=0.08, help="seconds between two new clients")
    many.add_argument(
        "--ack-every", type=float, default=0.2, help="seconds between an instance's acknowledgements"
    )
    many.add_argument("--kill-after", type=float, default=2.5)
    many.add_argument("--settle", type=float, default=20.0, help="how long every event may take to arrive")
    many.add_argument("--quiet", type=float, default=4.0, help="how long to watch for late redeliveries")
    args = parser.parse_args()

    pb, pb_grpc = stubs()
    if args.mode == "standalone":
        standalone(args, pb, pb_grpc)
    else:
        cluster(args, pb, pb_grpc)
    print("backend_events: all checks passed", flush=True)


if __name__ == "__main__":
    main()

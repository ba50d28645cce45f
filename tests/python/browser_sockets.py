"""Holds WebSocket connections open in headless Chromium and reports what each received.

Opens a page served from 127.0.0.1, as a site would be, and runs in it a
script that opens one WebSocket per `--socket NAME=URL` with the browser's own
WebSocket API (a token goes in the URL, `?token=<jwt>`, as browsers cannot set
headers on a WebSocket) and records, per socket, every message, its
readyState, the subprotocol the server chose and its close event. A
`--protocol-socket NAME=URL` asks for herald's client protocol
(`new WebSocket(url, "herald.json.v1")`).

The caller drives it line by line:

  out: `ready {"NAME": "<first message>", ...}` once every socket has received
       its first message (the greeting), or `failed <report>` if one did not
       within PATIENCE seconds;
  in:  `send {"NAME": "TEXT", ...}`: sends TEXT on socket NAME; answers
  out: `sent {}`;
  in:  `wait {"NAME": N, ...}`: waits (up to PATIENCE) until socket NAME has
       received N messages, greeting included, then QUIET seconds more for
       anything unexpected, and answers
  out: `report {"NAME": {"messages": [...], "state": S, "protocol": P, "close": [code, reason] or null}, ...}`;
  in:  `quit` (or end of input): closes the browser and exits.

The script asserts nothing about herald: the caller checks the report.

Usage: browser_sockets.py --socket NAME=URL [--socket NAME=URL ...] [--protocol-socket NAME=URL ...]
                          [--chromium PATH] [--chromedriver PATH]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

# Debian's chromium and chromedriver are given explicitly: Selenium Manager
# must never try to download a browser or a driver.
os.environ["SE_OFFLINE"] = "true"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from browser_alerts import serve_page, start_browser  # noqa: E402

PATIENCE = 10
QUIET = 0.5

OPEN_SOCKETS = """
const sockets = arguments[0];
window.herald = {};
for (const [name, [url, protocol]] of Object.entries(sockets)) {
    const ws = protocol ? new WebSocket(url, protocol) : new WebSocket(url);
    const state = { messages: [], close: null, ws };
    state.ws.onmessage = (e) => state.messages.push(typeof e.data === "string" ? e.data : "<binary>");
    state.ws.onclose = (e) => { state.close = [e.code, e.reason]; };
    window.herald[name] = state;
}
"""

SEND = """
for (const [name, text] of Object.entries(arguments[0])) {
    window.herald[name].ws.send(text);
}
"""

REPORT = """
const report = {};
for (const [name, s] of Object.entries(window.herald)) {
    report[name] = { messages: s.messages.slice(), state: s.ws.readyState, protocol: s.ws.protocol, close: s.close };
}
return report;
"""


def log(text):
    print(f"browser_sockets: {text}", file=sys.stderr, flush=True)


def say(line):
    print(line, flush=True)


def report(driver):
    return driver.execute_script(REPORT)


def wait_for(driver, condition):
    """Polls the report until `condition(report)` holds or PATIENCE passes; returns the last report."""
    deadline = time.monotonic() + PATIENCE
    while True:
        current = report(driver)
        if condition(current) or time.monotonic() > deadline:
            return current
        time.sleep(0.05)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", action="append", default=[], help="NAME=URL of a WebSocket to open")
    parser.add_argument(
        "--protocol-socket", action="append", default=[], help="NAME=URL of a WebSocket speaking herald.json.v1"
    )
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()
    sockets = {name: [url, None] for name, url in (s.split("=", 1) for s in args.socket)}
    sockets.update({name: [url, "herald.json.v1"] for name, url in (s.split("=", 1) for s in args.protocol_socket)})
    if not sockets:
        parser.error("give at least one --socket or --protocol-socket")

    profile = tempfile.mkdtemp(prefix="herald-chromium-")
    page = serve_page()
    driver = None
    try:
        log(f"starting headless {args.chromium} through {args.chromedriver}")
        driver = start_browser(args.chromium, args.chromedriver, profile)
        driver.get("http://%s:%d/" % page.server_address)
        log(f"opening {', '.join(sockets)}")
        driver.execute_script(OPEN_SOCKETS, sockets)
        opened = wait_for(driver, lambda r: all(s["messages"] for s in r.values()))
        if not all(s["messages"] for s in opened.values()):
            say("failed " + json.dumps(opened))
            return
        say("ready " + json.dumps({name: s["messages"][0] for name, s in opened.items()}))
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "wait":
                counts = json.loads(argument)
                wait_for(driver, lambda r: all(len(r[n]["messages"]) >= c for n, c in counts.items()))
                time.sleep(QUIET)
                say("report " + json.dumps(report(driver)))
            elif command == "send":
                driver.execute_script(SEND, json.loads(argument))
                say("sent {}")
            elif command == "quit":
                break
            else:
                say(f"failed unknown command {command!r}")
    finally:
        if driver is not None:
            driver.quit()
        page.shutdown()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()

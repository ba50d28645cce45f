"""Follows a channel in headless Chromium with the packed herald-client library, and reports what arrived.

Starts Chromium at once, then waits to be told what to open: the caller
meanwhile readies the library and the servers. Serves, from its own HTTP
server on 127.0.0.1, a page and the library's ES modules: the `dist/` of the
packed package (e.g. `package/dist` of the extracted `npm pack` tarball) at
`/dist/`. The page, as an app would, does
`import { HeraldClient } from "./dist/index.js"`, makes
`new HeraldClient([GATEWAY, ...])`, subscribes to the channel, connects, and
records in `window.follower`, in order: every publication's text, every
`onSubscribed` info, the worker id of every connection (`connected` events),
every `disconnected` event, and every error.

The caller drives it line by line:

  in:  `open {"dist": DIR, "gateways": [URL, ...], "channel": CHANNEL}`,
       once: opens the page; answers
  out: `ready <report>` once the subscription first took effect, or
       `failed <report>` (the report `null` if the page did not even start)
       if not within PATIENCE seconds;
  in:  `wait {"publications": N, "within": SECONDS}`: waits until the page
       has N publications, or SECONDS pass; answers
  out: `count N` with the number it has;
  in:  `report`: waits QUIET seconds for anything unexpected, then answers
  out: `report {"publications": [TEXT, ...], "subscribed": [{"resubscribed",
       "recoverable", "recovered", "position"}, ...], "connected": [WORKER_ID, ...],
       "disconnected": [[CODE, REASON], ...], "errors": [TEXT, ...]}`;
  in:  `quit` (or end of input): closes the browser and exits.

The script asserts nothing about herald: the caller checks the report.

Usage: browser_recovery.py [--chromium PATH] [--chromedriver PATH]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse

# Debian's chromium and chromedriver are given explicitly: Selenium Manager
# must never try to download a browser or a driver.
os.environ["SE_OFFLINE"] = "true"

from selenium.common.exceptions import TimeoutException  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from browser_alerts import start_browser  # noqa: E402
import library_server  # noqa: E402

PATIENCE = 10
QUIET = 0.5

PAGE = b"""<!doctype html>
<html>
<head>
<title>herald recovery</title>
<link rel="icon" href="data:,">
<script>
// A classic script, run first: the errors of the module below, loading it included, are recorded too.
window.follower = { publications: [], subscribed: [], connected: [], disconnected: [], errors: [] };
window.addEventListener("error", (event) => window.follower.errors.push(String(event.message)));
window.addEventListener("unhandledrejection", (event) => window.follower.errors.push(String(event.reason)));
</script>
<script type="module">
import { HeraldClient } from "./dist/index.js";

const query = new URLSearchParams(location.search);
const follower = window.follower;
// Promises of until(count), each settled once that many publications arrived.
const waiting = [];
const settle = () => {
  for (const waiter of waiting.filter(({ count }) => follower.publications.length >= count)) {
    waiting.splice(waiting.indexOf(waiter), 1);
    waiter.resolve(follower.publications.length);
  }
};
window.until = (count) => new Promise((resolve) => (waiting.push({ count, resolve }), settle()));

const client = new HeraldClient(query.getAll("gateway"));
client.on("connected", ({ workerId }) => follower.connected.push(workerId));
client.on("disconnected", ({ code, reason }) => follower.disconnected.push([code, reason]));
client.on("error", (error) => follower.errors.push(String(error)));
client.subscribe(query.get("channel"), {
  onPublication: ({ text }) => (follower.publications.push(text), settle()),
  onSubscribed: (info) => follower.subscribed.push(info),
});
client.connect();
</script>
</head>
<body></body>
</html>
"""

COUNT = "return window.follower.publications.length;"
UNTIL = "window.until(arguments[0]).then(arguments[arguments.length - 1]);"
REPORT = "return window.follower ?? null;"


def log(text):
    print(f"browser_recovery: {text}", file=sys.stderr, flush=True)


def say(line):
    print(line, flush=True)


def serve_library(dist):
    """Starts the page and module server (see library_server); returns it."""
    return library_server.serve_library(dist, PAGE, log)


def wait_for_count(driver, wanted, within):
    """Waits, without polling, until the page has `wanted` publications or `within` seconds pass; returns its count."""
    driver.set_script_timeout(within)
    try:
        return driver.execute_async_script(UNTIL, wanted)
    except TimeoutException:
        return driver.execute_script(COUNT)
    finally:
        driver.set_script_timeout(PATIENCE)


def report(driver):
    return driver.execute_script(REPORT)


def subscribed(driver):
    """Whether the page's subscription took effect yet."""
    state = report(driver)
    return state is not None and len(state["subscribed"]) > 0


def wait_for(condition, within):
    """Polls `condition()` until it holds or `within` seconds pass; returns whether it held."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def open_page(driver, dist, gateways, channel):
    """Serves the library from `dist` and opens the page; returns the server."""
    server = serve_library(dist)
    query = urllib.parse.urlencode([("channel", channel)] + [("gateway", url) for url in gateways])
    page = "http://%s:%d/?%s" % (*server.server_address, query)
    log(f"opening {page}")
    driver.get(page)
    return server


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()

    profile = tempfile.mkdtemp(prefix="herald-chromium-")
    server = None
    driver = None
    try:
        log(f"starting headless {args.chromium} through {args.chromedriver}")
        driver = start_browser(args.chromium, args.chromedriver, profile)

        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "open":
                page = json.loads(argument)
                server = open_page(driver, page["dist"], page["gateways"], page["channel"])
                outcome = "ready" if wait_for(lambda: subscribed(driver), PATIENCE) else "failed"
                say(f"{outcome} {json.dumps(report(driver))}")
            elif command == "wait":
                wanted = json.loads(argument)
                say(f"count {wait_for_count(driver, wanted['publications'], wanted['within'])}")
            elif command == "report":
                time.sleep(QUIET)
                say("report " + json.dumps(report(driver)))
            elif command == "quit":
                break
            else:
                say(f"failed unknown command {command!r}")
    finally:
        if driver is not None:
            driver.quit()
        if server is not None:
            server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()

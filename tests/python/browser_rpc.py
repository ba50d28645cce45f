"""A page in headless Chromium that calls herald's backends through the packed JavaScript client.

The caller (tests/e2e/browser_rpc.rs) starts this script, which starts the
browser, while it readies the library and the servers. Serves, from its own
HTTP server on 127.0.0.1, a page and the library's ES modules: the `dist/`
of the packed package (`package/dist` of the extracted `npm pack` tarball)
at `/dist/`. The page, as an app would, does
`import { HeraldClient } from "./dist/index.js"`, makes
`new HeraldClient(GATEWAY, { token })` (the token, when given, goes in the
client's `connect` command), connects, then, in order, makes each rpc of the
plan and sends the plan's message, recording every outcome in
`window.caller`.

The caller drives it line by line:

  in:  `open {"dist": DIR, "plan": {"gateway": URL, "token": JWT or null,
       "rpcs": [[METHOD, TEXT], ...], "send": TEXT}}`, once: opens the page;
       answers
  out: `report <report>` once the page went through its plan, or
       `failed <report>` (the report `null` if the page did not even start)
       if not within PATIENCE seconds, where the report is
       {"connected": {"workerId", "connectionId", "userId"} or null,
        "rpcs": [{"answer": {"text": T} or {"binary": [BYTE, ...]}} or
                 {"error": {"name", "code", "message"}}, ...],
        "sent": true or {"error": {...}}, "errors": [TEXT, ...],
        "done": true or false};
  in:  `quit` (or end of input): closes the browser and exits.

The script asserts nothing about herald: the caller checks the report.

Usage: browser_rpc.py [--chromium PATH] [--chromedriver PATH]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from browser_alerts import start_browser  # noqa: E402
import library_server  # noqa: E402

PATIENCE = 10

PAGE = b"""<!doctype html>
<html>
<head>
<title>herald rpc</title>
<link rel="icon" href="data:,">
<script>
// A classic script, run first: the errors of the module below, loading it included, are recorded too.
window.caller = { connected: null, rpcs: [], sent: null, errors: [], done: false };
window.addEventListener("error", (event) => window.caller.errors.push(String(event.message)));
window.addEventListener("unhandledrejection", (event) => window.caller.errors.push(String(event.reason)));
</script>
<script type="module">
import { HeraldClient } from "./dist/index.js";

const plan = JSON.parse(new URLSearchParams(location.search).get("plan"));
const caller = window.caller;
const failure = (error) => ({ error: { name: error.name, code: error.code, message: error.message } });

const client = new HeraldClient(plan.gateway, plan.token ? { token: plan.token } : {});
client.on("error", (error) => caller.errors.push(String(error)));
const connected = new Promise((resolve) => {
  const off = client.on("connected", (info) => (off(), resolve(info)));
});
client.connect();
caller.connected = await connected;
for (const [method, data] of plan.rpcs) {
  try {
    const answer = await client.rpc(method, data);
    caller.rpcs.push({ answer: typeof answer === "string" ? { text: answer } : { binary: Array.from(answer) } });
  } catch (error) {
    caller.rpcs.push(failure(error));
  }
}
try {
  await client.send(plan.send);
  caller.sent = true;
} catch (error) {
  caller.sent = failure(error);
}
caller.done = true;
</script>
</head>
<body></body>
</html>
"""

REPORT = "return window.caller ?? null;"


def log(text):
    print(f"browser_rpc: {text}", file=sys.stderr, flush=True)


def say(line):
    print(line, flush=True)


def serve_library(dist):
    """Starts the page and module server (see library_server); returns it."""
    return library_server.serve_library(dist, PAGE, log)


def report(driver):
    return driver.execute_script(REPORT)


def done(driver):
    """Whether the page went through its plan."""
    state = report(driver)
    return state is not None and state["done"]


def wait_for(condition, within):
    """Polls `condition()` until it holds or `within` seconds pass; returns whether it held."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


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
                server = serve_library(page["dist"])
                query = urllib.parse.urlencode({"plan": json.dumps(page["plan"])})
                url = "http://%s:%d/?%s" % (*server.server_address, query)
                log(f"opening {url}")
                driver.get(url)
                outcome = "report" if wait_for(lambda: done(driver), PATIENCE) else "failed"
                say(f"{outcome} {json.dumps(report(driver))}")
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

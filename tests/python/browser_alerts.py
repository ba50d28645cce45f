"""The classic example's test session, in headless Chromium.

Opens a page served from 127.0.0.1, as a site would be (from about:blank,
Chromium closes a WebSocket to loopback at once with 1006), and runs in it,
as if typed into the console, the classic Channel example's JavaScript snippet, unchanged but
for the address:

    ws = new WebSocket("ws://...");
    ws.onmessage = function(e) {
        alert("Mensagem recebida do servidor: " + e.data);
    };

then publishes with curl through the HTTP gateway, once to everyone
(`/?content=...`) and once to this browser's connection alone
(`/?to_worker_id=..&to_connection_id=..&content=..`, with the ids read from
the greeting alert), and checks that each arrives as exactly one alert.

Usage: browser_alerts.py --ws-url ws://HOST:PORT --http-url http://HOST:PORT
                         [--chromium PATH] [--chromedriver PATH]
Exits non-zero, saying what differed, on any mismatch.
"""

import argparse
import http.server
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse

# Debian's chromium and chromedriver are given explicitly: Selenium Manager
# must never try to download a browser or a driver.
os.environ["SE_OFFLINE"] = "true"

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PATIENCE = 10
QUIET = 0.5
PREFIX = "Mensagem recebida do servidor: "
SEED_SNIPPET = """
ws = new WebSocket("{url}");
ws.onmessage = function(e) {{
    alert("Mensagem recebida do servidor: " + e.data);
}};
"""


def step(text):
    print(f"- {text}", flush=True)


class PageHandler(http.server.BaseHTTPRequestHandler):
    """Serves one empty page at `/`, and 404 for anything else."""

    PAGE = b"<!doctype html><html><head><title>herald</title></head><body></body></html>"

    def do_GET(self):  # noqa: N802 (the name http.server dispatches to)
        found = self.path == "/"
        body = self.PAGE if found else b"not found"
        self.send_response(200 if found else 404)
        self.send_header("content-type", "text/html; charset=utf-8" if found else "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        pass


def serve_page():
    """Starts the page server on an ephemeral loopback port; returns it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_browser(chromium, chromedriver, profile):
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    # Alerts stay open until this script reads and accepts them.
    options.unhandled_prompt_behavior = "ignore"
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(PATIENCE)
    driver.set_script_timeout(PATIENCE)
    return driver


def next_alert(driver, what):
    """Waits for the next alert, accepts it and returns its text."""
    try:
        alert = WebDriverWait(driver, PATIENCE).until(EC.alert_is_present())
    except TimeoutException:
        raise AssertionError(f"no alert for {what} within {PATIENCE}s") from None
    text = alert.text
    alert.accept()
    step(f"  alert: {text!r}")
    return text


def expect_no_alert(driver):
    time.sleep(QUIET)
    if EC.alert_is_present()(driver):
        raise AssertionError(f"unexpected alert: {driver.switch_to.alert.text!r}")


def curl(url):
    step(f"curl '{url}'")
    result = subprocess.run(
        ["curl", "-sS", "--max-time", str(PATIENCE), "-w", "\n%{http_code}", url],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"curl failed ({result.returncode}): {result.stderr}"
    body, _, status = result.stdout.rpartition("\n")
    assert (status, body) == ("200", "ok"), f"curl {url}: HTTP {status}: {body!r}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ws-url", required=True, help="the WebSocket gateway, ws://host:port")
    parser.add_argument("--http-url", required=True, help="the HTTP gateway, http://host:port")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()

    profile = tempfile.mkdtemp(prefix="herald-chromium-")
    page = serve_page()
    driver = None
    try:
        step(f"starting headless {args.chromium} through {args.chromedriver}")
        driver = start_browser(args.chromium, args.chromedriver, profile)
        page_url = "http://%s:%d/" % page.server_address
        step(f"opening {page_url}")
        driver.get(page_url)

        step(f"running the classic Channel example's snippet against {args.ws_url}")
        driver.execute_script(SEED_SNIPPET.format(url=args.ws_url))
        greeting = next_alert(driver, "the greeting")
        match = re.fullmatch(
            re.escape(PREFIX) + r"Worker ID:([A-Za-z0-9._-]+) Connection ID:([A-Za-z0-9._-]+) connected", greeting
        )
        assert match, f"the greeting alert is not the classic greeting: {greeting!r}"
        worker_id, connection_id = match.groups()

        curl(f"{args.http_url}/?content=hello")
        assert next_alert(driver, "the broadcast") == PREFIX + "hello"

        content = "só para você"
        query = urllib.parse.urlencode(
            {"to_worker_id": worker_id, "to_connection_id": connection_id, "content": content}
        )
        curl(f"{args.http_url}/?{query}")
        assert next_alert(driver, "the targeted message") == PREFIX + content

        expect_no_alert(driver)
        state = driver.execute_script("return ws.readyState")
        assert state == 1, f"the WebSocket is no longer open (readyState {state})"
    finally:
        if driver is not None:
            driver.quit()
        page.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    print("browser_alerts: all checks passed", flush=True)


if __name__ == "__main__":
    main()

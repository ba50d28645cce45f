"""The live status page, in headless Chromium.

Opens the admin port's status page, publishes through the HTTP gateway while
it watches (so that rates and latency have something to show), then waits
until the page's figures settle on the expected totals, takes a screenshot
and prints the figures as JSON for the caller to check against /metrics.

Usage: status_page.py --status-url URL --http-url URL --screenshot PATH
                      --connections N --published-before N [--publish K]
Exits non-zero, saying what differed, on any mismatch.
"""

import argparse
import json
import shutil
import tempfile
import time
import urllib.request

from browser_alerts import PATIENCE, start_browser, step
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

FIGURES = ["connections", "published-total", "delivered-total", "published-rate", "latency-p50", "latency-p99"]


def figures(driver):
    return {name: driver.find_element(By.ID, name).text for name in FIGURES}


def wait_for(driver, what, predicate):
    try:
        WebDriverWait(driver, PATIENCE, poll_frequency=0.1).until(lambda d: predicate(figures(d)))
    except TimeoutException:
        raise SystemExit(f"the page never showed {what}; it shows {figures(driver)}") from None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--status-url", required=True)
    parser.add_argument("--http-url", required=True)
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--published-before", type=int, required=True)
    parser.add_argument("--publish", type=int, default=15)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()

    profile = tempfile.mkdtemp(prefix="herald-status-")
    driver = start_browser(args.chromium, args.chromedriver, profile)
    try:
        driver.set_window_size(1280, 1100)
        step(f"open {args.status_url}")
        driver.get(args.status_url)
        wait_for(driver, "the connection count", lambda f: f["connections"] == str(args.connections))

        step(f"publish {args.publish} broadcasts while the page watches")
        for i in range(args.publish):
            with urllib.request.urlopen(f"{args.http_url}/?content=status-{i}", timeout=PATIENCE) as reply:
                assert reply.read() == b"ok"
            time.sleep(0.2)
        wait_for(driver, "a live message rate and latency", lambda f: f["published-rate"] != "–" and f["latency-p99"] != "–")
        total = args.published_before + args.publish
        wait_for(driver, f"{total} messages published", lambda f: f["published-total"] == str(total))

        nodes = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "#nodes tr")]
        assert any(row.startswith("ws ") and "linked" in row for row in nodes), f"nodes table: {nodes}"
        assert any(row.startswith("broker ") for row in nodes), f"nodes table: {nodes}"
        lines = driver.find_elements(By.CSS_SELECTOR, "#latency polyline")
        assert len(lines) == 2, "the latency plot has its p50 and p99 lines"

        assert driver.save_screenshot(args.screenshot), "screenshot saved"
        step(f"screenshot: {args.screenshot}")
        print(json.dumps(figures(driver)))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Serves a test page and the packed JavaScript client's modules to headless Chromium.

`serve_library(dist, page, log)` starts an HTTP server on an ephemeral loopback port
that answers `/` (any query) with `page` and `/dist/NAME.js` with the module of that
name from the unpacked library's `dist` directory; anything else is a 404, logged
with `log`. Shared by the browser scripts that load the library.
"""

import functools
import http.server
import os
import re
import threading
import urllib.parse

MODULE_NAME = re.compile(r"/dist/([A-Za-z0-9_.-]+\.js)")


class LibraryHandler(http.server.BaseHTTPRequestHandler):
    """Serves the page at `/` (any query) and the library's modules at `/dist/NAME.js`; 404 for anything else."""

    def __init__(self, *args, dist, page, log, **kwargs):
        self.dist = dist
        self.page = page
        self.log = log
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802 (the name http.server dispatches to)
        path = urllib.parse.urlsplit(self.path).path
        module = MODULE_NAME.fullmatch(path)
        if path == "/":
            self.answer(200, "text/html; charset=utf-8", self.page)
        elif module and os.path.isfile(os.path.join(self.dist, module.group(1))):
            with open(os.path.join(self.dist, module.group(1)), "rb") as file:
                self.answer(200, "text/javascript; charset=utf-8", file.read())
        else:
            self.log(f"404 for {self.path}")
            self.answer(404, "text/plain", b"not found")

    def answer(self, status, content_type, body):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        pass


def serve_library(dist, page, log):
    """Starts the page and module server on an ephemeral loopback port; returns it."""
    handler = functools.partial(LibraryHandler, dist=dist, page=page, log=log)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

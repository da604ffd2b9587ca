"""The HTTP forwarding proxy the test gates share: tests/support/sts_gate.py
(the CSI tests' STS gate), tests/support/throttle_proxy.py (SSM's quota and
KMS refusals) and scripts/k8s_e2e/sts_gate.py (the cluster's IRSA gate).

A gate subclasses `Forwarding`, sets `upstream`, judges a request, and
either answers it itself with `reply` or passes it on with `forward` (or
`fetch`, to look at moto's answer before passing it on). `serve` runs it.
"""

import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Hop-by-hop and length headers: the proxy frames its own answer.
_FRAMING = ("transfer-encoding", "connection", "content-length")


class Forwarding(BaseHTTPRequestHandler):
    """One request: read it, answer it or forward it to `upstream`."""

    protocol_version = "HTTP/1.1"
    upstream = ""

    def log_message(self, *_):
        pass

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def reply(self, status, body: bytes, headers=()):
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _FRAMING:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply_json(self, status, document: str, headers=()):
        self.reply(status, document.encode(), [("Content-Type", "application/json"), *headers])

    def fetch(self, body: bytes):
        """Upstream's answer to this request with `body`: (status, headers, body)."""
        request = urllib.request.Request(self.upstream + self.path, data=body or None, method=self.command)
        for name, value in self.headers.items():
            if name.lower() not in ("host", "content-length", "connection"):
                request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, answer.getheaders(), answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.items(), error.read()

    def forward(self, body: bytes):
        status, headers, answered = self.fetch(body)
        self.reply(status, answered, headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that hung up (a daemon killed mid-call by a restart test)
        # is expected; anything else still prints its traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve(handler, upstream: str, host: str = "127.0.0.1", port: int = 0):
    """Serves `handler` in front of `upstream` until killed; with port 0,
    prints the port it got first (the tests read it)."""
    handler.upstream = upstream.rstrip("/")
    server = _Server((host, port), handler)
    if port == 0:
        print(server.server_address[1], flush=True)
    server.serve_forever()

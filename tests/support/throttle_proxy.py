"""A throttling proxy in front of an SSM endpoint, as SSM's account quota
behaves: a token bucket of RATE calls a second holding at most one second's
worth; a call past it gets SSM's ThrottlingException (HTTP 400, AWS JSON 1.1)
and never reaches the server. Prints its port, then serves until killed.
GET /counts answers {"admitted": N, "throttled": M}.

    python throttle_proxy.py UPSTREAM_URL RATE
"""

import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

upstream, rate = sys.argv[1].rstrip("/"), float(sys.argv[2])
lock = threading.Lock()
state = {"tokens": rate, "last": time.monotonic(), "admitted": 0, "throttled": 0}


def admit() -> bool:
    with lock:
        now = time.monotonic()
        state["tokens"] = min(rate, state["tokens"] + (now - state["last"]) * rate)
        state["last"] = now
        if state["tokens"] >= 1:
            state["tokens"] -= 1
            state["admitted"] += 1
            return True
        state["throttled"] += 1
        return False


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def reply(self, status, headers, body):
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with lock:
            body = json.dumps({"admitted": state["admitted"], "throttled": state["throttled"]})
        self.reply(200, [("Content-Type", "application/json")], body.encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not admit():
            error = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"})
            self.reply(400, [("Content-Type", "application/x-amz-json-1.1"),
                             ("x-amzn-ErrorType", "ThrottlingException")], error.encode())
            return
        request = urllib.request.Request(upstream + self.path, data=body, method="POST",
                                         headers={k: v for k, v in self.headers.items()
                                                  if k.lower() not in ("host", "content-length")})
        try:
            with urllib.request.urlopen(request) as answer:
                self.reply(answer.status, answer.getheaders(), answer.read())
        except urllib.error.HTTPError as answer:
            self.reply(answer.code, answer.headers.items(), answer.read())


server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
print(server.server_address[1], flush=True)
server.serve_forever()

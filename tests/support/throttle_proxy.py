"""A proxy in front of an SSM endpoint that behaves as real SSM does where
moto does not.

Throttling, as SSM's account quota behaves: a token bucket of RATE calls a
second holding at most one second's worth; a call past it gets SSM's
ThrottlingException (HTTP 400, AWS JSON 1.1) and never reaches the server.

KMS refusals: each NAME after --undecryptable is under a KMS key the caller
may not use. Real SSM then refuses, whole, with AccessDeniedException, every
call that would decrypt it: GetParameter, a GetParameters batch that holds it,
and a GetParametersByPath page that holds it, when WithDecryption is true.
moto never does; the proxy refuses such an answer instead of passing it on.

Prints its port, then serves until killed. GET /counts answers
{"admitted": N, "throttled": M, "refused": K}.

    python throttle_proxy.py UPSTREAM_URL RATE [--undecryptable NAME...]
"""

import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

upstream, rate = sys.argv[1].rstrip("/"), float(sys.argv[2])
undecryptable = set(sys.argv[4:]) if sys.argv[3:4] == ["--undecryptable"] else set()
lock = threading.Lock()
state = {"tokens": rate, "last": time.monotonic(), "admitted": 0, "throttled": 0, "refused": 0}


def refuses_decrypting(request: bytes, answer: bytes) -> bool:
    """Whether real SSM would refuse this call: it decrypts a parameter under
    a key the caller may not use."""
    if not undecryptable:
        return False
    try:
        asked, answered = json.loads(request or b"{}"), json.loads(answer or b"{}")
    except ValueError:
        return False
    if not asked.get("WithDecryption"):
        return False
    parameters = answered.get("Parameters") or []
    if "Parameter" in answered:
        parameters = [answered["Parameter"]]
    return any(p.get("Name") in undecryptable for p in parameters)


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
            body = json.dumps({k: state[k] for k in ("admitted", "throttled", "refused")})
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
                answered = answer.read()
                if refuses_decrypting(body, answered):
                    with lock:
                        state["refused"] += 1
                    error = json.dumps({"__type": "AccessDeniedException",
                                        "message": "User is not authorized to perform kms:Decrypt"})
                    self.reply(400, [("Content-Type", "application/x-amz-json-1.1"),
                                     ("x-amzn-ErrorType", "AccessDeniedException")], error.encode())
                    return
                self.reply(answer.status, answer.getheaders(), answered)
        except urllib.error.HTTPError as answer:
            self.reply(answer.code, answer.headers.items(), answer.read())


server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
print(server.server_address[1], flush=True)
server.serve_forever()

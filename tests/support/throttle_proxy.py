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

from forwarding_proxy import Forwarding, serve

upstream, rate = sys.argv[1], float(sys.argv[2])
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


def aws_error(kind: str, message: str):
    """SSM's error answer (AWS JSON 1.1): HTTP 400, its type named twice."""
    body = json.dumps({"__type": kind, "message": message}).encode()
    return 400, body, [("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-ErrorType", kind)]


class Proxy(Forwarding):
    def do_GET(self):
        with lock:
            document = json.dumps({k: state[k] for k in ("admitted", "throttled", "refused")})
        self.reply_json(200, document)

    def do_POST(self):
        body = self.body()
        if not admit():
            self.reply(*aws_error("ThrottlingException", "Rate exceeded"))
            return
        status, headers, answered = self.fetch(body)
        if status == 200 and refuses_decrypting(body, answered):
            with lock:
                state["refused"] += 1
            self.reply(*aws_error("AccessDeniedException", "User is not authorized to perform kms:Decrypt"))
            return
        self.reply(status, answered, headers)


serve(Proxy, upstream)

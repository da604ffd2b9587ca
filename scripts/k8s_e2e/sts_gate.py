"""The AWS side of scripts/k8s_e2e.sh: a gate in front of moto (SSM, STS).

Every request passes to moto, except AssumeRoleWithWebIdentity, which the
gate judges as IAM would for an IRSA role: the token's signature must verify
with the cluster's service-account key, its issuer must be the cluster's, its
audience must hold sts.amazonaws.com, it must not have expired, and the
role's trust (a JSON file: {ROLE_ARN: "system:serviceaccount:NS:SA"}) must
name its subject. A refusal is STS's AccessDenied. moto itself accepts any
role and any token.

Each AssumeRoleWithWebIdentity is recorded: the role, the session name, the
token's claims (iss, aud, sub, exp, the pod it is bound to) and the verdict;
never the token itself (a SHA-256 prefix tells tokens apart). SSM calls are
counted by operation. GET /records answers
{"assume": [...], "ssm": {OPERATION: N}}.

    python sts_gate.py PORT UPSTREAM_URL TRUST_JSON SA_PUBLIC_KEY ISSUER
"""

import base64
import hashlib
import json
import os
import sys
import threading
import time
import urllib.parse

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

# The forwarding proxy the tests' gates share.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "support"))
from forwarding_proxy import Forwarding, serve  # noqa: E402

port, upstream, trust_file, key_file, issuer = sys.argv[1:6]
with open(key_file, "rb") as f:
    public_key = serialization.load_pem_public_key(f.read())
lock = threading.Lock()
records = {"assume": [], "ssm": {}}

DENIED = """<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<Error><Type>Sender</Type><Code>AccessDenied</Code>
<Message>Not authorized to perform sts:AssumeRoleWithWebIdentity: {why}</Message></Error>
<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"""


def b64(part):
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def judge(token, role):
    """(claims, None) when the role may be assumed with the token, else (claims, why)."""
    try:
        head, body, signature = token.split(".")
        claims = json.loads(b64(body))
        header = json.loads(b64(head))
    except Exception:
        return {}, "not a JWT"
    if header.get("alg") != "RS256":
        return claims, "alg is not RS256"
    try:
        public_key.verify(b64(signature), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    except Exception:
        return claims, "bad signature"
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if claims.get("iss") != issuer:
        return claims, "unknown issuer"
    if "sts.amazonaws.com" not in auds:
        return claims, "audience is not sts.amazonaws.com"
    if claims.get("exp", 0) < time.time():
        return claims, "expired"
    with open(trust_file) as f:
        trust = json.load(f)
    if trust.get(role) != claims.get("sub"):
        return claims, "the role does not trust this subject"
    return claims, None


class Gate(Forwarding):
    def do_GET(self):
        if self.path == "/records":
            with lock:
                document = json.dumps(records)
            self.reply_json(200, document)
            return
        self.forward(b"")

    def do_POST(self):
        body = self.body()
        target = self.headers.get("X-Amz-Target", "")
        if target.startswith("AmazonSSM."):
            op = target.split(".", 1)[1]
            with lock:
                records["ssm"][op] = records["ssm"].get(op, 0) + 1
            self.forward(body)
            return
        form = urllib.parse.parse_qs(body.decode(errors="replace"))
        if form.get("Action") == ["AssumeRoleWithWebIdentity"]:
            role = form.get("RoleArn", ["?"])[0]
            token = form.get("WebIdentityToken", [""])[0]
            claims, why = judge(token, role)
            k8s = claims.get("kubernetes.io", {})
            record = {
                "time": time.time(),
                "role": role,
                "session": form.get("RoleSessionName", ["?"])[0],
                "token_sha256": hashlib.sha256(token.encode()).hexdigest()[:12],
                "iss": claims.get("iss"),
                "aud": claims.get("aud"),
                "sub": claims.get("sub"),
                "exp": claims.get("exp"),
                "pod": (k8s.get("pod") or {}).get("name"),
                "granted": why is None,
                "why": why,
            }
            with lock:
                records["assume"].append(record)
            if why is not None:
                self.reply(403, DENIED.format(why=why).encode(), [("Content-Type", "text/xml")])
                return
        self.forward(body)


# GATE_HOST: where the driver's pods reach it (the pod network's gateway,
# now that they do not share the host's loopback).
serve(Gate, upstream, os.environ.get("GATE_HOST", "127.0.0.1"), int(port))

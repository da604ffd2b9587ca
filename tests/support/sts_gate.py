"""A gate in front of moto for the CSI tests: every request passes to moto,
except AssumeRoleWithWebIdentity for a role whose ARN contains "refused",
which gets STS's AccessDenied (moto itself accepts every role and token),
and for a role whose ARN contains "slow", which is answered after 3 s.
It counts the AssumeRoleWithWebIdentity calls per role and the other calls,
and the access key that signed each other call (never a token: the body is
parsed, not kept).

It also stands in for EKS Pod Identity's agent: GET /v1/credentials with
a service-account token as the Authorization header answers the container
credentials JSON (access key AKIAPODIDENTITY + the token's namespace) when
the token's subject is one of ALLOWED_SUBJECTS, and 403 otherwise.

Prints its port, then serves until killed. GET /counts answers
{"assume": {ROLE: N}, "other": M, "signed_by": {ACCESS_KEY: N}, "agent": {SUB: N}}.

    python sts_gate.py UPSTREAM_URL [ALLOWED_SUBJECT...]
"""

import base64
import datetime
import json
import sys
import threading
import time
import urllib.parse

from forwarding_proxy import Forwarding, serve

upstream = sys.argv[1]
allowed_subjects = set(sys.argv[2:])
lock = threading.Lock()
counts = {"assume": {}, "other": 0, "signed_by": {}, "agent": {}}


def subject(token):
    """The `sub` claim of a JWT (unverified: the test's tokens are made up)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return claims.get("sub", "")
    except (IndexError, ValueError):
        return ""

DENIED = """<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<Error><Type>Sender</Type><Code>AccessDenied</Code>
<Message>Not authorized to perform sts:AssumeRoleWithWebIdentity</Message></Error>
<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"""


class Gate(Forwarding):
    def do_GET(self):
        if self.path == "/counts":
            with lock:
                document = json.dumps(counts)
            self.reply_json(200, document)
            return
        if self.path == "/v1/credentials":
            sub = subject(self.headers.get("Authorization", ""))
            with lock:
                counts["agent"][sub] = counts["agent"].get(sub, 0) + 1
            if sub not in allowed_subjects:
                self.reply_json(403, '{"message": "no association"}')
                return
            namespace = sub.split(":")[2].upper()
            expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
            answer = {"AccessKeyId": "AKIAPODIDENTITY" + namespace, "SecretAccessKey": "pod-identity-secret",
                      "Token": "pod-identity-session", "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}
            self.reply_json(200, json.dumps(answer))
            return
        self.forward(b"")

    def do_POST(self):
        body = self.body()
        form = urllib.parse.parse_qs(body.decode(errors="replace"))
        if form.get("Action") == ["AssumeRoleWithWebIdentity"]:
            role = form.get("RoleArn", ["?"])[0]
            with lock:
                counts["assume"][role] = counts["assume"].get(role, 0) + 1
            if "refused" in role:
                self.reply(403, DENIED.encode(), [("Content-Type", "text/xml")])
                return
            if "slow" in role:
                time.sleep(3)  # an STS that takes its time (a far region, a retry)
        else:
            signature = self.headers.get("Authorization", "")
            key = signature.split("Credential=")[1].split("/")[0] if "Credential=" in signature else ""
            with lock:
                counts["other"] += 1
                counts["signed_by"][key] = counts["signed_by"].get(key, 0) + 1
        self.forward(body)


serve(Gate, upstream)

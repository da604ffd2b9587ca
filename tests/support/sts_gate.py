"""A gate in front of moto for the CSI tests: every request passes to moto,
except AssumeRoleWithWebIdentity for a role whose ARN contains "refused",
which gets STS's AccessDenied (moto itself accepts every role and token).
It counts the AssumeRoleWithWebIdentity calls per role and the other calls
(never a token: the body is parsed, not kept). Prints its port, then serves
until killed. GET /counts answers {"assume": {ROLE: N}, "other": M}.

    python sts_gate.py UPSTREAM_URL
"""

import json
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

upstream = sys.argv[1].rstrip("/")
lock = threading.Lock()
counts = {"assume": {}, "other": 0}

DENIED = """<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<Error><Type>Sender</Type><Code>AccessDenied</Code>
<Message>Not authorized to perform sts:AssumeRoleWithWebIdentity</Message></Error>
<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"""


class Gate(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def reply(self, status, body, headers):
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/counts":
            with lock:
                body = json.dumps(counts).encode()
            self.reply(200, body, [("Content-Type", "application/json")])
            return
        self.forward(b"")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        form = urllib.parse.parse_qs(body.decode(errors="replace"))
        if form.get("Action") == ["AssumeRoleWithWebIdentity"]:
            role = form.get("RoleArn", ["?"])[0]
            with lock:
                counts["assume"][role] = counts["assume"].get(role, 0) + 1
            if "refused" in role:
                self.reply(403, DENIED.encode(), [("Content-Type", "text/xml")])
                return
        else:
            with lock:
                counts["other"] += 1
        self.forward(body)

    def forward(self, body):
        request = urllib.request.Request(
            upstream + self.path, data=body or None, method=self.command
        )
        for name, value in self.headers.items():
            if name.lower() not in ("host", "content-length", "connection"):
                request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                self.reply(answer.status, answer.read(), answer.getheaders())
        except urllib.error.HTTPError as error:
            self.reply(error.code, error.read(), error.headers.items())


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that hung up (a daemon killed mid-call by a restart test)
        # is expected; anything else still prints its traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


server = Server(("127.0.0.1", 0), Gate)
print(server.server_address[1], flush=True)
server.serve_forever()

"""A SPIFFE federation bundle endpoint for tests (`https_web` profile), on a loopback port.

Serves the trust domain's bundle (RFC 7517 JWKS with `x509-svid` and `jwt-svid` keys,
`spiffe_sequence`, `spiffe_refresh_hint`) over HTTPS, with a server certificate issued by a
test CA written to `--state DIR/web-ca.pem` (what the client must be told to trust).

Rotation while running, for tests:
- SIGUSR1: a new JWT authority is added (the old ones stay), the sequence goes up;
- SIGUSR2: all JWT authorities but the newest are dropped, the sequence goes up.

State (the web CA and server certificate, the trust domain's CA and JWT keys, the sequence, the
number of bundle requests served) lives in `--state DIR/state.json`, read back on start, so a
restarted endpoint serves the same bundle. Prints `READY https://127.0.0.1:PORT/bundle` once it
listens, `ROTATED <sequence>` after a change.

Usage: bundle_endpoint.py --state DIR --trust-domain TD [--port N] [--refresh-hint SECONDS]
"""

import argparse
import base64
import json
import os
import signal
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mint


class State:
    def __init__(self, path: str, td: str, refresh_hint: int):
        self.path = path
        self.td = td
        self.refresh_hint = refresh_hint
        self.lock = threading.Lock()
        saved = mint.read_json(path)
        if saved:
            self.web_ca = (mint.load_key(saved["web_ca"]["key_pem"]), mint.load_cert(saved["web_ca"]["cert_pem"]))
            self.server = (mint.load_key(saved["server"]["key_pem"]), mint.load_cert(saved["server"]["cert_pem"]))
            self.ca = (mint.load_key(saved["ca"]["key_pem"]), mint.load_cert(saved["ca"]["cert_pem"]))
            self.jwt = [(k["kid"], mint.load_key(k["pem"])) for k in saved["jwt_keys"]]
            self.sequence = saved["sequence"]
            self.requests = saved["requests"]
        else:
            self.web_ca = mint.make_ca("web.test", "bundle endpoint test web CA")
            self.server = mint.make_leaf(*self.web_ca, dns=["localhost"], ips=["127.0.0.1"])
            self.ca = mint.make_ca(td)
            self.jwt = [(mint.new_kid(), mint.new_key())]
            self.sequence = 1
            self.requests = 0
        self.save()

    def save(self):
        pair = lambda kc: {"key_pem": mint.key_pem(kc[0]), "cert_pem": mint.cert_pem(kc[1])}
        mint.write_json_atomic(
            self.path,
            {
                "pid": os.getpid(),
                "web_ca": pair(self.web_ca),
                "server": pair(self.server),
                "ca": pair(self.ca),
                "jwt_keys": [{"kid": kid, "pem": mint.key_pem(key)} for kid, key in self.jwt],
                "sequence": self.sequence,
                "requests": self.requests,
            },
        )

    def bundle(self) -> bytes:
        with self.lock:
            self.requests += 1
            keys = [
                {
                    **mint.public_jwk(self.ca[0], mint.new_kid(), "x509-svid"),
                    "x5c": [base64.b64encode(mint.cert_der(self.ca[1])).decode()],
                }
            ]
            for key in keys:
                key.pop("kid")
            keys += [mint.public_jwk(key, kid, "jwt-svid") for kid, key in self.jwt]
            body = {
                "keys": keys,
                "spiffe_sequence": self.sequence,
                "spiffe_refresh_hint": self.refresh_hint,
            }
            self.save()
        return json.dumps(body).encode()

    def change(self, what: str):
        with self.lock:
            if what == "rotate":
                self.jwt.append((mint.new_kid(), mint.new_key()))
            elif what == "retire":
                self.jwt = self.jwt[-1:]
            self.sequence += 1
            self.save()
        print(f"ROTATED {self.sequence}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--state", required=True)
    p.add_argument("--trust-domain", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--refresh-hint", type=int, default=1)
    a = p.parse_args()
    os.makedirs(a.state, exist_ok=True)
    state = State(os.path.join(a.state, "state.json"), a.trust_domain, a.refresh_hint)
    with open(os.path.join(a.state, "web-ca.pem"), "w") as f:
        f.write(mint.cert_pem(state.web_ca[1]))
    cert_file = os.path.join(a.state, "server.pem")
    with open(cert_file, "w") as f:
        f.write(mint.cert_pem(state.server[1]) + mint.key_pem(state.server[0]))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = state.bundle()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)

    pending = []
    signal.signal(signal.SIGUSR1, lambda *_: pending.append("rotate"))
    signal.signal(signal.SIGUSR2, lambda *_: pending.append("retire"))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(f"READY https://127.0.0.1:{httpd.server_address[1]}/bundle", flush=True)
    while not stopping.wait(0.02):
        while pending:
            state.change(pending.pop(0))
    httpd.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()

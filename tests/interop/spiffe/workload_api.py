"""A SPIFFE Workload API server for tests, on a unix socket.

Built on the gRPC stubs that ship in the PyPI `spiffe` package (generated from the official
workload.proto). It serves, like a SPIRE agent would:

- FetchX509SVID (stream): the X509-SVID of `--spiffe-id`, its trust domain's X.509 bundle and
  the other trust domains' as federated bundles;
- FetchX509Bundles (stream) and FetchJWTBundles (stream): every trust domain's bundle;
- FetchJWTSVID: an ES256 JWT-SVID for the requested SPIFFE ID (any ID in a served trust
  domain: a test server, not an attestor) and audiences.

Requests without the `workload.spiffe.io: true` metadata are refused (InvalidArgument), as the
Workload API specification requires.

Rotation while running, for tests:
- SIGUSR1: every trust domain gets a new JWT authority (the old ones stay), and the X509-SVID is
  re-issued with a new key;
- SIGUSR2: every trust domain drops all its JWT authorities but the newest;
- SIGHUP: every trust domain gets a new X.509 CA (the old one stays), and the X509-SVID is
  re-issued by the new CA.
Each change pushes a new message on every open stream.

State (keys, CAs, the SVID, a generation counter) lives in `--state DIR/state.json`, rewritten
after each change and read back on start, so a restarted server serves the same material. The
server prints `READY <generation>` once it listens, and `ROTATED <generation>` after a change.

Usage: workload_api.py --socket PATH --state DIR --spiffe-id spiffe://td/x [--trust-domain TD]...
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc

import mint


class State:
    def __init__(self, path: str, trust_domains: list[str], spiffe_id: str):
        self.path = path
        self.spiffe_id = spiffe_id
        self.own_td = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        self.cond = threading.Condition()
        saved = mint.read_json(path)
        if saved:
            self.generation = saved["generation"] + 1
            self.tds = {
                td: {
                    "cas": [
                        (mint.load_key(c["key_pem"]), mint.load_cert(c["cert_pem"]))
                        for c in v["cas"]
                    ],
                    "jwt": [(k["kid"], mint.load_key(k["pem"])) for k in v["jwt_keys"]],
                }
                for td, v in saved["trust_domains"].items()
            }
            svid = saved["svid"]
            self.svid = (mint.load_key(svid["key_pem"]), mint.load_cert(svid["cert_pem"]))
        else:
            self.generation = 1
            self.tds = {
                td: {"cas": [mint.make_ca(td)], "jwt": [(mint.new_kid(), mint.new_key())]}
                for td in trust_domains
            }
            self.svid = None
            self._issue_svid()
        self.save()

    def _issue_svid(self):
        ca_key, ca_cert = self.tds[self.own_td]["cas"][-1]
        self.svid = mint.make_leaf(ca_key, ca_cert, spiffe_id=self.spiffe_id)

    def save(self):
        mint.write_json_atomic(
            self.path,
            {
                "generation": self.generation,
                "pid": os.getpid(),
                "trust_domains": {
                    td: {
                        "cas": [
                            {"key_pem": mint.key_pem(k), "cert_pem": mint.cert_pem(c)}
                            for k, c in v["cas"]
                        ],
                        "jwt_keys": [
                            {"kid": kid, "pem": mint.key_pem(key)} for kid, key in v["jwt"]
                        ],
                    }
                    for td, v in self.tds.items()
                },
                "svid": {
                    "spiffe_id": self.spiffe_id,
                    "key_pem": mint.key_pem(self.svid[0]),
                    "cert_pem": mint.cert_pem(self.svid[1]),
                },
            },
        )

    def change(self, what: str):
        with self.cond:
            if what == "rotate":
                for v in self.tds.values():
                    v["jwt"].append((mint.new_kid(), mint.new_key()))
                self._issue_svid()
            elif what == "retire":
                for v in self.tds.values():
                    v["jwt"] = v["jwt"][-1:]
            elif what == "rotate-ca":
                for td, v in self.tds.items():
                    v["cas"].append(mint.make_ca(td, f"{td} test CA {self.generation + 1}"))
                self._issue_svid()
            self.generation += 1
            self.save()
            self.cond.notify_all()
        print(f"ROTATED {self.generation}", flush=True)

    # What each RPC answers, read under the lock.
    def x509_bundle(self, td: str) -> bytes:
        return b"".join(mint.cert_der(c) for _, c in self.tds[td]["cas"])

    def x509_svid_response(self):
        key, cert = self.svid
        return workload_pb2.X509SVIDResponse(
            svids=[
                workload_pb2.X509SVID(
                    spiffe_id=self.spiffe_id,
                    x509_svid=mint.cert_der(cert),
                    x509_svid_key=mint.key_der(key),
                    bundle=self.x509_bundle(self.own_td),
                )
            ],
            federated_bundles={
                td: self.x509_bundle(td) for td in self.tds if td != self.own_td
            },
        )

    def x509_bundles_response(self):
        return workload_pb2.X509BundlesResponse(
            bundles={td: self.x509_bundle(td) for td in self.tds}
        )

    def jwt_bundles_response(self):
        # Like a SPIRE agent: a JWKS per trust domain, keys with `kid` and no `use`.
        return workload_pb2.JWTBundlesResponse(
            bundles={
                td: json.dumps(
                    {"keys": [mint.public_jwk(key, kid) for kid, key in v["jwt"]]}
                ).encode()
                for td, v in self.tds.items()
            }
        )


def has_security_header(context) -> bool:
    return any(
        k == "workload.spiffe.io" and v == "true" for k, v in context.invocation_metadata()
    )


class WorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, state: State, stopping: threading.Event):
        self.state = state
        self.stopping = stopping

    def _check(self, context):
        if not has_security_header(context):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request"
            )

    def _stream(self, context, build):
        self._check(context)
        seen = None
        while context.is_active() and not self.stopping.is_set():
            with self.state.cond:
                self.state.cond.wait_for(
                    lambda: self.state.generation != seen or self.stopping.is_set(),
                    timeout=0.5,
                )
                if self.state.generation == seen:
                    continue
                seen = self.state.generation
                message = build()
            yield message

    def FetchX509SVID(self, request, context):
        yield from self._stream(context, self.state.x509_svid_response)

    def FetchX509Bundles(self, request, context):
        yield from self._stream(context, self.state.x509_bundles_response)

    def FetchJWTBundles(self, request, context):
        yield from self._stream(context, self.state.jwt_bundles_response)

    def FetchJWTSVID(self, request, context):
        self._check(context)
        if not request.audience:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        spiffe_id = request.spiffe_id or self.state.spiffe_id
        td = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
        with self.state.cond:
            if td not in self.state.tds:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            kid, key = self.state.tds[td]["jwt"][-1]
        token = mint.jwt_svid(key, kid, spiffe_id, list(request.audience))
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id=spiffe_id, svid=token)]
        )

    def ValidateJWTSVID(self, request, context):
        self._check(context)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served by this test server")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--spiffe-id", required=True)
    p.add_argument("--trust-domain", action="append", default=[])
    a = p.parse_args()
    own = a.spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
    tds = [own] + [td for td in a.trust_domain if td != own]
    os.makedirs(a.state, exist_ok=True)
    state = State(os.path.join(a.state, "state.json"), tds, a.spiffe_id)
    stopping = threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(
        WorkloadApi(state, stopping), server
    )
    try:
        os.unlink(a.socket)
    except FileNotFoundError:
        pass
    server.add_insecure_port(f"unix:{a.socket}")
    server.start()

    pending = []
    signal.signal(signal.SIGUSR1, lambda *_: pending.append("rotate"))
    signal.signal(signal.SIGUSR2, lambda *_: pending.append("retire"))
    signal.signal(signal.SIGHUP, lambda *_: pending.append("rotate-ca"))
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    print(f"READY {state.generation}", flush=True)
    while not stopping.is_set():
        while pending:
            state.change(pending.pop(0))
        time.sleep(0.02)
    with state.cond:
        state.cond.notify_all()
    server.stop(0).wait()
    sys.exit(0)


if __name__ == "__main__":
    main()

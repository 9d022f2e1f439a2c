#!/usr/bin/env bash
# Runs the interop suites (Python: PyJWT/jwcrypto, requests/ssl/curl for mTLS; Node: oauth4webapi/jose) against a real
# `writ serve` on a loopback port. Installs the clients locally (.venv, node_modules).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WRIT=${WRIT_BIN:-$ROOT/target/debug/writ}

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import jwt, jwcrypto, schemathesis, requests" 2>/dev/null || .venv/bin/pip install -q --disable-pip-version-check pyjwt jwcrypto cryptography schemathesis requests
if [ ! -d tests/interop/node/node_modules/oidc-provider ] || [ ! -x tests/interop/node/node_modules/.bin/tsc ] \
  || [ ! -d tests/interop/node/node_modules/dpop ] || [ ! -d tests/interop/node/node_modules/@sd-jwt/jwt-status-list ]; then
  (cd tests/interop/node && npm ci --no-audit --no-fund --loglevel=error)
fi

work=$(mktemp -d)
trap 'kill ${PID:-} ${PID2:-} 2>/dev/null || true; rm -rf "$work"' EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$WRIT" keys generate --alg ES256 --out "$work/signing.pem" >/dev/null
OP_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# An issuer that is configured but never started, for the agents' 503 case: the issuer the
# OIDC suite starts later must not inherit the broker's view of an unreachable issuer.
DOWN_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.venv/bin/python tests/interop/setup_td.py "$work" "$PORT" "$ROOT" "$OP_PORT" "$DOWN_PORT"
"$WRIT" serve --config "$work/writ.toml" 2>"$work/serve.log" &
PID=$!
# A second broker whose issuer has a path (RFC 8414 §3.1 discovery), with its own log.
PORT2=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s|127.0.0.1:$PORT\"|127.0.0.1:$PORT2\"|" \
    -e "s|issuer = \"http://127.0.0.1:$PORT2\"|issuer = \"http://127.0.0.1:$PORT2/writ\"|" \
    -e "s|decisions.jsonl|decisions-path.jsonl|" "$work/writ.toml" >"$work/writ-path.toml"
# The second broker also requires DPoP nonces (RFC 9449 §8), for the DPoP suite's challenge.
printf '\n[dpop]\nrequire_nonce = true\n' >>"$work/writ-path.toml"
"$WRIT" serve --config "$work/writ-path.toml" 2>"$work/serve-path.log" &
PID2=$!
for port in "$PORT" "$PORT2"; do
  for _ in $(seq 1 200); do
    python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/readyz', timeout=1)" 2>/dev/null && break
    sleep 0.05
  done
done
export BROKER="http://127.0.0.1:$PORT" BROKER_PATH="http://127.0.0.1:$PORT2/writ" WORK="$work" OP_PORT
status=0
.venv/bin/python tests/interop/python/test_interop.py || status=1
# Approval gates: a device-flow style polling loop (RFC 8628 §3.4-3.5) written with `requests`.
.venv/bin/python tests/interop/python/test_approvals.py || status=1
# mTLS with X509-SVIDs on a broker of its own with [server.tls]: requests, ssl/http.client and
# curl --cert as clients, the PKI minted with `cryptography`.
WRIT_BIN="$WRIT" .venv/bin/python tests/interop/python/test_mtls.py || status=1
# The agent example of the README (examples/agents/agent.py): a JWT-SVID of the interop trust
# domain, and an ID token of a configured OIDC issuer that never runs (503, retried).
.venv/bin/python - "$work" >"$work/agent.svid" <<'PY'
import sys, time, jwt
w = sys.argv[1]
now = int(time.time())
claims = {"sub": "spiffe://interop.test/agent/example", "aud": ["writ"], "iat": now, "exp": now + 300}
key, kid = open(f"{w}/td-key.pem").read(), open(f"{w}/td-kid").read()
print(jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid}), end="")
PY
.venv/bin/python - "$DOWN_PORT" >"$work/unavailable.jwt" <<'PY'
import sys, time, jwt
from cryptography.hazmat.primitives.asymmetric import ec
now = int(time.time())
claims = {"iss": f"http://127.0.0.1:{sys.argv[1]}", "sub": "agent", "aud": "writ", "iat": now, "exp": now + 300}
print(jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "k"}), end="")
PY
SVID_FILE="$work/agent.svid" AUDIENCE=https://api.interop.test UNAVAILABLE_TOKEN_FILE="$work/unavailable.jwt" \
  .venv/bin/python examples/agents/agent.py || status=1
# The same agent in TypeScript (examples/agents/agent.ts): compiled with the pinned tsc, run
# with Node's built-in fetch, on the same inputs and with the same checks.
types=tests/interop/node/node_modules/@types
if tests/interop/node/node_modules/.bin/tsc --strict --target es2022 --module nodenext \
  --typeRoots "$types" --types node --outDir "$work/agent-ts" examples/agents/agent.ts; then
  SVID_FILE="$work/agent.svid" AUDIENCE=https://api.interop.test UNAVAILABLE_TOKEN_FILE="$work/unavailable.jwt" \
    node "$work/agent-ts/agent.js" || status=1
else
  status=1
fi
node tests/interop/node/test.mjs || status=1
node tests/interop/node/oidc.mjs || status=1
node tests/interop/node/dpop.mjs || status=1
# A bounded schemathesis run against the served OpenAPI description: no 5xx, every status
# code and content type as described, every response valid against its schema.
.venv/bin/schemathesis run "$BROKER/openapi.json" -H "Authorization: Bearer $(cat "$work/admin-token")" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples 50 --seed 20261123 --workers 2 --no-color || status=1
"$WRIT" audit verify "$work/decisions.jsonl"
"$WRIT" audit verify "$work/decisions-path.jsonl"
exit $status

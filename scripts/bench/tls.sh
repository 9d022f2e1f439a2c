#!/usr/bin/env bash
# TLS on the listener and mTLS with X509-SVIDs (SPEC §4.8, §4.5), memory store, no trip rules:
#   - exchanges/s, p50, p99 over plain HTTP, over TLS without a client certificate (JWT-SVID
#     subject token) and over mTLS (the X509-SVID is the subject, the token bound to it),
#     in the same run with the same client (tls_bench, reqwest + rustls);
#   - each with a keep-alive pool and with a new connection (a full handshake) per request.
# Runs alone (`scripts/bench/tls.sh`) or from scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
# BENCH_PROFILE=debug measures the debug build (a quick look; its numbers are not the
# broker's): release by default.
PROFILE=${BENCH_PROFILE:-release}
if [ "$PROFILE" = release ]; then
  cargo build --release --quiet --bin writ --example tls_bench
else
  cargo build --quiet --bin writ --example tls_bench
fi
WRIT=${WRIT_BIN:-$ROOT/target/$PROFILE/writ}
BENCH=$ROOT/target/$PROFILE/examples/tls_bench
# shellcheck source=scripts/bench/lib.sh
. "$ROOT/scripts/bench/lib.sh"

work=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# A dev broker writes the files (keys, trust domain, JWT-SVID); it is stopped at once.
PORT=$(free_port)
mkdir -p "$work/config" && cp -r config/policies "$work/config/"
( cd "$work" && exec "$WRIT" dev --listen "127.0.0.1:$PORT" >dev.log 2>&1 ) &
DEV=$!
wait_ready "$PORT"
kill "$DEV"; wait "$DEV" 2>/dev/null || true

# Certificates: the server's, and an X509-SVID whose authority joins the dev bundle.
"$BENCH" setup "$work" "$work/.writ-dev/dev.writ.local.bundle.json" spiffe://dev.writ.local/agent/demo

# Two brokers on the same files: plain HTTP and TLS (client_auth = "optional").
broker() { # name port tls?
  python3 - "$work/.writ-dev/writ.toml" "$work/$1.toml" "$2" "$work/$1.jsonl" "$3" "$work" <<'PY'
import re, sys
src, dst, port, audit, tls, work = sys.argv[1:]
text = open(src).read().split("[trips]")[0]
text = re.sub(r'(?m)^listen = .*', f'listen = "127.0.0.1:{port}"', text, count=1)
text = re.sub(r'(?m)^path = .*', f'path = "{audit}"', text)
if tls == "tls":
    text = re.sub(r'(?m)^(\[tokens\])', f'[server.tls]\ncert = "{work}/server.pem"\nkey = "{work}/server.key"\nclient_auth = "optional"\n\n\\1', text, count=1)
open(dst, "w").write(text)
PY
  ( cd "$work" && exec "$WRIT" serve --config "$1.toml" >"$1.log" 2>&1 ) &
  PIDS+=($!)
}
PP=$(free_port); broker plain "$PP" plain; wait_ready "$PP"
PT=$(free_port); broker tls "$PT" tls
for _ in $(seq 1 600); do
  curl -sfk "https://127.0.0.1:$PT/readyz" >/dev/null 2>&1 && break
  sleep 0.05
done
curl -sf --cacert "$work/server-ca.pem" "https://127.0.0.1:$PT/readyz" >/dev/null || {
  echo "TLS broker did not become ready" >&2; cat "$work/tls.log" >&2; exit 1
}

echo "== TLS and mTLS ($PROFILE build): plain, TLS and mTLS exchanges, ${BENCH_DURATION:-10s} each, ${BENCH_CONNECTIONS:-32} concurrent"
DIR="$work" PLAIN="http://127.0.0.1:$PP" TLS="https://127.0.0.1:$PT" SVID="$work/.writ-dev/demo.svid" \
  DURATION="$(d=${BENCH_DURATION:-10s}; echo "${d%s}")" CONCURRENCY="${BENCH_CONNECTIONS:-32}" \
  "$BENCH" load
"$WRIT" audit verify "$work/tls.jsonl" >/dev/null && echo "tls_decision_log=verified"

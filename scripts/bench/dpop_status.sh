#!/usr/bin/env bash
# DPoP and token status lists (SPEC §4.5, §4.6), on two broker replicas sharing one Redis:
#   - exchange req/s without and with a DPoP proof, same run, same client (replica A)
#   - status-list serving req/s (replica B)
#   - revocation at A (RFC 7009) -> the bit set in B's served list, p50/p99 over 1,000
#   - the resource-server verifier (writ::verify): checks/s on one core for a DPoP-bound
#     token with warm JWKS and status-list caches (examples/verify_bench.rs)
# Runs alone (`scripts/bench/dpop_status.sh`) or from scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
command -v redis-server >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}
# BENCH_PROFILE=debug measures the debug build (a quick look; its numbers are not the
# broker's): release by default.
PROFILE=${BENCH_PROFILE:-release}
if [ "$PROFILE" = release ]; then
  cargo build --release --quiet --bin writ --example dpop_status_bench --example verify_bench
else
  cargo build --quiet --bin writ --example dpop_status_bench --example verify_bench
fi
WRIT=$ROOT/target/$PROFILE/writ
# shellcheck source=scripts/bench/lib.sh
. "$ROOT/scripts/bench/lib.sh"

work=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A dev broker writes the files (keys, trust domain, SVID); it is stopped at once.
PORT=$(free_port)
mkdir -p "$work/config" && cp -r config/policies "$work/config/"
( cd "$work" && exec "$WRIT" dev --listen "127.0.0.1:$PORT" >dev.log 2>&1 ) &
DEV=$!
wait_ready "$PORT"
kill "$DEV"; wait "$DEV" 2>/dev/null || true

RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

# Two replicas on Redis, no trip rules (they would count the load as one subject's rate).
replica() { # name port
  python3 - "$work/.writ-dev/writ.toml" "$work/$1.toml" "$RPORT" "$2" "$work/$1.jsonl" <<'PY'
import re, sys
src, dst, rport, port, audit = sys.argv[1:]
text = open(src).read().split("[trips]")[0]
text = text.replace('backend = "memory"', f'backend = "redis"\nurl = "redis://127.0.0.1:{rport}/0"')
text = re.sub(r'(?m)^listen = .*', f'listen = "127.0.0.1:{port}"', text, count=1)
text = re.sub(r'(?m)^path = .*', f'path = "{audit}"', text)
open(dst, "w").write(text)
PY
  ( cd "$work" && exec "$WRIT" serve --config "$1.toml" >"$1.log" 2>&1 ) &
  PIDS+=($!)
  wait_ready "$2"
}
PA=$(free_port); replica a "$PA"
PB=$(free_port); replica b "$PB"

echo "== DPoP and status lists ($PROFILE build): two replicas on Redis, ${BENCH_DURATION:-10s} per load, ${BENCH_CONNECTIONS:-32} concurrent"
BROKER_A="http://127.0.0.1:$PA" BROKER_B="http://127.0.0.1:$PB" SVID="$work/.writ-dev/demo.svid" \
  DURATION="$(d=${BENCH_DURATION:-10s}; echo "${d%s}")" CONCURRENCY="${BENCH_CONNECTIONS:-32}" \
  "target/$PROFILE/examples/dpop_status_bench"

echo "== resource-server verifier ($PROFILE build): one core, DPoP-bound token, warm caches, a fresh proof per check"
CHECKS="${VERIFY_CHECKS:-20000}" "target/$PROFILE/examples/verify_bench"

#!/usr/bin/env bash
# Benchmarks that print numbers (no pass/fail). Installs wrk and redis-server if missing.
#   1. the crypto floor: one ES256 JWT-SVID verify + one ES256 sign on one core
#   2. exchange throughput and latency on the memory store (wrk, 32 connections, 10 s), and
#      the same with and without the wait for the decision log's sync (durable group commit
#      A/B: the `bench-unsynced` build), 32 and 128 connections, rounds interleaved
#   3. exchange throughput on Redis
#   4. introspection throughput (Redis-backed broker)
#   5. revocation propagation A -> B over 1,000 revocations, Redis memory per open task,
#      feed load time for 100,000 live revocations, Redis memory after 10,000 revokes of one token
#   6. trips: re-evaluation of 10,000 open tasks on Redis; exchange throughput, trips on vs off
#   7. delegation exchanges/s next to plain exchanges/s, memory and Redis (scripts/bench/delegation.sh)
#   8. approval gates: exchange throughput, approvals on vs off; polls of 1,000 pending approvals
#   9. DPoP: exchange with vs without a proof; status-list serving; revocation -> bit;
#      resource-server verifier checks/s on one core, bound token, warm caches (scripts/bench/dpop_status.sh)
#  10. TLS: exchanges/s over plain HTTP, TLS and mTLS (X509-SVID), keep-alive and a handshake per request (scripts/bench/tls.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

CORES=$(nproc)
DURATION=${BENCH_DURATION:-10s}
CONNS=${BENCH_CONNECTIONS:-32}
work=$(mktemp -d)
# The A/B baseline of the durable group commit: the same broker without the wait for the sync.
cargo build --release --quiet --bin writ --features bench-unsynced
cp target/release/writ "$work/writ-unsynced"
cargo build --release --quiet --bin writ --example crypto_floor --example redis_bench --example reeval_bench
WRIT=$PWD/target/release/writ
ROOT=$PWD

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=scripts/bench/lib.sh
. "$ROOT/scripts/bench/lib.sh"
run_wrk() { # url script
  wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$2" "$1" | grep -E '^(wrk_[a-z_]+|p50_ms|p99_ms|rps)='
}

echo "== machine: $CORES cores"
echo "== crypto floor (one ES256 JWT-SVID verify + one ES256 sign, one core)"
FLOOR=$(target/release/examples/crypto_floor | sed -n 's/^ops_per_sec=//p')
echo "crypto_floor_ops_per_sec=$FLOOR"

# A dev broker on the memory store (its files also serve the Redis broker below).
PORT=$(free_port)
mkdir -p "$work/config" && cp -r config/policies "$work/config/"
( cd "$work" && exec "$WRIT" dev --listen "127.0.0.1:$PORT" >dev.log 2>&1 ) &
PIDS+=($!)
wait_ready "$PORT"
export SVID; SVID=$(cat "$work/.writ-dev/demo.svid")

echo "== exchange, memory store, no trip rules: wrk -t1 -c$CONNS -d$DURATION"
# The dev config turns trips on; this run measures without them (see 6 for with).
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; PIDS=()
python3 - "$work/.writ-dev/writ.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
off = text.split("[trips]")[0]
on = re.sub(r"exchange_rate = \{ count = \d+", "exchange_rate = { count = 1000000000", text)
open(sys.argv[1].replace("writ.toml", "trips-off.toml"), "w").write(off)
open(sys.argv[1].replace("writ.toml", "trips-on.toml"), "w").write(on)
PY
( cd "$work" && exec "$WRIT" serve --config .writ-dev/trips-off.toml >off.log 2>&1 ) &
PIDS+=($!)
wait_ready "$PORT"
OUT=$(run_wrk "http://127.0.0.1:$PORT/oauth2/token" scripts/bench/exchange.lua)
echo "$OUT"
RPS=$(echo "$OUT" | sed -n 's/^rps=//p')
python3 -c "import sys; print(f'ratio_rps_to_floor_x_cores={float(sys.argv[1]) / (float(sys.argv[2]) * int(sys.argv[3])):.2f}')" "$RPS" "$FLOOR" "$CORES"
"$WRIT" audit verify "$work/.writ-dev/decisions.jsonl"
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; PIDS=()

AB_ROUNDS=${BENCH_AB_ROUNDS:-3}
echo "== durable group commit A/B: exchange, memory store, no trip rules, durable vs the wait for the sync removed ($AB_ROUNDS interleaved rounds of wrk -t1 -d$DURATION)"
declare -A AB
for conns in "$CONNS" 128; do
  for round in $(seq 1 "$AB_ROUNDS"); do
    for build in durable unsynced; do
      bin=$WRIT; [ "$build" = unsynced ] && bin=$work/writ-unsynced
      rm -f "$work/.writ-dev/decisions.jsonl"
      ( cd "$work" && exec "$bin" serve --config .writ-dev/trips-off.toml >ab.log 2>&1 ) &
      PIDS+=($!)
      wait_ready "$PORT"
      rps=$(wrk -t1 -c"$conns" -d"$DURATION" -s scripts/bench/exchange.lua "http://127.0.0.1:$PORT/oauth2/token" | sed -n 's/^rps=//p')
      fsyncs=$(curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^writ_audit_fsyncs_total/{print $2}')
      kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; PIDS=()
      echo "connections=$conns round=$round build=$build rps=$rps fsyncs=$fsyncs"
      AB[$conns-$build]="${AB[$conns-$build]:-} $rps"
    done
  done
  python3 - "$conns" "${AB[$conns-durable]}" "${AB[$conns-unsynced]}" <<'PY'
import statistics, sys
d = statistics.median(float(x) for x in sys.argv[2].split())
u = statistics.median(float(x) for x in sys.argv[3].split())
print(f"connections={sys.argv[1]} durable_median_rps={d:.0f} unsynced_median_rps={u:.0f} durable_cost_percent={(u - d) / u * 100:.1f}")
PY
done

echo "== exchange, memory store, every trip rule on (rate limit set out of reach): wrk -t1 -c$CONNS -d$DURATION"
( cd "$work" && exec "$WRIT" serve --config .writ-dev/trips-on.toml >on.log 2>&1 ) &
PIDS+=($!)
wait_ready "$PORT"
OUT=$(run_wrk "http://127.0.0.1:$PORT/oauth2/token" scripts/bench/exchange.lua)
echo "$OUT"
RPS_ON=$(echo "$OUT" | sed -n 's/^rps=//p')
python3 -c "import sys; off, on = float(sys.argv[1]), float(sys.argv[2]); print(f'trips_cost_percent={(off - on) / off * 100:.1f}')" "$RPS" "$RPS_ON"
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; PIDS=()

# Redis, and a broker on it.
RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
redis_config() { # source target port
  sed -e "s/^backend = \"memory\"/backend = \"redis\"\nurl = \"redis:\/\/127.0.0.1:$RPORT\/0\"/" \
      -e "s/^listen = .*/listen = \"127.0.0.1:$3\"/" \
      -e "s#^path = .*#path = \"$work/$2.jsonl\"#" \
      "$work/.writ-dev/$1" > "$work/$2.toml"
}
PORT=$(free_port)
redis_config trips-on.toml redis-on "$PORT"
( cd "$work" && exec "$WRIT" serve --config redis-on.toml >serve-on.log 2>&1 ) &
PIDS+=($!)
wait_ready "$PORT"
echo "== exchange, Redis store, every trip rule on: wrk -t1 -c$CONNS -d$DURATION"
OUT=$(run_wrk "http://127.0.0.1:$PORT/oauth2/token" scripts/bench/exchange.lua)
echo "$OUT"
RPS_ON=$(echo "$OUT" | sed -n 's/^rps=//p')
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; PIDS=()

PORT=$(free_port)
redis_config trips-off.toml redis "$PORT"
( cd "$work" && exec "$WRIT" serve --config redis.toml >serve.log 2>&1 ) &
PIDS+=($!)
wait_ready "$PORT"
echo "== exchange, Redis store, no trip rules: wrk -t1 -c$CONNS -d$DURATION"
OUT=$(run_wrk "http://127.0.0.1:$PORT/oauth2/token" scripts/bench/exchange.lua)
echo "$OUT"
RPS_OFF=$(echo "$OUT" | sed -n 's/^rps=//p')
python3 -c "import sys; off, on = float(sys.argv[1]), float(sys.argv[2]); print(f'trips_cost_percent_redis={(off - on) / off * 100:.1f}')" "$RPS_OFF" "$RPS_ON"

echo "== introspection (Redis-backed broker, admin bearer): wrk -t1 -c$CONNS -d$DURATION"
export TOKEN BEARER
TOKEN=$(cd "$work" && "$WRIT" token exchange --broker "http://127.0.0.1:$PORT" --subject-token .writ-dev/demo.svid \
  --scope repo:read --audience https://api.example.org | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
BEARER=$(cat "$work/.writ-dev/admin-token")
run_wrk "http://127.0.0.1:$PORT/oauth2/introspect" scripts/bench/introspect.lua

echo "== revocation propagation A -> B (1,000 revocations), Redis memory per open task (100,000 tasks), feed load (100,000 live revocations) and memory after 10,000 revokes of one token"
REDIS_URL="redis://127.0.0.1:$RPORT/0" target/release/examples/redis_bench

echo "== re-evaluation of 10,000 open tasks after a policy change (Redis)"
REDIS_URL="redis://127.0.0.1:$RPORT/0" target/release/examples/reeval_bench

echo "== delegation exchanges next to plain exchanges, memory and Redis (scripts/bench/delegation.sh)"
BENCH_DURATION="$DURATION" BENCH_CONNECTIONS="$CONNS" scripts/bench/delegation.sh
echo "== approval gates (scripts/bench/approvals.sh)"
BENCH_NO_BUILD=1 scripts/bench/approvals.sh
echo "== DPoP cost, status-list serving, revocation -> status bit across replicas"
scripts/bench/dpop_status.sh
echo "== TLS and mTLS: exchanges over plain HTTP, TLS and mTLS, keep-alive and new connections"
BENCH_DURATION="$DURATION" BENCH_CONNECTIONS="$CONNS" scripts/bench/tls.sh

#!/usr/bin/env bash
# Delegation exchanges/s (SPEC §4.4: a sub-agent exchanges a grant with its own JWT-SVID as
# actor_token) next to plain exchanges/s, in the same run, on the memory store and on Redis.
# Trip rules off; the tree budget set out of reach (every delegation counts against one root).
# Run alone (scripts/bench/delegation.sh) or from scripts/bench.sh. Needs wrk, redis-server.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DURATION=${BENCH_DURATION:-10s}
CONNS=${BENCH_CONNECTIONS:-32}
# WRIT_BIN: a writ binary to measure as it is (otherwise the release build).
if [ -n "${WRIT_BIN:-}" ]; then
  WRIT=$(realpath "$WRIT_BIN")
else
  cargo build --release --quiet --bin writ
  WRIT=$ROOT/target/release/writ
fi
# shellcheck source=scripts/bench/lib.sh
. "$ROOT/scripts/bench/lib.sh"

work=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${DREDIS_PID:-}" ] && kill "$DREDIS_PID" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; PIDS=(); }
wrk_rps() { # url script -> prints the wrk lines, prefixed
  wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$2" "$1" \
    | grep -E '^(wrk_[a-z_]+|p50_ms|p99_ms|rps)=' | sed "s/^/$3_/"
}

PORT=$(free_port)
mkdir -p "$work/config" && cp -r config/policies "$work/config/"
( cd "$work" && exec "$WRIT" dev --listen "127.0.0.1:$PORT" >dev.log 2>&1 ) &
PIDS+=($!)
wait_ready "$PORT"
stop_all
python3 - "$work/.writ-dev/writ.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read().split("[trips]")[0]
text = re.sub(r"max_tokens = \d+", "max_tokens = 4000000000", text)
open(sys.argv[1].replace("writ.toml", "bench-memory.toml"), "w").write(text)
PY
RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null 2>&1 &
DREDIS_PID=$!
for _ in $(seq 1 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
sed -e "s/^backend = \"memory\"/backend = \"redis\"\nurl = \"redis:\/\/127.0.0.1:$RPORT\/0\"/" \
  "$work/.writ-dev/bench-memory.toml" > "$work/.writ-dev/bench-redis.toml"

ACTOR_ID=spiffe://dev.writ.local/agent/sub/bench
export SVID GRANT ACTOR
SVID=$(cat "$work/.writ-dev/demo.svid")
for store in memory redis; do
  ( cd "$work" && exec "$WRIT" serve --config ".writ-dev/bench-$store.toml" >"serve-$store.log" 2>&1 ) &
  PIDS+=($!)
  wait_ready "$PORT"
  URL="http://127.0.0.1:$PORT"
  ACTOR=$(cd "$work" && "$WRIT" dev svid --spiffe-id "$ACTOR_ID" --ttl 10m)
  TASK=$(cd "$work" && "$WRIT" token exchange --broker "$URL" --subject-token .writ-dev/demo.svid \
    --scope repo:read --audience https://api.example.org | python3 -c 'import json,sys; print(json.load(sys.stdin)["task_id"])')
  GRANT=$(cd "$work" && "$WRIT" token exchange --broker "$URL" --subject-token .writ-dev/demo.svid \
    --scope repo:read --audience "$ACTOR_ID" --task-id "$TASK" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  echo "== $store store: plain exchange, then delegation (grant + actor_token), wrk -t1 -c$CONNS -d$DURATION"
  PLAIN=$(wrk_rps "$URL/oauth2/token" scripts/bench/exchange.lua "exchange_$store")
  echo "$PLAIN"
  DELEG=$(wrk_rps "$URL/oauth2/token" scripts/bench/delegation.lua "delegation_$store")
  echo "$DELEG"
  p=$(echo "$PLAIN" | sed -n "s/^exchange_${store}_rps=//p")
  d=$(echo "$DELEG" | sed -n "s/^delegation_${store}_rps=//p")
  python3 -c "import sys; print(f'delegation_to_exchange_ratio_$store={float(sys.argv[2]) / float(sys.argv[1]):.2f}')" "$p" "$d"
  stop_all
done

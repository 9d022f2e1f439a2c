#!/usr/bin/env bash
# Approval gates: exchange req/s for requests that need no approval with approvals off and on
# (same run, same files), then poll req/s while 1,000 approvals are pending, on the memory
# store and on Redis. Prints numbers. Run alone or from scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DURATION=${BENCH_DURATION:-10s}
CONNS=${BENCH_CONNECTIONS:-32}
PENDING=${BENCH_PENDING:-1000}
[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release --quiet --bin writ
WRIT=${WRIT_BIN:-$ROOT/target/release/writ}
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
run_wrk() { # url script
  wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$2" "$1" | grep -E '^(wrk_[a-z_]+|p50_ms|p99_ms|rps)='
}
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; PIDS=(); }

# The dev broker writes the files (keys, trust domain, the sample policies with deploy:prod).
PORT=$(free_port)
mkdir -p "$work/config" && cp -r config/policies "$work/config/"
( cd "$work" && exec "$WRIT" dev --listen "127.0.0.1:$PORT" >dev.log 2>&1 ) &
PIDS+=($!)
wait_ready "$PORT"
export SVID; SVID=$(cat "$work/.writ-dev/demo.svid")
stop_all
# Both without trip rules (they are measured in bench.sh); one without [approvals], one with
# it (a long ttl, so that nothing expires during the run; interval 1s).
python3 - "$work/.writ-dev/writ.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read().split("[trips]")[0]
off = text.split("\n# In dev, the admin token")[0] + "\n"
assert "[approvals]" not in off, off
on = re.sub(r'(?m)^ttl = "15m"$', 'ttl = "1h"\ninterval = "1s"', text)
assert 'interval = "1s"' in on
open(sys.argv[1].replace("writ.toml", "approvals-off.toml"), "w").write(off)
open(sys.argv[1].replace("writ.toml", "approvals-on.toml"), "w").write(on)
PY

serve() { # config
  ( cd "$work" && exec "$WRIT" serve --config "$1" >>"$work/serve.log" 2>&1 ) &
  PIDS+=($!)
  ( wait_ready "$PORT" ) || { tail -5 "$work/serve.log" >&2; exit 1; }
}

echo "== exchange (repo:read, needs no approval), memory store, approvals off: wrk -t1 -c$CONNS -d$DURATION"
serve .writ-dev/approvals-off.toml
OUT=$(run_wrk "http://127.0.0.1:$PORT/oauth2/token" scripts/bench/exchange.lua); echo "$OUT"
OFF=$(echo "$OUT" | sed -n 's/^rps=//p')
stop_all
echo "== the same, approvals on"
serve .writ-dev/approvals-on.toml
OUT=$(run_wrk "http://127.0.0.1:$PORT/oauth2/token" scripts/bench/exchange.lua); echo "$OUT"
ON=$(echo "$OUT" | sed -n 's/^rps=//p')
python3 -c "import sys; off, on = float(sys.argv[1]), float(sys.argv[2]); print(f'approvals_cost_percent={(off - on) / off * 100:.1f}')" "$OFF" "$ON"

hold() { # how many: creates pending approvals of deploy:prod, writes their ids
  python3 - "$PORT" "$1" "$work/ids" <<'PY'
import json, os, sys, urllib.parse, urllib.request, urllib.error
port, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
body = urllib.parse.urlencode({
    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
    "subject_token": os.environ["SVID"],
    "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
    "scope": "deploy:prod", "audience": "https://api.example.org", "task_purpose": "bench",
}).encode()
ids = []
for _ in range(n):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/oauth2/token", data=body,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        urllib.request.urlopen(req)
        raise SystemExit("a deploy:prod request was not held")
    except urllib.error.HTTPError as e:
        v = json.loads(e.read())
        assert v["error"] == "authorization_pending", v
        ids.append(v["approval_id"])
open(out, "w").write("\n".join(ids) + "\n")
PY
}
pending_gauge() { curl -s "http://127.0.0.1:$PORT/metrics" | sed -n 's/^writ_approvals_pending /approvals_pending=/p'; }

echo "== polls of $PENDING pending approvals (round robin), memory store: wrk -t1 -c$CONNS -d$DURATION"
hold "$PENDING"
pending_gauge
APPROVAL_IDS="$work/ids" run_wrk "http://127.0.0.1:$PORT/oauth2/token" scripts/bench/poll.lua
stop_all

RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
sed -e "s/^backend = \"memory\"/backend = \"redis\"\nurl = \"redis:\/\/127.0.0.1:$RPORT\/0\"/" \
  "$work/.writ-dev/approvals-on.toml" > "$work/.writ-dev/approvals-redis.toml"
serve .writ-dev/approvals-redis.toml
echo "== polls of $PENDING pending approvals (round robin), Redis store: wrk -t1 -c$CONNS -d$DURATION"
hold "$PENDING"
pending_gauge
APPROVAL_IDS="$work/ids" run_wrk "http://127.0.0.1:$PORT/oauth2/token" scripts/bench/poll.lua
"$WRIT" audit verify "$work/.writ-dev/decisions.jsonl" >/dev/null && echo "decision_log=verified"

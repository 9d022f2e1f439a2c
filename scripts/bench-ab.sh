#!/usr/bin/env bash
# A/B exchange throughput: builds `writ` at each git revision given (a path to a built `writ`
# binary is used as it is), then runs the memory-store exchange benchmark of scripts/bench.sh
# (no trip rules, wrk -t1 -c32) against each build in turn, ROUNDS times, so that drift on the machine hits
# every build alike. Prints one line per run and the median per build.
#   scripts/bench-ab.sh b722248 HEAD
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 REV [REV ...]" >&2; exit 2; }
command -v wrk >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }

ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-10s}
CONNS=${BENCH_CONNECTIONS:-32}
ROOT=$PWD
AB=$ROOT/target/ab
mkdir -p "$AB"
work=$(mktemp -d)
PID=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  for d in "$work"/src-*; do [ -d "$d" ] && git -C "$ROOT" worktree remove --force "$d" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# One build per revision, sharing one target directory so dependencies build once.
BINS=()
for rev in "$@"; do
  if [ -f "$rev" ] && [ -x "$rev" ]; then
    sha=bin-$(basename "$rev"); cp "$rev" "$AB/writ-$sha"; BINS+=("$sha"); continue
  fi
  sha=$(git rev-parse --short "$rev")
  if [ ! -x "$AB/writ-$sha" ]; then
    git worktree add -q --detach "$work/src-$sha" "$sha"
    (cd "$work/src-$sha" && CARGO_TARGET_DIR="$AB/target" cargo build --release --quiet --bin writ)
    cp "$AB/target/release/writ" "$AB/writ-$sha"
  fi
  BINS+=("$sha")
done

# shellcheck source=scripts/bench/lib.sh
. "$ROOT/scripts/bench/lib.sh"

# One dev directory (keys, bundle, policies) for every build; trips off as in bench.sh.
mkdir -p "$work/dev/config" && cp -r config/policies "$work/dev/config/"
PORT=$(free_port)
( cd "$work/dev" && exec "$AB/writ-${BINS[0]}" dev --listen "127.0.0.1:$PORT" >dev.log 2>&1 ) &
PID=$!
wait_ready "$PORT"
kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
python3 - "$work/dev/.writ-dev/writ.toml" <<'PY'
import sys
p = sys.argv[1]
open(p.replace("writ.toml", "trips-off.toml"), "w").write(open(p).read().split("[trips]")[0])
PY
export SVID; SVID=$(cat "$work/dev/.writ-dev/demo.svid")

echo "== A/B exchange, memory store, no trip rules: wrk -t1 -c$CONNS -d$DURATION, $ROUNDS rounds, $(nproc) cores"
declare -A RESULTS
for round in $(seq 1 "$ROUNDS"); do
  for sha in "${BINS[@]}"; do
    rm -f "$work/dev/.writ-dev/decisions.jsonl"
    ( cd "$work/dev" && exec "$AB/writ-$sha" serve --config .writ-dev/trips-off.toml >"serve-$sha.log" 2>&1 ) &
    PID=$!
    wait_ready "$PORT"
    rps=$(wrk -t1 -c"$CONNS" -d"$DURATION" -s scripts/bench/exchange.lua "http://127.0.0.1:$PORT/oauth2/token" | sed -n 's/^rps=//p')
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    echo "round=$round build=$sha rps=$rps"
    RESULTS[$sha]="${RESULTS[$sha]:-} $rps"
  done
done
for sha in "${BINS[@]}"; do
  python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[2:]]; print(f'build={sys.argv[1]} median_rps={statistics.median(v):.0f}')" "$sha" ${RESULTS[$sha]}
done

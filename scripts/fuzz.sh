#!/usr/bin/env bash
# Coverage-guided fuzzing of Writ's parsers with cargo fuzz (libFuzzer), each target for a
# bounded time. Usage: scripts/fuzz.sh [seconds-per-target] [target...]
# Findings land in fuzz/artifacts/<target>/; fix them and copy the input to
# fuzz/regressions/<target>/ so tests/fuzz_regressions.rs keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(token_form jwt spiffe_id policy_entities)

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

# The machine's toolchain is stable; libFuzzer instrumentation and AddressSanitizer need the
# unstable flags that cargo fuzz passes, which RUSTC_BOOTSTRAP allows on a stable compiler.
export RUSTC_BOOTSTRAP=1
status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "== fuzz $t for ${secs}s"
  if ! cargo fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" "fuzz/regressions/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -max_len=8192 -print_final_stats=1; then
    echo "!! $t found a failing input: see fuzz/artifacts/$t/" >&2
    status=1
  fi
done
exit $status

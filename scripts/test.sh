#!/usr/bin/env bash
# Runs every test of Writ on a fresh machine: installs what the tests need (redis-server for
# the store tests), checks formatting and lints, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# Nothing here reads a terminal: cargo probes rustc with `rustc -`, which would otherwise read
# whatever the caller left on stdin (a CI log, say) as Rust source.
exec </dev/null

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --all-targets --locked

echo "== chart tests (Helm engine, kubernetes-validate --strict, checkov)"
# checkov pins versions that the interop tools conflict with: the chart tools get their own venv.
if [ ! -x .venv-chart/bin/checkov ] || ! .venv-chart/bin/python -c "import helm_python, kubernetes_validate" 2>/dev/null; then
  python3 -m venv .venv-chart
  .venv-chart/bin/pip install -q --disable-pip-version-check helm-python-sdk kubernetes-validate checkov
fi
cargo build --quiet --locked --bin writ
WRIT_BIN=target/debug/writ .venv-chart/bin/python tests/chart/test_chart.py

echo "== interop: PyJWT/jwcrypto, oauth4webapi/jose, oidc-provider; schemathesis on /openapi.json"
WRIT_BIN=target/debug/writ bash tests/interop/run.sh

echo "== writ policy test (sample policies)"
cargo run --quiet --locked -- policy test config/policies config/policies/cases.json

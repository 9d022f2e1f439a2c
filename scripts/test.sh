#!/usr/bin/env bash
# Runs every test of Writ on a fresh machine: installs what the tests need (redis-server for
# the store tests), checks formatting and lints, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo probes the compiler with `rustc -` and /dev/null as its stdin. Where /dev/null is a
# plain file (a container built without the device), whatever was written to it, such as the
# warnings of a dependency's build-script probe, would be read back as Rust source and the
# probe fails. Put the device back when we can, and otherwise empty the file before each cargo
# step.
if [ ! -c /dev/null ]; then
  echo "note: /dev/null is not a character device here; restoring it"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  if $SUDO mknod -m 666 /dev/null.writ c 1 3 2>/dev/null; then
    $SUDO mv -f /dev/null.writ /dev/null 2>/dev/null || $SUDO rm -f /dev/null.writ
  fi
fi
clear_devnull() { if [ -f /dev/null ] && [ -w /dev/null ]; then : >/dev/null; fi; }

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

echo "== cargo fmt --check"
clear_devnull
cargo fmt --all -- --check

# `fuzzing` builds the fuzz target bodies (src/fuzzing.rs), which tests/fuzz_regressions.rs
# runs over the kept inputs; it is the only feature, so this covers the default build too.
echo "== cargo clippy"
clear_devnull
cargo clippy --all-targets --locked --features fuzzing -- -D warnings

# The resource-server verifier alone (SPEC §9): it builds, lints and passes its tests without
# the broker, and none of the broker's server dependencies is in its tree.
echo "== cargo clippy / test --no-default-features --features verify"
clear_devnull
cargo clippy --all-targets --locked --no-default-features --features verify -- -D warnings
clear_devnull
cargo test --all-targets --locked --no-default-features --features verify
clear_devnull
# reqwest (the verifier's HTTP client) brings hyper's client side and tower-http's
# follow-redirect; the broker's server side must not come with them.
verify_tree=$(cargo tree --locked --no-default-features --features verify -e normal -f '{p} {f}' --prefix none | sort -u)
server_deps=$(echo "$verify_tree" | awk '{print $1}' \
  | grep -xE 'axum|axum-core|redis|cedar-policy|clap|clap_complete|tracing-subscriber|miette|toml|spiffe|rsa|rustix' || true)
server_features=$(echo "$verify_tree" | grep -E '^hyper .*[ ,]server(,|$)|^tower-http .*(limit|request-id)' || true)
if [ -n "$server_deps$server_features" ]; then
  echo "the verify build pulls in the broker's server dependencies: $server_deps $server_features" >&2
  exit 1
fi

# The SPIFFE test servers that tests/api/spire.rs starts (a Workload API server and a
# federation bundle endpoint, in Python) get their own venv with pinned packages.
if ! .venv-spiffe/bin/python -c "import grpc, cryptography; from spiffe._proto import workload_pb2_grpc" 2>/dev/null; then
  echo "installing the SPIFFE test servers' packages (tests/interop/spiffe/requirements.lock)"
  python3 -m venv .venv-spiffe
  .venv-spiffe/bin/pip install -q --disable-pip-version-check -r tests/interop/spiffe/requirements.lock
fi

echo "== cargo test (with the fuzz regression tests)"
clear_devnull
cargo test --all-targets --locked --features fuzzing

echo "== cargo deny: licenses, bans, sources (deny.toml)"
if ! command -v cargo-deny >/dev/null 2>&1; then
  # A one-off build from crates.io: about 10 minutes on two cores.
  echo "installing cargo-deny"
  clear_devnull
  cargo install --locked cargo-deny
fi
clear_devnull
cargo deny --locked check licenses bans sources
# The RustSec advisory database is a git repository on GitHub. Fetch it when GitHub answers;
# otherwise use a copy already on this machine; with neither, say so plainly.
advisory_dbs="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
timeout 120 cargo deny fetch db >/dev/null 2>&1 || true
if compgen -G "$advisory_dbs/*/crates" >/dev/null; then
  echo "== cargo deny: advisories (database in $advisory_dbs)"
  clear_devnull
  cargo deny --frozen check advisories
else
  echo "== cargo deny: advisories SKIPPED: no RustSec advisory database in $advisory_dbs and" \
       "github.com (where it is fetched from) is unreachable; run 'cargo deny check advisories'" \
       "on a machine that reaches GitHub"
fi

echo "== chart tests (Helm engine, kubernetes-validate --strict, checkov)"
# checkov pins versions that the interop tools conflict with: the chart tools get their own venv.
if [ ! -x .venv-chart/bin/checkov ] || ! .venv-chart/bin/python -c "import helm_python, kubernetes_validate" 2>/dev/null; then
  python3 -m venv .venv-chart
  .venv-chart/bin/pip install -q --disable-pip-version-check helm-python-sdk kubernetes-validate checkov
fi
clear_devnull
cargo build --quiet --locked --bin writ --example resource_server
WRIT_BIN=target/debug/writ .venv-chart/bin/python tests/chart/test_chart.py

echo "== interop: PyJWT/jwcrypto, oauth4webapi/jose, oidc-provider, mTLS (requests, ssl, curl); schemathesis on /openapi.json"
# curl is one of the mTLS clients (--cert/--key).
command -v curl >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
}
clear_devnull
WRIT_BIN=target/debug/writ bash tests/interop/run.sh

echo "== writ policy test (sample policies)"
clear_devnull
cargo run --quiet --locked -- policy test config/policies config/policies/cases.json

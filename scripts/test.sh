#!/usr/bin/env bash
# The whole suite: set up what the tests need (fuse3, moto venv), check format
# and lints, run unit, core and end-to-end tests, then the benchmark's smoke mode.
# Run as root on a machine with /dev/fuse (as the build machines are).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The end-to-end tests start their own moto servers and mount in temp dirs.
cargo test --all-targets -- --test-threads=4
scripts/bench.sh --smoke

#!/usr/bin/env bash
# The whole suite: set up what the tests need (fuse3, moto and Airflow venvs),
# check format and lints, run unit, core and end-to-end tests, the Airflow
# backend's pytest suite against real Airflow, then the benchmark's and the
# fleet simulation's smoke modes.
# Run as root on a machine with /dev/fuse (as the build machines are).
set -euo pipefail
cd "$(dirname "$0")/.."
# Where the time goes, in the log (a fresh machine must stay well under 30 min).
step() { echo "[test.sh] ${SECONDS} s: $*" >&2; }
step setup
scripts/setup.sh
step format and lints
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
step tests
# The end-to-end tests start their own moto servers and mount in temp dirs.
cargo test --all-targets -- --test-threads=4
step Airflow backend
# The Airflow backend against real Airflow 3 and 2, the debug binary and moto.
for venv in .venv-airflow .venv-airflow2; do
    SSMFS_BIN="$PWD/target/debug/ssmfs" "$venv/bin/python" -m pytest -q -p no:cacheprovider integrations/airflow
done
step benchmark and fleet smoke runs
scripts/bench.sh --smoke
scripts/fleet.sh --smoke
step done

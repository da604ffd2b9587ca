#!/usr/bin/env bash
# The whole suite: set up what the tests need (fuse3, moto and Airflow venvs),
# check format and lints, run unit, core and end-to-end tests, csi-sanity
# against the CSI node plugin, the Airflow backend's pytest suite against
# real Airflow, the container image under
# podman, the Kubernetes manifests and Helm chart, the Debian package, then
# the benchmark's, the fleet simulation's and the rotation benchmark's smoke modes.
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
step image
# The container image from the debug build the tests use (stripped): the
# podman tests run it; a release build would add minutes for the same code.
cargo build --quiet --bin ssmfs
scripts/image.sh --binary target/debug/ssmfs
step tests
# The end-to-end tests start their own moto servers and mount in temp dirs.
cargo test --all-targets -- --test-threads=4
step CSI conformance: csi-sanity against ssmfs csi
scripts/csi_sanity.sh --binary target/debug/ssmfs
step Kubernetes manifests, Helm chart and the Debian package
scripts/k8s_check.sh
scripts/package.sh --binary target/debug/ssmfs --check
step Airflow backend
# The Airflow backend against real Airflow 3 and 2, the debug binary and moto.
for venv in .venv-airflow .venv-airflow2; do
    SSMFS_BIN="$PWD/target/debug/ssmfs" "$venv/bin/python" -m pytest -q -p no:cacheprovider integrations/airflow
done
step benchmark and fleet smoke runs
scripts/bench.sh --smoke
scripts/fleet.sh --smoke
scripts/rotation_bench.sh --smoke
step done

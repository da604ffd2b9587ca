#!/usr/bin/env bash
# Fleet simulation: the real filesystem core of N simulated hosts in one
# process, against one shared in-memory store with SSM's account-wide quotas,
# on a virtual clock (examples/fleet.rs). Prints a table and writes
# .ssmfs-run/fleet.json, one object per scenario.
#   scripts/fleet.sh           the four scenarios at full scale (about a minute)
#   scripts/fleet.sh --smoke   a tenth of the hosts, a fifth of the time (CI)
# Exits non-zero if a scenario misses its target.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=()
[ "${1:-}" = "--smoke" ] && mode=(--smoke)
cargo build --release --quiet --example fleet
mkdir -p .ssmfs-run
out=.ssmfs-run/fleet.json
./target/release/examples/fleet "${mode[@]}" --out "$out" | tee .ssmfs-run/fleet.txt
grep -q 'every target met: true' .ssmfs-run/fleet.txt

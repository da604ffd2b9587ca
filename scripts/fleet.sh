#!/usr/bin/env bash
# Fleet simulation: the real filesystem core of N simulated hosts in one
# process, against one shared in-memory store with SSM's account-wide quotas,
# on a virtual clock (examples/fleet.rs). Prints a table and writes
# .ssmfs-run/fleet.json, one object per scenario.
#   scripts/fleet.sh           the seven scenarios at full scale (about five minutes)
#   scripts/fleet.sh --smoke   a tenth of the hosts, a fifth of the time, debug
#                              build (CI)
#   scripts/fleet.sh --check   the simulation against 20 real daemons and moto:
#                              per-host calls per TTL side by side (about 4 min)
# A full run exits non-zero if a scenario misses its target.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=(); build=(--release); bin=./target/release
# A smoke run shows that the simulation runs: the debug build the tests made
# serves it (26 s here), instead of minutes of release build.
[ "${1:-}" = "--smoke" ] && { mode=(--smoke); build=(); bin=./target/debug; }
cargo build "${build[@]}" --quiet --example fleet
if [ "${1:-}" = "--check" ]; then
    hosts=20; ttl=30; seconds=180
    scripts/setup.sh
    cargo build --release --quiet --bin ssmfs
    run=.ssmfs-run/fleet-check; rm -rf "$run"; mkdir -p "$run"
    port=5078
    endpoint=$(scripts/moto.sh start $port)
    export AWS_ACCESS_KEY_ID=fleet AWS_SECRET_ACCESS_KEY=fleet AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
    pids=()
    cleanup() {
        for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        wait 2>/dev/null || true
        for m in "$run"/mnt*; do mountpoint -q "$m" && umount -l "$m"; done
        scripts/moto.sh stop $port
    }
    trap cleanup EXIT
    .venv/bin/python - "$endpoint" <<'PY'
import sys, boto3
ssm = boto3.client("ssm", endpoint_url=sys.argv[1], region_name="us-east-1")
for d in range(5):
    for k in range(10):
        ssm.put_parameter(Name=f"/fleet/d{d}/k{k}", Value=f"value-{d}-{k}", Type="SecureString", Overwrite=True)
PY
    mounts=()
    for i in $(seq 1 $hosts); do
        mkdir -p "$run/mnt$i"
        ./target/release/ssmfs --foreground --endpoint-url "$endpoint" --ttl ${ttl}s \
            --metrics-addr 127.0.0.1:$((9300 + i)) /fleet "$run/mnt$i" 2>"$run/ssmfs$i.log" &
        pids+=($!); mounts+=("$run/mnt$i")
    done
    for m in "${mounts[@]}"; do until mountpoint -q "$m"; do sleep 0.05; done; done
    calls() { # the API calls of every daemon, one line each
        for i in $(seq 1 $hosts); do
            curl -s "http://127.0.0.1:$((9300 + i))/metrics" | awk '/^ssmfs_api_calls_total/ {s+=$2} END {print s+0}'
        done
    }
    .venv/bin/python bench/fleet_readers.py $seconds "${mounts[@]}" &
    readers=$!
    sleep $((2 * ttl)); calls > "$run/calls.before"
    wait $readers
    calls > "$run/calls.after"
    real=$(paste "$run/calls.before" "$run/calls.after" | awk -v ttl=$ttl -v from=$((2 * ttl)) -v to=$seconds \
        '{ s += $2 - $1; n++ } END { printf "%.2f", s / n / ((to - from) / ttl) }')
    $bin/examples/fleet --check $hosts $ttl $seconds --out "$run/sim.json" > "$run/sim.txt"
    sim=$(sed -n 's/.*"calls_per_host_per_ttl": \([0-9.]*\).*/\1/p' "$run/sim.json")
    echo "| check | hosts | TTL | measured | calls per host per TTL |"
    echo "|---|---|---|---|---|"
    echo "| real daemons against moto | $hosts | ${ttl}s | $((seconds - 2 * ttl)) s | $real |"
    echo "| simulation | $hosts | ${ttl}s | $((seconds - 2 * ttl)) s | $sim |"
    awk -v r="$real" -v s="$sim" 'BEGIN { d = (r - s) / s; printf "difference: %+.0f%% (within 20%%: %s)\n", d * 100, (d < 0.2 && d > -0.2) ? "yes" : "no"; exit !(d < 0.2 && d > -0.2) }'
    exit $?
fi
mkdir -p .ssmfs-run
out=.ssmfs-run/fleet.json
$bin/examples/fleet "${mode[@]}" --out "$out" | tee .ssmfs-run/fleet.txt
# The targets are set for the full scale; a smoke run only shows that it runs.
[ ${#mode[@]} -gt 0 ] || grep -q 'every target met: true' .ssmfs-run/fleet.txt

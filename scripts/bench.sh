#!/usr/bin/env bash
# Benchmark: ssmfs against tmpfs (warm reads) and against a direct SDK client
# (API calls), side by side in one run. Prints a table and writes bench.json.
#   scripts/bench.sh           full run
#   scripts/bench.sh --smoke   a few iterations of the debug build, only to check
#                              that it works (CI: the tests built it already)
# Timings are ratios from the same run; API calls are counted by ssmfs's metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0; [ "${1:-}" = "--smoke" ] && smoke=1
iters=200000; listing=1000; hot_reads=5000; cached=100000; variable_gets=2000
[ $smoke = 1 ] && { iters=2000; listing=100; hot_reads=500; cached=10000; variable_gets=100; }
scripts/setup.sh
# A smoke run shows that the benchmark runs, not how fast: the debug build the
# tests made serves it, instead of minutes of release build.
build=(--release); bin=./target/release
[ $smoke = 1 ] && { build=(); bin=./target/debug; }
cargo build "${build[@]}" --quiet --bin ssmfs --example cache_memory
run=.ssmfs-run/bench; rm -rf "$run"; mkdir -p "$run/mnt" "$run/tmpfs"
gcc -O2 -pthread -o "$run/readloop" bench/readloop.c
port=5077
endpoint=$(scripts/moto.sh start $port)
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
pid=""; af_pid=""; sup_pid=""
cleanup() {
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    [ -n "$sup_pid" ] && kill -TERM "$sup_pid" 2>/dev/null && wait "$sup_pid" 2>/dev/null || true
    mountpoint -q "$run/sup" && umount -l "$run/sup" || true
    [ -n "$af_pid" ] && kill -TERM "$af_pid" 2>/dev/null && wait "$af_pid" 2>/dev/null || true
    mountpoint -q "$run/mnt" && umount -l "$run/mnt" || true
    mountpoint -q "$run/af" && umount -l "$run/af" || true
    mountpoint -q "$run/tmpfs" && umount "$run/tmpfs" || true
    scripts/moto.sh stop $port
}
trap cleanup EXIT
secret=$(head -c 48 /dev/urandom | base64 | head -c 64)
.venv/bin/python - "$endpoint" "$secret" "$listing" <<'PY'
import sys, boto3
ssm = boto3.client("ssm", endpoint_url=sys.argv[1], region_name="us-east-1")
ssm.put_parameter(Name="/bench/a/b/secret", Value=sys.argv[2], Type="SecureString", Overwrite=True)
for i in range(int(sys.argv[3])):
    ssm.put_parameter(Name=f"/bench/big/p{i:04d}", Value="v" * 100, Type="String", Overwrite=True)
for i in range(50):
    ssm.put_parameter(Name=f"/bench/hot/s{i:02d}", Value=f"hot-{i}", Type="SecureString", Overwrite=True)
PY
mount -t tmpfs tmpfs "$run/tmpfs"; mkdir -p "$run/tmpfs/a/b" "$run/tmpfs/big"; printf %s "$secret" > "$run/tmpfs/a/b/secret"
for i in $(seq 0 $((listing - 1))); do printf '%0100d' 0 > "$run/tmpfs/big/p$(printf %04d $i)"; done
metrics=127.0.0.1:9177
calls() { curl -s "http://$metrics/metrics" | awk '/^ssmfs_api_calls_total/ {s+=$2} END {print s+0}'; }
start_ns=$(date +%s%N)
$bin/ssmfs --foreground --endpoint-url "$endpoint" --metrics-addr $metrics --max-tps 1000 /bench "$run/mnt" 2>"$run/ssmfs.log" &
pid=$!
until mountpoint -q "$run/mnt"; do sleep 0.002; done
mounted_ns=$(date +%s%N)
mount_calls=$(calls)  # the mount-time check: the first page below /bench
cat_start_ns=$(date +%s%N); cat "$run/mnt/a/b/secret" >/dev/null; cat_end_ns=$(date +%s%N)
startup_ms=$(( (mounted_ns - start_ns + cat_end_ns - cat_start_ns) / 1000000 ))
cold_calls=$(( $(calls) - mount_calls ))
sec="$run/mnt/a/b/secret"; ref="$run/tmpfs/a/b/secret"
[ "$(cat "$sec")" = "$secret" ] || { echo "bench: wrong bytes" >&2; exit 1; }
# Row 1: ssmfs and tmpfs alternate in 5 rounds and each side reports its median,
# so drift in CPU frequency or background load hits both sides alike.
paired() { # ITERS THREADS read|stat -> "ssmfs_ns tmpfs_ns"
    local a=() b=()
    for _ in 1 2 3 4 5; do
        a+=("$("$run/readloop" "$sec" "$1" "$2" "$3")"); b+=("$("$run/readloop" "$ref" "$1" "$2" "$3")")
    done
    echo "$(printf '%s\n' "${a[@]}" | sort -g | sed -n 3p) $(printf '%s\n' "${b[@]}" | sort -g | sed -n 3p)"
}
read -r r1 t1 <<<"$(paired $((iters / 5)) 1 read)"
read -r r16 t16 <<<"$(paired $((iters / 80)) 16 read)"
read -r rs ts <<<"$(paired $((iters / 5)) 1 stat)"
# Row 1b: Python readers. open().read() calls isatty() (one ioctl round trip to
# the daemon per open before Python 3.14); os.open/os.read does not.
python_reads() { # PATH -> "open_read_ns os_read_ns"
    .venv/bin/python - "$1" "$((iters / 20))" <<'PY'
import os, sys, time
path, n = sys.argv[1], int(sys.argv[2])
def best(f):
    times = []
    for _ in range(5):
        t = time.perf_counter_ns()
        for _ in range(n):
            f()
        times.append((time.perf_counter_ns() - t) // n)
    return sorted(times)[2]
def with_open():
    with open(path, "rb") as fh:
        fh.read()
def with_os():
    fd = os.open(path, os.O_RDONLY)
    os.read(fd, 65536)
    os.close(fd)
print(best(with_open), best(with_os))
PY
}
read -r py_open py_os <<<"$(python_reads "$sec")"
read -r py_open_t py_os_t <<<"$(python_reads "$ref")"
warm_calls=$(( $(calls) - mount_calls - cold_calls ))
before=$(calls); a=$(date +%s%N); ls -l "$run/mnt/big" >/dev/null; ls_cold_ms=$(( ($(date +%s%N) - a) / 1000000 )); ls_cold=$(( $(calls) - before ))
before=$(calls); a=$(date +%s%N); ls -l "$run/mnt/big" >/dev/null; ls_warm_ms=$(( ($(date +%s%N) - a) / 1000000 )); ls_warm=$(( $(calls) - before ))
# Warm listings again, averaged over 20 runs each, against tmpfs.
avg_us() { local a; a=$(date +%s%N); for _ in $(seq 20); do ls -l "$1" >/dev/null; done; echo $(( ($(date +%s%N) - a) / 20000 )); }
ls -l "$run/tmpfs/big" >/dev/null; ls_warm_us=$(avg_us "$run/mnt/big"); ls_tmpfs_us=$(avg_us "$run/tmpfs/big")
before=$(calls)
for i in $(seq 0 $((hot_reads - 1))); do echo "$run/mnt/hot/s$(printf %02d $((i % 50)))"; done | xargs cat >/dev/null
hot_calls=$(( $(calls) - before ))
rss_kb=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
rss_anon_kb=$(awk '/RssAnon/ {print $2}' /proc/$pid/status); rss_file_kb=$(awk '/RssFile/ {print $2}' /proc/$pid/status)
cp /proc/$pid/smaps "$run/smaps.txt"
# The reference for row 4: what Airflow's backend does with its cache off, one
# GetParameter per read, made by a real SDK client against the same server.
read -r direct_calls direct_us <<<"$(.venv/bin/python - "$endpoint" "$hot_reads" <<'PY'
import sys, time, boto3
ssm = boto3.client("ssm", endpoint_url=sys.argv[1], region_name="us-east-1")
reads, calls, start = int(sys.argv[2]), 0, time.perf_counter()
for i in range(reads):
    ssm.get_parameter(Name=f"/bench/hot/s{i % 50:02d}", WithDecryption=True)
    calls += 1
print(calls, int((time.perf_counter() - start) * 1e6 / reads))
PY
)"
# Row 7: Variable.get through Airflow with each secrets backend, in a process
# configured only by environment variables. ssmfs_airflow reads a second mount
# in the Airflow layout; API calls are counted in moto's access log.
moto_posts() { sleep 0.2; grep -c '"POST /' ".ssmfs-run/moto-$port.log" || true; }
mkdir -p "$run/af"
$bin/ssmfs --foreground --endpoint-url "$endpoint" --max-tps 1000 \
    --airflow-kwargs '{"variables_prefix": "/bench/hot", "connections_prefix": null, "config_prefix": null}' \
    "$run/af" 2>"$run/ssmfs-airflow.log" &
af_pid=$!
until mountpoint -q "$run/af"; do sleep 0.01; done
variable_get() { # BACKEND -> "us_per_lookup api_calls"
    local fifo="$run/vg.fifo" out="$run/vg.out" before line
    rm -f "$fifo"; mkfifo "$fifo"
    .venv-airflow/bin/python bench/airflow_variable_get.py "$1" "$endpoint" "${af_dir:-$run/af}" "$variable_gets" <"$fifo" >"$out" 2>"$run/vg-$1.log" &
    local py=$!
    exec 7>"$fifo"
    until grep -q '^WARM' "$out" 2>/dev/null; do kill -0 $py 2>/dev/null || { cat "$run/vg-$1.log" >&2; exit 1; }; sleep 0.05; done
    before=$(moto_posts)
    echo >&7; exec 7>&-
    wait $py
    line=$(grep -E '^[0-9]+ [0-9]+$' "$out")
    echo "${line%% *} $(( $(moto_posts) - before ))"
}
read -r vg_ssmfs_us vg_ssmfs_calls <<<"$(variable_get ssmfs)"
# The same backend over a tmpfs copy of the layout: what the backend costs.
mkdir -p "$run/tmpfs/af/variables"
for i in $(seq 0 49); do printf 'hot-%d' "$i" > "$run/tmpfs/af/variables/s$(printf %02d "$i")"; done
read -r vg_tmpfs_us _ <<<"$(af_dir="$run/tmpfs/af" variable_get tmpfs)"
read -r vg_ssm_us vg_ssm_calls <<<"$(variable_get ssm)"
kill -TERM $af_pid; wait $af_pid 2>/dev/null || true; af_pid=""
# Row 8: the longest read while the serving daemon restarts (--supervise): 8
# reader processes loop over 20 secrets while the daemon is SIGKILLed every
# 2 s and the kernel's caches dropped, so reads reach the daemon.
stall_seconds=20; [ $smoke = 1 ] && stall_seconds=5
mkdir -p "$run/sup"
$bin/ssmfs --foreground --supervise --pid-file "$run/sup.pid" --endpoint-url "$endpoint" --ttl 1s /bench/hot "$run/sup" 2>"$run/sup.log" &
sup_pid=$!
until mountpoint -q "$run/sup" && [ -s "$run/sup.pid" ]; do sleep 0.01; done
pairs=(); for i in $(seq 0 19); do pairs+=("s$(printf %02d "$i")=hot-$i"); done
readers=(); for n in 1 2 3 4 5 6 7 8; do
    .venv/bin/python tests/support/readers.py "$run/sup" "$stall_seconds" "${pairs[@]}" >"$run/reader-$n.json" &
    readers+=($!)
done
kills=0; stop_at=$((SECONDS + stall_seconds - 1))
while [ $SECONDS -lt $stop_at ]; do
    sleep 2; kill -KILL "$(cat "$run/sup.pid")" 2>/dev/null || true; kills=$((kills + 1))
    echo 2 >/proc/sys/vm/drop_caches
done
wait "${readers[@]}"
read -r stall_reads stall_failed stall_ms <<<"$(cat "$run"/reader-*.json | .venv/bin/python -c '
import json, sys
r = [json.loads(l) for l in sys.stdin]
print(sum(x["reads"] for x in r), sum(x["failures"] + x["wrong"] for x in r), max(x["longest_ms"] for x in r))')"
kill -TERM $sup_pid; wait $sup_pid 2>/dev/null || true; sup_pid=""
# Row 5: cache and inode bookkeeping for $cached parameters of 100 bytes, measured
# through the filesystem core in its own process (seeding moto with 100,000
# parameters would take longer than the rest of the benchmark together).
read -r _ cache_growth_kb heap_per_param <<<"$($bin/examples/cache_memory $cached)"
projected_kb=$(( rss_kb + cache_growth_kb ))
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
direct_ratio=$(awk -v d=$direct_calls -v s=$hot_calls 'BEGIN { printf "%.0f", d / (s > 0 ? s : 1) }')
met() { awk "BEGIN { print ($1) ? \"true\" : \"false\" }"; }
targets="{\"row1_within_1.5x_tmpfs\": $(met "$r1 <= 1.5 * $t1"), \"row1_no_api_calls_warm\": $(met "$warm_calls == 0"),
 \"row2_mount_one_call\": $(met "$mount_calls <= 1"), \"row2_one_round_trip_per_component\": $(met "$cold_calls <= 2 * 3"), \"row3_cold_calls\": $(met "$ls_cold <= ($listing + 9) / 10 + 1"),
 \"row3_warm_zero\": $(met "$ls_warm == 0"), \"row4_50x_fewer\": $(met "$direct_ratio >= 50"),
 \"row5_64mib\": $(met "$projected_kb <= 65536"), \"row6_under_100ms\": $(met "$startup_ms < 100"),
 \"row7_no_calls_warm\": $(met "$vg_ssmfs_calls == 0"), \"row7_within_1.5x_tmpfs\": $(met "$vg_ssmfs_us <= 1.5 * $vg_tmpfs_us"),
 \"python_open_within_2x_tmpfs\": $(met "$py_open <= 2 * $py_open_t"), \"row8_no_failed_read\": $(met "$stall_failed == 0")}"
cat <<TABLE
| row | measure | ssmfs | reference | ratio |
|---|---|---|---|---|
| 1 | warm open+read+close, 1 thread (ns/op) | $r1 | tmpfs $t1 | $(ratio $r1 $t1)x |
| 1 | warm open+read+close, 16 threads (ns/op) | $r16 | tmpfs $t16 | $(ratio $r16 $t16)x |
| 1 | warm stat (ns/op) | $rs | tmpfs $ts | $(ratio $rs $ts)x |
| 1 | warm Python open(f, "rb").read() (ns/op; one ioctl per open) | $py_open | tmpfs $py_open_t | $(ratio $py_open $py_open_t)x |
| 1 | warm Python os.open/os.read/os.close (ns/op) | $py_os | tmpfs $py_os_t | $(ratio $py_os $py_os_t)x |
| 1 | API calls during warm loops | $warm_calls | 0 | |
| 2 | mount: API calls | $mount_calls | <= 1 | |
| 2 | cold cat 3 levels down: API calls (a probe is 2 calls in 1 round trip) | $cold_calls | <= 3 round trips (6 calls) | |
| 3 | ls -l of $listing parameters, cold: API calls / ms | $ls_cold / $ls_cold_ms | <= $(( (listing + 9) / 10 + 1 )) | |
| 3 | ls -l, warm: API calls / ms | $ls_warm / $ls_warm_ms | 0 | |
| 3 | ls -l, warm, mean of 20 (us) | $ls_warm_us | tmpfs $ls_tmpfs_us | $(ratio $ls_warm_us $ls_tmpfs_us)x |
| 4 | $hot_reads reads of 50 secrets: API calls | $hot_calls | direct boto3 client $direct_calls ($direct_us us/read) | ${direct_ratio}x fewer |
| 5 | daemon resident memory after the runs above (KiB: anon + file) | $rss_kb ($rss_anon_kb + $rss_file_kb) | | |
| 5 | cache growth for $cached parameters of 100 B (KiB; heap B/param) | $cache_growth_kb; $heap_per_param | | |
| 5 | daemon + $cached cached parameters (KiB) | $projected_kb | <= 65536 | $(ratio $projected_kb 65536)x |
| 6 | start to first read served (ms) | $startup_ms | < 100 | |
| 7 | $variable_gets warm Variable.get through Airflow: us per call / API calls | ssmfs_airflow $vg_ssmfs_us / $vg_ssmfs_calls | SSM backend $vg_ssm_us / $vg_ssm_calls | $(ratio $vg_ssm_us $vg_ssmfs_us)x faster |
| 7 | the same, ssmfs_airflow over the mount against over a tmpfs copy (us per call) | $vg_ssmfs_us | tmpfs $vg_tmpfs_us | $(ratio $vg_ssmfs_us $vg_tmpfs_us)x |
| 8 | --supervise, daemon SIGKILLed $kills times in ${stall_seconds} s: longest read (ms) / failed reads of $stall_reads | $stall_ms / $stall_failed | 0 failed | |
TABLE
cat > "$run/../bench.json" <<JSON
{"smoke": $smoke, "python_read_ns": {"open_read": $py_open, "open_read_tmpfs": $py_open_t, "os_read": $py_os, "os_read_tmpfs": $py_os_t},
 "warm_read_ns": {"ssmfs_1": $r1, "tmpfs_1": $t1, "ssmfs_16": $r16, "tmpfs_16": $t16, "ssmfs_stat": $rs, "tmpfs_stat": $ts},
 "warm_api_calls": $warm_calls, "mount_api_calls": $mount_calls, "cold_cat_api_calls": $cold_calls,
 "ls": {"entries": $listing, "cold_calls": $ls_cold, "cold_ms": $ls_cold_ms, "warm_calls": $ls_warm, "warm_ms": $ls_warm_ms, "warm_mean_us": $ls_warm_us, "tmpfs_mean_us": $ls_tmpfs_us},
 "repeated_reads": {"reads": $hot_reads, "ssmfs_calls": $hot_calls, "direct_calls": $direct_calls, "direct_us_per_read": $direct_us},
 "rss_kib": $rss_kb, "rss_anon_kib": $rss_anon_kb, "rss_file_kib": $rss_file_kb, "memory": {"parameters": $cached, "cache_growth_kib": $cache_growth_kb, "heap_bytes_per_parameter": $heap_per_param, "projected_kib": $projected_kb, "target_kib": 65536},
 "startup_ms": $startup_ms,
 "variable_get": {"lookups": $variable_gets, "ssmfs_us": $vg_ssmfs_us, "ssmfs_calls": $vg_ssmfs_calls, "tmpfs_us": $vg_tmpfs_us, "ssm_backend_us": $vg_ssm_us, "ssm_backend_calls": $vg_ssm_calls},
 "supervised_restarts": {"seconds": $stall_seconds, "kills": $kills, "reads": $stall_reads, "failed": $stall_failed, "longest_read_ms": $stall_ms},
 "targets_met": $targets}
JSON
if [ $smoke = 1 ]; then
    echo "smoke run (debug build, few iterations): targets are judged on a full run only"
else
    echo "targets met: $targets"
fi
echo "wrote .ssmfs-run/bench.json"

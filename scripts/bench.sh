#!/usr/bin/env bash
# Benchmark: ssmfs against tmpfs (warm reads) and against a direct SDK client
# (API calls), side by side in one run. Prints a table and writes bench.json.
#   scripts/bench.sh           full run
#   scripts/bench.sh --smoke   a few iterations, only to check that it works (CI)
# Timings are ratios from the same run; API calls are counted by ssmfs's metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0; [ "${1:-}" = "--smoke" ] && smoke=1
iters=200000; listing=1000; hot_reads=5000; [ $smoke = 1 ] && { iters=2000; listing=100; hot_reads=500; }
scripts/setup.sh
cargo build --release --quiet
run=.ssmfs-run/bench; rm -rf "$run"; mkdir -p "$run/mnt" "$run/tmpfs"
gcc -O2 -pthread -o "$run/readloop" bench/readloop.c
port=5077
endpoint=$(scripts/moto.sh start $port)
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
pid=""
cleanup() {
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    mountpoint -q "$run/mnt" && umount -l "$run/mnt" || true
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
mount -t tmpfs tmpfs "$run/tmpfs"; mkdir -p "$run/tmpfs/a/b"; printf %s "$secret" > "$run/tmpfs/a/b/secret"
metrics=127.0.0.1:9177
calls() { curl -s "http://$metrics/metrics" | awk '/^ssmfs_api_calls_total/ {s+=$2} END {print s+0}'; }
start_ns=$(date +%s%N)
./target/release/ssmfs --foreground --endpoint-url "$endpoint" --metrics-addr $metrics --max-tps 1000 /bench "$run/mnt" 2>"$run/ssmfs.log" &
pid=$!
until mountpoint -q "$run/mnt"; do sleep 0.002; done
cat "$run/mnt/a/b/secret" >/dev/null
startup_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
cold_calls=$(calls)
sec="$run/mnt/a/b/secret"; ref="$run/tmpfs/a/b/secret"
[ "$(cat "$sec")" = "$secret" ] || { echo "bench: wrong bytes" >&2; exit 1; }
r1=$("$run/readloop" "$sec" $iters 1 read); t1=$("$run/readloop" "$ref" $iters 1 read)
r16=$("$run/readloop" "$sec" $((iters/16)) 16 read); t16=$("$run/readloop" "$ref" $((iters/16)) 16 read)
rs=$("$run/readloop" "$sec" $iters 1 stat); ts=$("$run/readloop" "$ref" $iters 1 stat)
warm_calls=$(( $(calls) - cold_calls ))
before=$(calls); a=$(date +%s%N); ls -l "$run/mnt/big" >/dev/null; ls_cold_ms=$(( ($(date +%s%N) - a) / 1000000 )); ls_cold=$(( $(calls) - before ))
before=$(calls); a=$(date +%s%N); ls -l "$run/mnt/big" >/dev/null; ls_warm_ms=$(( ($(date +%s%N) - a) / 1000000 )); ls_warm=$(( $(calls) - before ))
before=$(calls)
for i in $(seq 0 $((hot_reads - 1))); do echo "$run/mnt/hot/s$(printf %02d $((i % 50)))"; done | xargs cat >/dev/null
hot_calls=$(( $(calls) - before ))
rss_kb=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
direct_ratio=$(awk -v d=$hot_reads -v s=$hot_calls 'BEGIN { printf "%.0f", d / (s > 0 ? s : 1) }')
cat <<TABLE
| row | measure | ssmfs | reference | ratio |
|---|---|---|---|---|
| 1 | warm open+read+close, 1 thread (ns/op) | $r1 | tmpfs $t1 | $(ratio $r1 $t1)x |
| 1 | warm open+read+close, 16 threads (ns/op) | $r16 | tmpfs $t16 | $(ratio $r16 $t16)x |
| 1 | warm stat (ns/op) | $rs | tmpfs $ts | $(ratio $rs $ts)x |
| 1 | API calls during warm loops | $warm_calls | 0 | |
| 2 | cold cat 3 levels down: API calls (mount included) | $cold_calls | <= 3 round trips | |
| 3 | ls -l of $listing parameters, cold: API calls / ms | $ls_cold / $ls_cold_ms | <= $(( (listing + 9) / 10 + 1 )) | |
| 3 | ls -l, warm: API calls / ms | $ls_warm / $ls_warm_ms | 0 | |
| 4 | $hot_reads reads of 50 secrets: API calls | $hot_calls | direct client $hot_reads | ${direct_ratio}x fewer |
| 5 | daemon resident memory (KiB) | $rss_kb | | |
| 6 | start to first read served (ms) | $startup_ms | < 100 | |
TABLE
cat > "$run/../bench.json" <<JSON
{"smoke": $smoke, "warm_read_ns": {"ssmfs_1": $r1, "tmpfs_1": $t1, "ssmfs_16": $r16, "tmpfs_16": $t16, "ssmfs_stat": $rs, "tmpfs_stat": $ts},
 "warm_api_calls": $warm_calls, "cold_cat_api_calls": $cold_calls,
 "ls": {"entries": $listing, "cold_calls": $ls_cold, "cold_ms": $ls_cold_ms, "warm_calls": $ls_warm, "warm_ms": $ls_warm_ms},
 "repeated_reads": {"reads": $hot_reads, "ssmfs_calls": $hot_calls, "direct_calls": $hot_reads},
 "rss_kib": $rss_kb, "startup_ms": $startup_ms}
JSON
echo "wrote .ssmfs-run/bench.json"

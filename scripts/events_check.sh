#!/usr/bin/env bash
# Pacing of change events, checked for real: 20 ssmfs daemons in topic mode
# against moto, their SSM calls through a proxy that throttles at 5 TPS as an
# account quota would (tests/support/throttle_proxy.py). A key all of them
# read is rotated and its event published once; the script counts throttled
# calls and when each daemon first serves the new value, against the spread
# window the pacing model gives for 20 hosts at that quota: 20 / (5 / 2) = 8 s.
#   scripts/events_check.sh [HOSTS] [TPS]     (about a minute; root, /dev/fuse)
set -euo pipefail
cd "$(dirname "$0")/.."
hosts=${1:-20}; tps=${2:-5}
scripts/setup.sh
cargo build --release --quiet --bin ssmfs --example cache_memory  # as bench.sh: one build serves both
run=.ssmfs-run/events-check; rm -rf "$run"; mkdir -p "$run"
port=5079
endpoint=$(scripts/moto.sh start $port)
export AWS_ACCESS_KEY_ID=check AWS_SECRET_ACCESS_KEY=check AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
pids=(); proxy_pid=""
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    [ -n "$proxy_pid" ] && kill "$proxy_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    for m in "$run"/mnt*; do mountpoint -q "$m" && umount -l "$m"; done
    scripts/moto.sh stop $port
}
trap cleanup EXIT
.venv/bin/python tests/support/throttle_proxy.py "$endpoint" "$tps" >"$run/proxy.port" &
proxy_pid=$!
until [ -s "$run/proxy.port" ]; do sleep 0.05; done
proxy="http://127.0.0.1:$(cat "$run/proxy.port")"
topic=$(.venv/bin/python - "$endpoint" <<'PY'
import sys, boto3
ssm = boto3.client("ssm", endpoint_url=sys.argv[1], region_name="us-east-1")
ssm.put_parameter(Name="/pace/key", Value="one", Type="SecureString", Overwrite=True)
sns = boto3.client("sns", endpoint_url=sys.argv[1], region_name="us-east-1")
print(sns.create_topic(Name="ssm-changes")["TopicArn"])
PY
)
for i in $(seq 1 "$hosts"); do
    mkdir -p "$run/mnt$i"
    AWS_ENDPOINT_URL_SQS=$endpoint AWS_ENDPOINT_URL_SNS=$endpoint \
        ./target/release/ssmfs --foreground --endpoint-url "$proxy" --ttl 1h \
        --events-topic "$topic" --events-hosts "$hosts" --ssm-quota-tps "$tps" \
        /pace "$run/mnt$i" 2>"$run/ssmfs-$i.log" &
    pids+=($!)
    until mountpoint -q "$run/mnt$i"; do sleep 0.05; done
    sleep 0.3  # mount checks stay under the quota
done
for i in $(seq 1 "$hosts"); do [ "$(cat "$run/mnt$i/key")" = one ] || { echo "events_check: daemon $i read no value" >&2; exit 1; }; done
sleep 3  # every listener is polling
.venv/bin/python - "$endpoint" "$proxy" "$topic" "$run" "$hosts" "$tps" <<'PY'
import json, statistics, sys, time, urllib.request
from datetime import datetime, timezone
import boto3
endpoint, proxy, topic, run, hosts, tps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
counts = lambda: json.load(urllib.request.urlopen(proxy + "/counts"))
before = counts()
boto3.client("ssm", endpoint_url=endpoint, region_name="us-east-1").put_parameter(
    Name="/pace/key", Value="two", Type="SecureString", Overwrite=True)
event = {"version": "0", "id": "check-1", "detail-type": "Parameter Store Change", "source": "aws.ssm",
         "account": "123456789012", "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
         "region": "us-east-1", "resources": ["arn:aws:ssm:us-east-1:123456789012:parameter/pace/key"],
         "detail": {"name": "/pace/key", "type": "SecureString", "operation": "Update"}}
boto3.client("sns", endpoint_url=endpoint, region_name="us-east-1").publish(TopicArn=topic, Message=json.dumps(event))
start, seen = time.monotonic(), {}
while len(seen) < hosts and time.monotonic() - start < 60:
    for i in range(1, hosts + 1):
        if i not in seen and open(f"{run}/mnt{i}/key").read() == "two":
            seen[i] = time.monotonic() - start
    time.sleep(0.05)
after = counts()
window = hosts / (tps / 2)
lags = sorted(seen.values())
throttled = after["throttled"] - before["throttled"]
ok = len(seen) == hosts and throttled == 0 and lags[-1] <= window + 2
print("| daemons | quota (proxy) | predicted spread | saw the new value | lag p50 | lag max | SSM calls | throttled |")
print("|---|---|---|---|---|---|---|---|")
print(f"| {hosts} | {tps:g} TPS | {window:.1f} s | {len(seen)} | {statistics.median(lags):.1f} s | {lags[-1]:.1f} s | "
      f"{after['admitted'] - before['admitted']} | {throttled} |")
print("check met:", ok)
sys.exit(0 if ok else 1)
PY

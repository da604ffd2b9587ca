#!/usr/bin/env bash
# Demo: a local SSM server (moto) seeded with example Airflow variables and
# connections, mounted at ./mnt. Shows `ls -l` and a `cat`, then stays mounted
# until Ctrl-C, when it unmounts and stops the server. Run as root (FUSE).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "demo: $*" >&2; }
say "installing what the demo uses (fuse3, a venv with moto's SSM server), if missing"
scripts/setup.sh --demo
if [ ! -x target/release/ssmfs ] || [ -n "$(find src Cargo.toml Cargo.lock -newer target/release/ssmfs -print -quit)" ]; then
    say "building ssmfs (release; a few minutes the first time, seconds after)"
fi
cargo build --release --quiet --bin ssmfs
say "starting a local SSM server and seeding example Airflow secrets"
port=${SSMFS_DEMO_PORT:-5055}
endpoint=$(scripts/moto.sh start "$port")
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
mkdir -p mnt
pid=""
cleanup() {
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    mountpoint -q mnt 2>/dev/null && umount -l mnt || true
    scripts/moto.sh stop "$port"
}
trap cleanup EXIT
trap 'exit 0' INT TERM
.venv/bin/python - "$endpoint" <<'PY'
import sys, boto3
ssm = boto3.client("ssm", endpoint_url=sys.argv[1], region_name="us-east-1")
for name, value, kind in [
    ("/airflow/variables/my_secret", "correct-horse-battery-staple", "SecureString"),
    ("/airflow/variables/environment", "staging", "String"),
    ("/airflow/variables/allowed_hosts", "a.example.com,b.example.com", "StringList"),
    ("/airflow/connections/my_postgres", "postgresql://airflow:pa55@db.internal:5432/airflow", "SecureString"),
    ("/airflow/connections/aws_default", "aws://?region_name=us-east-1", "String"),
    ("/airflow/config/core.parallelism", "32", "String"),
]:
    ssm.put_parameter(Name=name, Value=value, Type=kind, Overwrite=True)
PY
./target/release/ssmfs --foreground --endpoint-url "$endpoint" /airflow ./mnt &
pid=$!
for _ in $(seq 1 100); do mountpoint -q mnt && break; sleep 0.1; done
mountpoint -q mnt || { echo "demo: ssmfs did not mount" >&2; exit 1; }
echo "\$ ls -l mnt/variables"; ls -l mnt/variables
echo "\$ cat mnt/variables/my_secret"; cat mnt/variables/my_secret; echo
echo "\$ find mnt -type f"; find mnt -type f
echo
echo "Mounted at ./mnt (SSM at $endpoint). Try: cat mnt/connections/my_postgres"
echo "Press Ctrl-C to unmount and stop."
wait "$pid"

#!/usr/bin/env bash
# Installs everything ssmfs's tests, demo and benchmark need on a fresh Debian
# machine: the FUSE 3 userspace tools (fuse3: mount.fuse3, fusermount3), curl,
# getfattr (attr), rsync, file, lsof and less (real clients the tests run),
# gcc, a project-local Python venv (.venv) with moto's server (SSM, SQS, SNS,
# EventBridge, Secrets Manager and CloudFormation, as the tests use them) and
# boto3, and two more (.venv-airflow: Airflow 3; .venv-airflow2: Airflow 2.10)
# with Apache Airflow, its Amazon provider and the project's Airflow backend
# (integrations/airflow). Idempotent: each venv is built once and rebuilt only
# when its pinned requirements change.
#   scripts/setup.sh          everything
#   scripts/setup.sh --demo   only what scripts/demo.sh uses: fuse3, curl, .venv
set -euo pipefail
cd "$(dirname "$0")/.."
demo=0; [ "${1:-}" = "--demo" ] && demo=1

need_apt=()
command -v mount.fuse3 >/dev/null 2>&1 || need_apt+=(fuse3)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ $demo = 0 ]; then
    command -v getfattr >/dev/null 2>&1 || need_apt+=(attr)  # getfattr: the tests read user.ssm.* with it
    # The programs people point at secret files, which the tests run on a mount.
    for tool in rsync file lsof less; do
        command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool")
    done
    command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)  # the benchmark's C reader loop
fi
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need Debian packages ${need_apt[*]}; run as root or install them first" >&2
        exit 1
    fi
    echo "setup: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/moto_server ]; then
    echo "setup: creating .venv with moto[server] and boto3" >&2
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check 'moto[server]>=5,<6' boto3
fi
if [ $demo = 1 ]; then
    [ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing: load the fuse module (modprobe fuse)" >&2; exit 1; }
    exit 0
fi
# Airflow pins its own dependency tree, so it lives apart from moto's venv: the
# newest Airflow 3 and the oldest supported Airflow 2, each with the project's
# backend installed editable.
airflow_venv() { # DIR REQUIREMENTS...
    local dir=$1; shift
    if [ "$(cat "$dir/.requirements" 2>/dev/null)" != "$*" ]; then
        echo "setup: creating $dir with $* (about a minute)" >&2
        rm -rf "$dir"
        python3 -m venv "$dir"
        "$dir/bin/pip" install -q --disable-pip-version-check "$@"
        echo "$*" > "$dir/.requirements"
    fi
    "$dir/bin/pip" install -q --disable-pip-version-check --no-deps -e integrations/airflow >/dev/null
}
airflow_venv .venv-airflow apache-airflow==3.3.2 apache-airflow-providers-amazon==9.39.0 pytest==9.2.0
airflow_venv .venv-airflow2 apache-airflow==2.10.5 apache-airflow-providers-amazon==9.17.0 pytest==9.2.0
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing: load the fuse module (modprobe fuse)" >&2; exit 1; }

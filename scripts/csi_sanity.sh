#!/usr/bin/env bash
# csi-sanity (kubernetes-csi/csi-test, the CSI conformance suite; installed
# by scripts/setup.sh into .tools/bin) against `ssmfs csi` in the one-host
# layout (the plugin starts its own serving side), as root, with moto as its
# AWS endpoint. Every Identity and Node test that applies to a node-only
# driver runs; the skip list below says why the others do not (and
# docs/KUBERNETES.md repeats it). Everything lives in a temp dir: the plugin's
# socket, --state-dir, --run-dir and --pods-dir, csi-sanity's mount and
# staging dirs. On exit, failed or not, the plugin and its serving side are
# stopped, anything mounted below the temp dir is unmounted, moto is stopped,
# and the logs of the run are left in .ssmfs-run/csi-sanity/.
#   scripts/csi_sanity.sh [--binary PATH]    default target/debug/ssmfs
# CSI_SANITY=PATH runs another csi-sanity build (another version) instead.
# About 5 s. A missing piece (root, /dev/fuse, csi-sanity, moto, the
# binary) skips with a message, or fails in one line under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
binary=target/debug/ssmfs
while [ $# -gt 0 ]; do
    case $1 in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --binary=*) binary=${1#--binary=}; shift ;;
    *) echo "usage: scripts/csi_sanity.sh [--binary PATH]" >&2; exit 2 ;;
    esac
done
sanity=${CSI_SANITY:-.tools/bin/csi-sanity}
missing() { # WHAT HOW
    if [ "${CI:-}" = true ]; then
        echo "csi_sanity.sh: FAILED: $1 is required under CI=true; $2" >&2
        exit 1
    fi
    echo "csi_sanity.sh: SKIPPED: $1 is not available; $2" >&2
    exit 0
}
[ "$(id -u)" -eq 0 ] || missing "root" "run it as root (it mounts FUSE)"
[ -e /dev/fuse ] || missing "/dev/fuse" "load the fuse module (modprobe fuse)"
[ -x "$sanity" ] || missing "$sanity" "run scripts/setup.sh (it builds csi-sanity with Go)"
[ -x .venv/bin/moto_server ] || missing "moto (.venv/bin/moto_server)" "run scripts/setup.sh"
[ -x "$binary" ] || missing "$binary" "build it (cargo build --bin ssmfs) or pass --binary"
binary=$(realpath "$binary")

# Tests this node-only driver does not take part in (ginkgo regexps, ORed):
skips=(
    # Controller service suites (controller, snapshots, expansion, modify,
    # volume health): the driver serves no Controller service and does not
    # advertise CONTROLLER_SERVICE, so each of their RPCs is Unimplemented.
    '\[Controller Server\]'
    # GroupController suites: not advertised, so they would skip themselves,
    # but their AfterEach then panics on the Resources their skipped
    # BeforeEach never made (csi-sanity's own nil dereference, reported as
    # "additional failures" under each skip); left out by name instead.
    '\[GroupController '
    # Node Service: makes its volume with CreateVolume (a controller RPC)
    # before publishing it, so it cannot run without a controller service.
    'should remove target path'
)
# The others that need what this driver does not offer skip themselves:
# NodeStage/NodeUnstage (no STAGE_UNSTAGE_VOLUME), NodeGetVolumeStats,
# NodeExpandVolume, NodeGetVolumeHealth, NodeGetStorageHealth and the
# single-node-multi-writer case (no such node capability), and Node "should
# work"/"should be idempotent" (no controller service to create a volume).

port=5080
logs=.ssmfs-run/csi-sanity
rm -rf "$logs"; mkdir -p "$logs"
# The serving side (uid 64721) walks down to its control socket in run/.
work=$(mktemp -d /tmp/ssmfs-csi-sanity.XXXXXX)
chmod 755 "$work"
plugin=
moto_started=0
under_work() { # true while anything is mounted below the temp dir
    awk -v root="$work/" 'index($2, root) == 1 { found = 1 } END { exit !found }' /proc/self/mounts
}
cleanup() {
    local status=$?
    # Once here, an interrupt must not cut the cleanup short.
    trap '' INT TERM
    trap - EXIT
    if [ -n "$plugin" ]; then
        kill -TERM "$plugin" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$plugin" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$plugin" 2>/dev/null || true
        wait "$plugin" 2>/dev/null || true
    fi
    # The serving side runs in a session of its own (it outlives a plugin
    # by design), with the mounts' holders under it; every process of this
    # run names the temp dir on its command line.
    local serve
    serve=$(cat "$work/state/serve.pid" 2>/dev/null || true)
    [ -n "$serve" ] && kill -KILL -- "-$serve" 2>/dev/null || true
    local pid
    for pid in $(grep -lF -- "$work/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
        [ "$pid" != $$ ] && kill -KILL "$pid" 2>/dev/null || true
    done
    sleep 0.2
    # Whatever is still mounted below the temp dir, the latest mount first
    # (a mount laid over another goes before it), a few rounds at most.
    local round m
    for round in 1 2 3; do
        under_work || break
        for m in $(awk -v root="$work/" 'index($2, root) == 1 { print $2 }' /proc/self/mounts | tac); do
            umount -l "$m" 2>/dev/null || true
        done
    done
    [ "$moto_started" = 1 ] && scripts/moto.sh stop $port
    cp "$work/plugin.log" "$logs/plugin.log" 2>/dev/null || true
    if under_work; then
        echo "csi_sanity.sh: something is still mounted below $work; it is left there" >&2
        status=1
    else
        rm -rf --one-file-system "$work"
    fi
    if [ "$status" -ne 0 ]; then
        echo "csi_sanity.sh: FAILED (exit $status); the plugin's log: $logs/plugin.log" >&2
        tail -n 30 "$logs/plugin.log" >&2 2>/dev/null || true
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

moto_started=1  # before it starts: an interrupt meanwhile must stop it too
endpoint=$(scripts/moto.sh start $port)
# A pod directory as kubelet makes one: csi-sanity creates its mount dir
# below it (and publishes at <mountdir>/target), inside --pods-dir.
volumes="$work/pods/csi-sanity-pod/volumes/kubernetes.io~csi"
mkdir -p "$volumes"
env AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_SESSION_TOKEN=testing \
    AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
    AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null \
    AWS_ENDPOINT_URL="$endpoint" SSMFS_LOG=debug \
    "$binary" csi --endpoint "unix://$work/csi.sock" --node-id csi-sanity-node \
    --state-dir "$work/state" --run-dir "$work/run" --pods-dir "$work/pods" \
    >/dev/null 2>"$work/plugin.log" &
plugin=$!
# Ready when the socket is there and the serving side has connected (Probe
# says ready from then on).
for _ in $(seq 1 200); do
    [ -S "$work/csi.sock" ] && grep -q "a serving side is connected" "$work/plugin.log" && break
    kill -0 "$plugin" 2>/dev/null || { echo "csi_sanity.sh: ssmfs csi exited at start" >&2; exit 1; }
    sleep 0.1
done
grep -q "a serving side is connected" "$work/plugin.log" \
    || { echo "csi_sanity.sh: ssmfs csi did not become ready in 20 s" >&2; exit 1; }

skip_args=()
for s in "${skips[@]}"; do skip_args+=(--ginkgo.skip="$s"); done
version=$(go version -m "$sanity" 2>/dev/null | awk '$1 == "mod" { print $3 }' || true)
[ -n "$version" ] || version=$(cat "$sanity.version" 2>/dev/null || echo "(version unknown)")
echo "csi_sanity.sh: csi-sanity $version against $binary" >&2
set +e
timeout --kill-after=10 150 "$sanity" \
    --csi.endpoint="unix://$work/csi.sock" \
    --csi.mountdir="$volumes/csi-sanity" \
    --csi.stagingdir="$work/staging" \
    "${skip_args[@]}" \
    --ginkgo.no-color --ginkgo.timeout=2m \
    --ginkgo.junit-report="$PWD/$logs/junit.xml" 2>&1 | tee "$logs/csi-sanity.log"
result=${PIPESTATUS[0]}
set -e
if [ "$result" -ne 0 ]; then
    echo "csi_sanity.sh: csi-sanity failed (exit $result); its output: $logs/csi-sanity.log" >&2
    exit "$result"
fi
# Nothing the suite published may stay mounted.
if under_work; then
    echo "csi_sanity.sh: csi-sanity passed but left mounts below $work" >&2
    exit 1
fi
echo "csi_sanity.sh: passed ($(grep -o '[0-9]* Passed | [0-9]* Failed | [0-9]* Pending | [0-9]* Skipped' "$logs/csi-sanity.log" | tail -1))" >&2

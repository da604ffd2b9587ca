#!/usr/bin/env bash
# How long a rotation takes to reach the program, on a real mount over moto.
#   scripts/rotation_bench.sh [--smoke] [--rotations N] [--ttl-rotations K] [--ttl D]
# For each rotation: PutParameter (boto3), then the time until
#   (a) the line `app/v VERSION` on the mount's @changes,
#   (b) the child of `ssmfs exec --on-change restart` running with the new value
#       (the child writes its start time and value),
#   (c) inotify's IN_MOVED_TO on the file `ssmfs render` rewrites.
# Two mounts: with events (--ttl 1h --events-queue, an SQS queue in moto fed by
# this script with the EventBridge-shaped message, as tests/events.rs does) and
# without (--ttl D, default 3s, TTL-paced). exec and render keep their default
# --debounce (500ms), which (b) and (c) include. Needs root and /dev/fuse.
# Default: 50 rotations with events, 10 without (each waits for a refresh);
# --smoke: 5 and 2. Uses target/release/ssmfs if built, else target/debug/ssmfs.
set -euo pipefail
cd "$(dirname "$0")/.."

rotations=50
ttl_rotations=10
ttl=3s
while [ $# -gt 0 ]; do
    case "$1" in
    --smoke) rotations=5; ttl_rotations=2 ;;
    --rotations) rotations=$2; shift ;;
    --ttl-rotations) ttl_rotations=$2; shift ;;
    --ttl) ttl=$2; shift ;;
    *) echo "usage: $0 [--smoke] [--rotations N] [--ttl-rotations K] [--ttl D]" >&2; exit 2 ;;
    esac
    shift
done

if [ -x target/release/ssmfs ]; then
    ssmfs=target/release/ssmfs
else
    ssmfs=target/debug/ssmfs
    echo "note: target/release/ssmfs is not built; measuring the debug build" >&2
fi
[ -x "$ssmfs" ] || { echo "build ssmfs first (cargo build)" >&2; exit 1; }
[ -x .venv/bin/python ] || scripts/setup.sh

port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
endpoint=$(scripts/moto.sh start "$port")
trap 'scripts/moto.sh stop "$port"' EXIT

export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_SESSION_TOKEN=testing \
    AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
    AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null

echo "ssmfs: $ssmfs; moto: $endpoint; rotations: $rotations with events, $ttl_rotations at --ttl $ttl" >&2
.venv/bin/python - "$endpoint" "$PWD/$ssmfs" "$rotations" "$ttl_rotations" "$ttl" <<'PY'
import ctypes, json, math, os, random, signal, struct, subprocess, sys, tempfile, threading, time
import boto3

endpoint, ssmfs, rotations, ttl_rotations, ttl = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
ssm, sqs = boto3.client("ssm", **kw), boto3.client("sqs", **kw)
queue_url = sqs.create_queue(QueueName="rotation-bench")["QueueUrl"]
LIMIT = 90.0  # a rotation not seen in this long counts as missed

CHILD = 'import os, sys, time\nwith open(sys.argv[1], "a") as f: f.write("%.6f %s\\n" % (time.time(), os.environ["V"]))\ntime.sleep(3600)\n'

def event(name):
    return json.dumps({
        "version": "0", "id": "%016x" % random.getrandbits(64),
        "detail-type": "Parameter Store Change", "source": "aws.ssm",
        "account": "123456789012", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": "us-east-1", "resources": ["arn:aws:ssm:us-east-1:123456789012:parameter" + name],
        "detail": {"name": name, "type": "String", "operation": "Update"},
    })

def follow_stream(path, seen):
    with open(path) as stream:
        for line in stream:
            seen.append((time.time(), line.strip()))

def watch_renames(directory, seen):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    if fd < 0 or libc.inotify_add_watch(fd, directory.encode(), 0x80) < 0:  # IN_MOVED_TO
        raise SystemExit("inotify failed")
    while True:
        buf = os.read(fd, 65536)
        at, i = time.time(), 0
        while i < len(buf):
            _, mask, _, length = struct.unpack_from("iIII", buf, i)
            seen.append((at, buf[i + 16:i + 16 + length].rstrip(b"\0").decode()))
            i += 16 + length

def child_starts(path):
    try:
        with open(path) as f:
            return [(float(t), v) for t, v in (line.rstrip("\n").split(" ", 1) for line in f)]
    except FileNotFoundError:
        return []

def wait_mounted(mnt, want):
    for _ in range(400):
        if os.path.ismount(mnt) == want:
            return
        time.sleep(0.05)
    raise SystemExit("mount state of %s never became %s" % (mnt, want))

def run(mode, count):
    prefix = "/rbench/" + mode
    name = prefix + "/app/v"
    ssm.put_parameter(Name=name, Value=mode + "-0", Type="SecureString", Overwrite=True)
    work = tempfile.mkdtemp(prefix="rotation-bench-")
    mnt, out = work + "/mnt", work + "/out"
    os.mkdir(mnt); os.mkdir(out)
    args = [ssmfs, "--foreground", "--endpoint-url", endpoint]
    args += ["--ttl", "1h", "--events-queue", queue_url] if mode == "events" else ["--ttl", ttl]
    daemon = subprocess.Popen(args + [prefix, mnt], env=dict(os.environ, AWS_ENDPOINT_URL_SQS=endpoint),
                              stdout=subprocess.DEVNULL, stderr=open(work + "/ssmfs.log", "w"))
    procs = []
    try:
        wait_mounted(mnt, True)
        value = mnt + "/app/v"
        stream_seen, renames = [], []
        threading.Thread(target=follow_stream, args=(mnt + "/@changes", stream_seen), daemon=True).start()
        threading.Thread(target=watch_renames, args=(out, renames), daemon=True).start()
        starts = work + "/starts"
        procs.append(subprocess.Popen([ssmfs, "exec", "--env", "V=" + value, "--on-change", "restart", "--",
                                       sys.executable, "-c", CHILD, starts],
                                      stderr=open(work + "/exec.log", "w")))
        with open(work + "/t.j2", "w") as t:
            t.write('{{ file("%s") }}' % value)
        dest = out + "/rendered.txt"
        procs.append(subprocess.Popen([ssmfs, "render", "--template", "%s/t.j2:%s" % (work, dest)],
                                      stderr=open(work + "/render.log", "w")))
        deadline = time.time() + 30
        while not (child_starts(starts) and os.path.exists(dest)):
            if time.time() > deadline:
                raise SystemExit("exec or render did not start; see " + work)
            time.sleep(0.05)
        time.sleep(1)
        results = []
        for i in range(1, count + 1):
            new = "%s-%d" % (mode, i)
            t0 = time.time()
            version = ssm.put_parameter(Name=name, Value=new, Type="SecureString", Overwrite=True)["Version"]
            if mode == "events":
                sqs.send_message(QueueUrl=queue_url, MessageBody=event(name))
            got = {}
            while len(got) < 3 and time.time() < t0 + LIMIT:
                if "stream" not in got:
                    hit = [t for t, line in list(stream_seen) if line == "app/v %d" % version]
                    if hit: got["stream"] = hit[0] - t0
                if "exec" not in got:
                    hit = [t for t, v in child_starts(starts) if v == new]
                    if hit: got["exec"] = hit[0] - t0
                if "render" not in got:
                    hit = [t for t, n in list(renames) if n == "rendered.txt" and t >= t0]
                    if hit and open(dest).read() == new: got["render"] = hit[0] - t0
                time.sleep(0.005)
            results.append(got)
            print("%-6s %3d/%d %s" % (mode, i, count, " ".join("%s=%.0fms" % (k, v * 1000) for k, v in sorted(got.items()))),
                  file=sys.stderr, flush=True)
            time.sleep(0.6)  # past the debounce, so rotations stay apart
        return results
    finally:
        for p in procs + [daemon]:
            p.send_signal(signal.SIGTERM)
            try: p.wait(10)
            except subprocess.TimeoutExpired: p.kill()
        if os.path.ismount(mnt):
            subprocess.call(["umount", "-l", mnt])

def pct(xs, q):
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]  # nearest rank

table = []
for mode, count, label in [("events", rotations, "with events (--ttl 1h --events-queue)"),
                           ("ttl", ttl_rotations, "without events (--ttl %s)" % ttl)]:
    if count <= 0:
        continue
    results = run(mode, count)
    for key, what in [("stream", "(a) line on @changes"), ("exec", "(b) exec'd child running with the new value"),
                      ("render", "(c) IN_MOVED_TO of the rendered file")]:
        xs = [r[key] * 1000 for r in results if key in r]
        missed = count - len(xs)
        cell = ("%.0f | %.0f" % (pct(xs, 50), pct(xs, 99))) if xs else "- | -"
        table.append("| %s | %s | %d | %s | %s |" % (label, what, count, cell, missed))
print("| mount | from PutParameter to | rotations | p50 ms | p99 ms | missed (>%ds) |" % LIMIT)
print("| --- | --- | ---: | ---: | ---: | ---: |")
print("\n".join(table))
PY

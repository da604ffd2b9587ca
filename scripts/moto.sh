#!/usr/bin/env bash
# Starts or stops a local SSM API (moto's server) on 127.0.0.1.
#   scripts/moto.sh start [PORT]   -> prints the endpoint URL once it answers
#   scripts/moto.sh stop  [PORT]
# Dummy credentials only; nothing here can reach real AWS.
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:?usage: moto.sh start|stop [PORT]}
port=${2:-5055}
run=.ssmfs-run
mkdir -p "$run"
pidfile="$run/moto-$port.pid"
case "$action" in
start)
    [ -x .venv/bin/moto_server ] || scripts/setup.sh
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null \
        && curl -sf -o /dev/null "http://127.0.0.1:$port/moto-api/"; then
        echo "http://127.0.0.1:$port"; exit 0
    fi
    nohup .venv/bin/moto_server -H 127.0.0.1 -p "$port" >"$run/moto-$port.log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 100); do
        if curl -sf -o /dev/null "http://127.0.0.1:$port/moto-api/"; then
            echo "http://127.0.0.1:$port"; exit 0
        fi
        sleep 0.1
    done
    echo "moto: server did not start on port $port; see $run/moto-$port.log" >&2
    exit 1
    ;;
stop)
    if [ -f "$pidfile" ]; then
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    fi
    ;;
*) echo "usage: moto.sh start|stop [PORT]" >&2; exit 2 ;;
esac

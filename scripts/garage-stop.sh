#!/usr/bin/env bash
# Stops the Garage instance started by scripts/garage-start.sh (same KVF_GARAGE_DIR) and, with
# --purge, removes its data.
set -euo pipefail
DIR=${KVF_GARAGE_DIR:-/tmp/kvf-garage}
if [ -f "$DIR/pid" ]; then
    PID=$(cat "$DIR/pid")
    if kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID"
        for _ in $(seq 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PID" 2>/dev/null || true
    fi
    rm -f "$DIR/pid"
fi
[ "${1:-}" = "--purge" ] && rm -rf "$DIR"
exit 0

# tests/llama/lib.sh: helpers shared by tests/llama/run.sh and tests/llama/bench-ttft.sh
# (sourced; expects ROOT, KVF, ENGINE and GGUF set). Creates $TMP and removes it, and kills
# every process it started, on exit.

step() { echo "== [${SECONDS}s] $*"; }
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

TMP="$(mktemp -d /tmp/kvf-llama-test.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

# engine ARGS...: runs kvf-llama on the model; stdout to the caller, stderr to $TMP/engine.err.
engine() { "$ENGINE" --model "$GGUF" "$@" 2>"$TMP/engine.err"; }
field() { sed -n "s/^$1=//p"; }
free_port() { python3 -c "import socket,sys;s=socket.socket(socket.AF_INET,getattr(socket,sys.argv[1]));s.bind(('127.0.0.1',0));print(s.getsockname()[1])" "$1"; }
first_n() { awk -v n="$2" '{for (i = 1; i <= NF && i <= n; i++) printf "%s ", $i} END {print ""}' "$1"; }

# start_stack NAME BITS CHUNK [MAX_RATE]: a store and a daemon on loopback in $TMP/NAME
# (sets STORE_PID, STORE_PORT, METRICS_PORT, DAEMON_PID, SOCK).
start_stack() {
    local d="$TMP/$1" sport mport
    mkdir -p "$d"
    sport="$(free_port SOCK_DGRAM)"
    mport="$(free_port SOCK_STREAM)"
    [[ -d "$TMP/certs" ]] || "$KVF" store --dev-cert "$TMP/certs" >/dev/null
    "$KVF" store --listen "127.0.0.1:$sport" --data-dir "$d/data" --cert-dir "$TMP/certs" \
        --insecure-open-writes ${4:+--max-rate "$4"} >"$d/store.log" 2>&1 &
    STORE_PID=$!
    STORE_PORT="$sport"
    METRICS_PORT="$mport"
    PIDS+=("$STORE_PID")
    cat >"$d/kvf.toml" <<EOF
socket = "$d/kvf.sock"
socket_mode = "0600"
metrics_addr = "127.0.0.1:$mport"

[[stores]]
addr = "127.0.0.1:$sport"
tls = "$TMP/certs"

[save]
variant = "${SAVE_VARIANT:-zstd}"
target_kl = ${SAVE_TARGET_KL:-0.005}
bits = $2
chunk_tokens = $3
layers_per_group = 1
workers = 1
EOF
    # SAVE_VARIANT=rans needs the model's codec profile: PROFILE_DIR holds it.
    if [[ -n "${PROFILE_DIR:-}" ]]; then
        printf '\n[codec]\nprofile_dir = "%s"\n' "$PROFILE_DIR" >>"$d/kvf.toml"
    fi
    RUST_LOG=warn "$KVF" daemon --config "$d/kvf.toml" >"$d/daemon.log" 2>&1 &
    DAEMON_PID=$!
    PIDS+=("$DAEMON_PID")
    SOCK="$d/kvf.sock"
    for _ in $(seq 1 300); do
        [[ -S "$SOCK" ]] && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$d/daemon.log"; fail "daemon exited"; }
        sleep 0.1
    done
    fail "daemon socket $SOCK did not appear"
}


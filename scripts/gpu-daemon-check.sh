#!/usr/bin/env bash
# The daemon's GPU path end to end, on a GPU host: a store and the daemon on loopback, real KV
# chunk objects (every variant, prepared by scripts/gpu-prep.sh) fetched into gpu:N by the C
# example in another process (CUDA IPC handle + per-layer stream waits) and compared byte for
# byte with a host fetch of the same prefix; a client killed mid-fetch must leave no GPU buffer
# behind; with two or more GPUs, fetches to gpu:0 and gpu:1 run at the same time and both verify.
# Prints one "| check | result |" row per check; exit status 0 when all pass.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
carry="${CARRY:-$root/.carry}"
out="${OUT:-/tmp/gpu-check}"
bin="$carry/kvfetcher"
w="$(mktemp -d)"
mkdir -p "$out"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64:$carry/lib"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$w"; }
trap cleanup EXIT
status=0
row() { printf '| %s | %s |\n' "$1" "$2" | tee -a "$out/daemon-gpu.txt"; }
pass() { row "$1" "pass${2:+ ($2)}"; }
failed() { row "$1" "FAIL: $2"; status=1; }

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
: > "$out/daemon-gpu.txt"
cc=${CC:-gcc}
if ! $cc -std=c11 -O2 -Wall -I"$root/include" "$root/examples/c/fetch.c" -L"$carry/lib" -lkvfetcher -ldl -o "$w/fetch" 2>"$w/cc.log"; then
  failed "build examples/c/fetch.c" "$(head -3 "$w/cc.log")"; exit 1
fi

# Store (dev certificates) and daemon; a second, slow store+daemon pair for the kill test.
"$bin" store --dev-cert "$w/certs" >/dev/null
start_pair() { # name port max_rate(bytes/s, 0 = none) metrics_port
  local name=$1 port=$2 rate=$3 mport=$4 extra=()
  [ "$rate" != 0 ] && extra=(--max-rate "$rate")
  "$bin" store --listen "127.0.0.1:$port" --data-dir "$w/data" --cert-dir "$w/certs" --insecure-open-writes \
    "${extra[@]}" >"$w/store-$name.log" 2>&1 &
  pids+=($!)
  cat >"$w/$name.toml" <<TOML
socket = "$w/$name.sock"
metrics_addr = "127.0.0.1:$mport"
[[stores]]
addr = "127.0.0.1:$port"
server_name = "localhost"
tls = "$w/certs"
TOML
  "$bin" daemon --config "$w/$name.toml" >"$w/daemon-$name.log" 2>&1 &
  pids+=($!)
}
start_pair fast 47443 0 19464
start_pair slow 47444 500000 19465
for _ in $(seq 100); do [ -S "$w/fast.sock" ] && [ -S "$w/slow.sock" ] && break; sleep 0.1; done
ids=$(seq 0 1023 | tr '\n' ' ')
for d in "$carry"/chunks/*/; do
  "$bin" put --store 127.0.0.1:47443 --ca "$w/certs" --server-name localhost "$d"* >/dev/null 2>>"$w/put.log" \
    || failed "put $(basename "$d")" "$(tail -1 "$w/put.log")"
done
metric() { # port name -> value (0 when absent)
  python3 - "$1" "$2" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
vals = [l.split()[-1] for l in body.splitlines() if l.startswith(sys.argv[2] + " ") or l.startswith(sys.argv[2] + "{")]
print(int(float(vals[0])) if vals else 0)
PY
}

# 1. Every variant and layout, gpu:0 vs host, in a separate process.
for d in "$carry"/chunks/*/; do
  v=$(basename "$d")
  for layout in "--order nhd --block-tokens 0 --dtype bf16" "--order hnd --block-tokens 16" "--order nhd --dtype f32"; do
    label="gpu:0 $v $layout"
    if "$w/fetch" --gpu 0 $layout "$w/fast.sock" "gpucheck-$v" $ids >"$w/f.log" 2>&1; then
      pass "$label" "$(grep -o 'gpu verified.*' "$w/f.log")"
    else
      failed "$label" "$(tail -2 "$w/f.log" | tr '\n' ' ')"
    fi
  done
done

# 2. A client killed mid-fetch (slow store: 0.5 MB/s) leaves no GPU buffer in the daemon.
"$w/fetch" --gpu 0 --hold-ms 10000 "$w/slow.sock" gpucheck-zstd8 $ids >"$w/kill.log" 2>&1 &
victim=$!
# Kill as soon as the daemon holds the GPU buffer (the slow store keeps the fetch running).
during=0
for _ in $(seq 200); do during=$(metric 19465 kvfetcher_gpu_buffer_bytes); [ "$during" -gt 0 ] && break; sleep 0.05; done
kill -9 "$victim" 2>/dev/null; wait "$victim" 2>/dev/null
after=-1
for _ in $(seq 50); do after=$(metric 19465 kvfetcher_gpu_buffer_bytes); [ "$after" = 0 ] && break; sleep 0.2; done
if [ "$during" -gt 0 ] && [ "$after" = 0 ]; then
  pass "kill -9 mid-fetch" "GPU buffer bytes ${during} -> 0"
else
  failed "kill -9 mid-fetch" "GPU buffer bytes during ${during}, after ${after}"
fi
# The daemon still serves after the kill.
if "$w/fetch" --gpu 0 "$w/fast.sock" gpucheck-packed8 $ids >"$w/f.log" 2>&1; then
  pass "fetch after kill"
else
  failed "fetch after kill" "$(tail -1 "$w/f.log")"
fi

# 3. Two GPUs at once.
if [ "$gpus" -ge 2 ]; then
  "$w/fetch" --gpu 0 "$w/fast.sock" gpucheck-zstd8 $ids >"$w/g0.log" 2>&1 & a=$!
  "$w/fetch" --gpu 1 "$w/fast.sock" gpucheck-hevc8 $ids >"$w/g1.log" 2>&1 & b=$!
  wait $a; ra=$?; wait $b; rb=$?
  if [ $ra = 0 ] && [ $rb = 0 ]; then
    pass "gpu:0 + gpu:1 at once" "$(grep -ho 'gpu verified.*' "$w/g0.log" "$w/g1.log" | tr '\n' ' ')"
  else
    failed "gpu:0 + gpu:1 at once" "$(tail -2 "$w/g0.log" | tr '\n' ' ') / $(tail -2 "$w/g1.log" | tr '\n' ' ')"
  fi
else
  row "gpu:0 + gpu:1 at once" "skipped: $gpus GPU(s) on this host"
fi
grep -hiE "warn|error|nvdec" "$w"/daemon-*.log | head -20 > "$out/daemon-gpu-log.txt"
cp "$w"/daemon-fast.log "$out/daemon-fast.log" 2>/dev/null
exit $status

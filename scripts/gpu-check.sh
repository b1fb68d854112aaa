#!/usr/bin/env bash
# One command on a GPU host: regenerates the restore PTX, runs every GPU check and benchmark, and
# prints a short table last. Expects the release binary and the fixtures prepared on a build host:
#   .carry/kvfetcher                 cargo build --release -p kvfetcher
#   .carry/fixtures/*.hevc           kvfetcher gpu fixtures --kv shared/data/codelm-kv-a.safetensors --out .carry/fixtures
#   .carry/fixtures/sections/       kvfetcher gpu section-fixtures --kv .carry/codelm-kv-a-4l.safetensors --out .carry/fixtures/sections
#   .carry/codelm-kv-a-4l.safetensors  the real KV the fixtures came from (first 4 layers of
#                                    shared/data/codelm-kv-a.safetensors; override with KV=)
# Writes logs and the fresh PTX to ${OUT:-/tmp/gpu-check}. SKIP_BENCH=1 skips the benchmarks.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
carry="${CARRY:-$root/.carry}"
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
bin="$carry/kvfetcher"
kv="${KV:-$carry/codelm-kv-a-4l.safetensors}"
fx="$carry/fixtures"
export PATH="$PATH:/usr/local/cuda/bin"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64:$carry/lib"
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/smi.txt"
if "$root/scripts/gen-ptx.sh" --out "$out/restore.ptx"; then
  export KVFETCHER_RESTORE_PTX="$out/restore.ptx"
  if diff -q "$out/restore.ptx" "$root/daemon/kernels/restore.ptx" >/dev/null; then
    echo "committed restore.ptx: up to date"
  else
    echo "committed restore.ptx: DIFFERS (copy $out/restore.ptx into daemon/kernels/)"
  fi
else
  echo "gen-ptx failed: using the committed PTX"; status=1
fi
"$bin" gpu info 2>&1 | tee "$out/info.txt" || status=1
"$bin" gpu check --kv "$kv" --fixtures "$fx" > "$out/check.txt" 2>&1 || status=1
"$bin" gpu ipc-check --kv "$kv" > "$out/ipc.txt" 2>&1 || status=1
if [ -z "${SKIP_BENCH:-}" ]; then
  "$bin" gpu bench --kv "$kv" --fixtures "$fx" ${BENCH_ARGS:-} > "$out/bench.txt" 2>&1 || status=1
else
  : > "$out/bench.txt"
fi
echo
echo "== summary =="
cat "$out/smi.txt"
grep -E "^nvdec hevc" "$out/info.txt"
grep -E "^\| nvdec|checks, " "$out/check.txt"
grep -E "^\| (nvdec|restore (codes|surfaces)) section" "$out/check.txt" | grep -c "| yes |" | sed 's/^/codec-section rows exact: /'
grep -E "NO:|Error|error" "$out/check.txt" | head -8
grep -E "^\| ipc|checks, |rror" "$out/ipc.txt"
grep -E "^\| (restore|codes|packed|frames|---)" "$out/bench.txt" | head -12
grep -E "^\| (nvdec|4[24][04] )" "$out/bench.txt"
tail -3 "$out/bench.txt" | grep -i error
exit $status

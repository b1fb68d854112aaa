#!/usr/bin/env bash
# One command on a GPU host: regenerates the restore PTX, runs every GPU check and benchmark, and
# prints a short table last. Prepare on the build host with scripts/gpu-prep.sh [--tests] (binary,
# C library, chunk objects of every variant, Rust GPU test binaries) and
# scripts/llama-gpu-prep.sh (llama.cpp sources + GGUF, for the CUDA llama.cpp check).
# The device's carry limit (64 MiB) may need the run split in two calls (docs/GPU.md).
# Expects the release binary and the fixtures prepared on a build host:
#   .carry/kvfetcher                 cargo build --release -p kvfetcher
#   .carry/kvfetcher-bench           cargo build --release -p kvfetcher-tools
#   .carry/fixtures/*.hevc           kvfetcher-bench gpu fixtures --kv data/codelm-kv-a.safetensors --out .carry/fixtures
#   .carry/fixtures/sections/       kvfetcher-bench gpu section-fixtures --kv .carry/codelm-kv-a-4l.safetensors --out .carry/fixtures/sections
#   .carry/codelm-kv-a-4l.safetensors  the real KV the fixtures came from (first 4 layers of
#                                    data/codelm-kv-a.safetensors; override with KV=)
#   .carry/kvfull/codelm-kv-a.safetensors  the whole KV, for the end-to-end fetch rows
#                                    (override with FULL_KV=; else the 4-layer KV)
# Writes logs and the fresh PTX to ${OUT:-/tmp/gpu-check}. SKIP_BENCH=1 skips the benchmarks;
# SKIP_INTERFERENCE=1 skips only scripts/gpu-interference.py (GEMM next to NVDEC, nvCOMP and the
# rans kernels; needs torch; nvCOMP from .whl/*.whl when present, INTERFERENCE_SECONDS per
# setting, default 10).
# SKIP_CHECKS=1 skips the checks (gpu check, IPC, daemon, Rust GPU tests, llama.cpp): the
# benchmarks alone, for a second call when one call cannot hold both.
set -uo pipefail
# On the GPU host a test that skips for want of a GPU fails (kvfetcher-testkit).
export KVF_REQUIRE_GPU=1
root="$(cd "$(dirname "$0")/.." && pwd)"
carry="${CARRY:-$root/.carry}"
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
bin="$carry/kvfetcher"
bench_bin="$carry/kvfetcher-bench"
kv="${KV:-$carry/codelm-kv-a-4l.safetensors}"
fx="$carry/fixtures"
export PATH="$PATH:/usr/local/cuda/bin:$carry/x265"
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64:$carry/lib:$carry/x265"
status=0
# A bundle from scripts/gpu-prep.sh --bundle: unpack it, and make the fixtures here.
if [ ! -x "$bin" ] && [ -f "$carry/xz/kvfetcher.xz" ]; then
  xz -dc "$carry/xz/kvfetcher.xz" > "$bin" && chmod +x "$bin"
  xz -dc "$carry/xz/kvfetcher-bench.xz" > "$bench_bin" && chmod +x "$bench_bin"
  for t in tests x265; do
    [ -f "$carry/xz/$t.tar.xz" ] && tar -C "$carry" -xJf "$carry/xz/$t.tar.xz"
  done
fi
if [ ! -f "$fx/kv-444-8.hevc" ] && command -v x265 >/dev/null; then
  # From the same KV as the checks below (they compare against its codes).
  echo "making NVDEC fixtures from $kv (x265)"
  "$bench_bin" gpu fixtures --kv "$kv" --out "$fx" > "$out/fixtures.txt" 2>&1 || status=1
fi
if [ ! -d "$fx/sections" ] && command -v x265 >/dev/null; then
  "$bench_bin" gpu section-fixtures --kv "$kv" --out "$fx/sections" >> "$out/fixtures.txt" 2>&1 || status=1
fi
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
if [ -z "${SKIP_CHECKS:-}" ]; then
  "$bench_bin" gpu check --kv "$kv" --fixtures "$fx" > "$out/check.txt" 2>&1 || status=1
  "$bench_bin" gpu ipc-check --kv "$kv" > "$out/ipc.txt" 2>&1 || status=1
  # The daemon's GPU path end to end (C example in another process, kill test, two GPUs).
  "$root/scripts/gpu-daemon-check.sh" > "$out/daemon-check.log" 2>&1 || status=1
  # Rust GPU tests, when their binaries were carried (scripts/gpu-prep.sh --tests): they
  # skip without a driver elsewhere; here KVF_REQUIRE_GPU=1 makes such a skip a failure.
  : > "$out/rust-tests.txt"
  for t in "$carry"/tests/*; do
    [ -x "$t" ] || continue
    # HEVC chunks for the tests: encoded by the test itself where libx265 loads, else these.
    hevc_dir=()
    [ -d "$carry/h2/hevc" ] && hevc_dir=(env KVF_GPU_TEST_HEVC_DIR="$carry/h2/hevc")
    # The daemon's own unit tests: only its GPU modules (the rest run in CI).
    filter=()
    case "$(basename "$t")" in kvfetcher-*) filter=(gpu::) ;; esac
    if (cd "$root/daemon" && "${hevc_dir[@]}" "$t" "${filter[@]}" --test-threads 1) > "$out/rust-$(basename "$t").log" 2>&1; then
      echo "| rust $(basename "$t") | $(grep -E '^test result' "$out/rust-$(basename "$t").log" | tail -1) |" >> "$out/rust-tests.txt"
    else
      echo "| rust $(basename "$t") | FAIL: $(grep -E 'panicked|FAILED|failed' "$out/rust-$(basename "$t").log" | head -2 | tr '\n' ' ') |" >> "$out/rust-tests.txt"
      status=1
    fi
  done
  # llama.cpp with its CUDA backend restoring through the daemon (issue 6's GPU half).
  if [ -z "${SKIP_LLAMA:-}" ] && [ -d "$carry/llama" ]; then
    OUT="$out" bash "$root/scripts/llama-gpu-check.sh" > "$out/llama-gpu.log" 2>&1 || status=1
  fi
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  # End to end on the whole 8-layer KV (1024 tokens, and x4 tokens) when carried: the issue's
  # rows, each against the link's transfer time and the decode stage.
  full="${FULL_KV:-$carry/kvfull/codelm-kv-a.safetensors}"
  [ -f "$full" ] || full="$kv"
  # Each variant with every restore route it has, forced and chosen by `auto` (issue 16 item 7).
  for v in packed hevc rans; do
    # rans adds a 50 Mbit/s link: slow enough for one CPU core to keep up with its ratio.
    rates=0,0.25,1,4,10,25
    case $v in
      hevc) routes=auto,nvdec,cpu ;;
      rans) routes=auto,gpu,cpu rates=0,0.05,0.25,1,4,10,25 ;;
      *) routes=auto ;;
    esac
    for tile in 1 4; do
      "$bench_bin" fetch --kv "$full" --memory gpu:0 --variant $v --tile $tile --rates $rates \
        --route $routes --repeat 5 > "$out/fetch-gpu-$v-x$tile.txt" 2>&1 || status=1
    done
  done
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  "$bench_bin" gpu bench --kv "$kv" --fixtures "$fx" ${BENCH_ARGS:-} > "$out/bench.txt" 2>&1 || status=1
else
  : > "$out/bench.txt"
fi
if [ -z "${SKIP_BENCH:-}" ] && [ -z "${SKIP_INTERFERENCE:-}" ]; then
  site=/tmp/site
  if ! PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python3 -c "from nvidia import nvcomp" 2>/dev/null \
    && ls "$root"/.whl/*nvcomp*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$root"/.whl/*.whl \
      || echo "nvcomp wheels did not install: nvCOMP rows will be skipped"
  fi
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 python3 "$root/scripts/gpu-interference.py" \
    --bin "$bench_bin" --kv "$kv" --fixtures "$fx" --seconds "${INTERFERENCE_SECONDS:-10}" \
    --nvdec-frames copy,map,none \
    > "$out/interference.txt" 2>&1 || status=1
else
  : > "$out/interference.txt"
fi
echo
echo "== summary =="
cat "$out/smi.txt"
if [ -z "${SKIP_CHECKS:-}" ]; then
  cat "$out/daemon-gpu.txt" 2>/dev/null || tail -5 "$out/daemon-check.log"
  cat "$out/rust-tests.txt"
  sed -n '/^| check | result/,$p' "$out/llama-gpu.txt" 2>/dev/null | head -40
fi
for f in "$out"/fetch-gpu-*.txt; do
  [ -f "$f" ] && head -1 "$f" | cut -c1-110 && grep -E "^(link|loopback|[0-9.]+ Gbit)|router measured" "$f" | grep -v "whole objects"
done
grep -E "^nvdec hevc" "$out/info.txt"
if [ -z "${SKIP_CHECKS:-}" ]; then
  grep -E "^\| nvdec|checks, " "$out/check.txt"
  grep -E "^\| (nvdec|restore (codes|surfaces)) section" "$out/check.txt" | grep -c "| yes |" | sed 's/^/codec-section rows exact: /'
  grep -E "^\| transform " "$out/check.txt" | grep -c "| yes |" | sed 's/^/transform (rANS) rows exact: /'
  grep -E "^\| transform " "$out/check.txt" | grep -v "| yes |" | head -8
  grep -E "NO:|Error|error" "$out/check.txt" | head -8
  grep -E "^\| ipc|checks, |rror" "$out/ipc.txt"
fi
grep -E "^\| (restore|codes|packed|frames|---)" "$out/bench.txt" | head -14
grep -E "^\| (nvdec|4[24][04] )" "$out/bench.txt"
grep -E "^\| (transform restore|rans )|^transform restore benchmark failed" "$out/bench.txt"
tail -3 "$out/bench.txt" | grep -i error
grep -E "^\| (algorithm|ANS|Bitcomp|Zstd|GDeflate) " "$out/interference.txt"
sed -n '/^interference table/,$p' "$out/interference.txt"
grep -E "^gpu-interference:|^  failed|Traceback" "$out/interference.txt" | head -4
exit $status

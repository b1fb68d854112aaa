#!/usr/bin/env bash
# Prepares, on the build host, what scripts/gpu-check.sh needs on a GPU host (which has no Rust
# toolchain, no x265 and no network) under .carry/ (ignored by git, named in the device's carry):
#   .carry/kvfetcher                    release binary (stripped)
#   .carry/kvfetcher-bench              the tools' binary: GPU checks, benchmarks, fixtures
#   .carry/lib/libkvfetcher.so          the C client library
#   .carry/codelm-kv-a-4l.safetensors   first 4 layers of the real codelm KV
#   .carry/kvfull/codelm-kv-a.safetensors  the whole real KV (8 layers), for the end-to-end rows
#   .carry/chunks/<variant>/*.kvc       that KV encoded as chunk objects, one model id per variant
#   .carry/fixtures/                    NVDEC fixtures (kvfetcher-bench gpu fixtures / section-fixtures)
#   .carry/tests/*                      with --tests: the Rust GPU test binaries (release, stripped),
#                                       run by gpu-check.sh (they self-skip without a driver)
#   .carry/xz/                          with --bundle: the binary, the test binaries and x265 (CLI
#                                       and libraries, for fixtures and HEVC encoding on the GPU
#                                       host) compressed, so the carry fits the device's 64 MiB;
#                                       gpu-check.sh unpacks it and makes the fixtures there.
#                                       Carry then: .carry/xz .carry/lib .carry/chunks
#                                       .carry/codelm-kv-a-4l.safetensors .carry/kvfull
#                                       (not the rest of .carry)
# Usage: scripts/gpu-prep.sh [--no-build] [--tests] [--bundle]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
carry="$root/.carry"
mkdir -p "$carry/lib"
build=1 tests=0 bundle=0
for a in "$@"; do
  case "$a" in
    --no-build) build=0 ;;
    --tests) tests=1 ;;
    --bundle) bundle=1 ;;
    *) echo "usage: $0 [--no-build] [--tests] [--bundle]" >&2; exit 2 ;;
  esac
done
if [ $build = 1 ]; then
  cargo build --release -p kvfetcher -p kvfetcher-tools -p kvfetcher-c
fi
if [ $tests = 1 ]; then
  rm -rf "$carry/tests" && mkdir -p "$carry/tests"
  # Only the test harnesses (profile.test), not the binaries cargo builds for them.
  test_exes() {
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["profile"]["test"] and m.get("executable"):
        print(m["executable"])'
  }
  for args in "-p kvfetcher --test gpu_fetch" "-p kvfetcher --lib" "-p kvfetcher-client --lib" \
    "-p kvfetcher-cuda-sys --lib"; do
    # shellcheck disable=SC2086
    cargo test --release $args --no-run --message-format=json 2>/dev/null | test_exes |
      while read -r t; do install -m 755 -s "$t" "$carry/tests/"; done
  done
fi
install -m 755 -s target/release/kvfetcher "$carry/kvfetcher"
install -m 755 -s target/release/kvfetcher-bench "$carry/kvfetcher-bench"
install -m 755 -s target/release/libkvfetcher.so "$carry/lib/libkvfetcher.so"
mkdir -p "$carry/kvfull"
install -m 644 "$root/data/codelm-kv-a.safetensors" "$carry/kvfull/codelm-kv-a.safetensors"
kv="$carry/codelm-kv-a-4l.safetensors"
if [ ! -f "$kv" ]; then
  python3 - "$root/data/codelm-kv-a.safetensors" "$kv" <<'PY'
import json, struct, sys
src, dst = sys.argv[1], sys.argv[2]
raw = open(src, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
hdr = json.loads(raw[8:8 + n])
body = raw[8 + n:]
keep = {k: v for k, v in hdr.items() if k == "__metadata__" or int(k.split(".")[1]) < 4}
out, blobs, at = {}, [], 0
for k, v in keep.items():
    if k == "__metadata__":
        out[k] = v
        continue
    b, e = v["data_offsets"]
    blobs.append(body[b:e])
    out[k] = dict(v, data_offsets=[at, at + e - b])
    at += e - b
h = json.dumps(out).encode()
h += b" " * (-len(h) % 8)
open(dst, "wb").write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
PY
fi
# One model id per variant, so every variant is fetched through the same daemon.
enc() {
  local name=$1; shift
  rm -rf "$carry/chunks/$name"
  "$carry/kvfetcher" encode --input "$kv" --out "$carry/chunks/$name" --model-id "gpucheck-$name" "$@" >/dev/null
}
enc packed8 --variant packed --bits 8
enc zstd8 --variant zstd --bits 8
enc hevc8 --variant hevc --bits 8 --layers-per-section 2
# Sections cut into one-frame streams: decoded on several NVDEC sessions at once.
enc hevc8-streams --variant hevc --bits 8 --layers-per-section 2 --stream-frames 1
enc hevc8-mixed --variant hevc --bits 8 --value-grouping token
enc packed4 --variant packed --bits 4
enc exact --variant zstd --exact
du -sh "$carry"/chunks/* "$carry"
if [ $bundle = 1 ]; then
  rm -rf "$carry/xz" && mkdir -p "$carry/xz" "$carry/x265"
  xz -T0 -6 -c "$carry/kvfetcher" > "$carry/xz/kvfetcher.xz"
  xz -T0 -6 -c "$carry/kvfetcher-bench" > "$carry/xz/kvfetcher-bench.xz"
  if [ -d "$carry/tests" ]; then tar -C "$carry" -cJf "$carry/xz/tests.tar.xz" tests; fi
  # x265 is GPL: it travels to the GPU host as a tool for fixtures and benchmarks, never
  # linked into the client libraries.
  x265="$(command -v x265 || true)"
  [ -n "$x265" ] || { echo "gpu-prep: --bundle needs the x265 CLI (apt-get install x265)" >&2; exit 1; }
  cp "$x265" "$carry/x265/"
  for lib in $(ldd "$x265" | awk '/libx265|libnuma/ {print $3}') \
    "$(ldconfig -p | awk '/libde265.so.0 / {print $NF; exit}')"; do
    [ -n "$lib" ] && cp -L "$lib" "$carry/x265/"
  done
  tar -C "$carry" -cJf "$carry/xz/x265.tar.xz" x265
  du -sh "$carry/xz"/*
fi

#!/usr/bin/env bash
# Compile-checks daemon/kernels/restore.cu on a host without a GPU or nvcc: NVRTC compiles it to
# PTX for compute_90 (as gen-ptx.sh's nvcc -arch=sm_90 -ptx does), then ptxas assembles the PTX
# for sm_90 and prints each kernel's registers, shared memory and spills.
#   scripts/check-cuda-local.sh           check only (PTX in a temp file)
#   scripts/check-cuda-local.sh --write   also replace the committed daemon/kernels/restore.ptx
#                                         (NVRTC 12.x output; a GPU host's gen-ptx.sh rewrites it)
# Needs python3 and, unpacked into $CUDA_LOCAL (default /tmp/cuda-local), the pip wheels
# nvidia-cuda-nvrtc-cu12 (libnvrtc), nvidia-cuda-runtime-cu12 (cuda_fp16.h, cuda_bf16.h) and
# nvidia-cuda-nvcc-cu12 (ptxas):
#   pip download --no-deps --only-binary=:all: -d /tmp/whl nvidia-cuda-nvrtc-cu12 \
#     nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12
#   for w in /tmp/whl/*.whl; do unzip -qo "$w" -d /tmp/cuda-local; done
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cuda="${CUDA_LOCAL:-/tmp/cuda-local}/nvidia"
nvrtc="$cuda/cuda_nvrtc/lib/libnvrtc.so.12"
ptxas="$cuda/cuda_nvcc/bin/ptxas"
inc="$cuda/cuda_runtime/include"
for f in "$nvrtc" "$ptxas" "$inc/cuda_fp16.h"; do
  [ -e "$f" ] || { echo "check-cuda-local: missing $f (see the header of $0)" >&2; exit 1; }
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# NVRTC has no C library headers: the few stdint types the kernels use.
mkdir -p "$tmp/shim"
cat > "$tmp/shim/stdint.h" <<'H'
#pragma once
typedef unsigned char uint8_t; typedef unsigned short uint16_t; typedef unsigned int uint32_t;
typedef unsigned long long uint64_t; typedef signed char int8_t; typedef short int16_t;
typedef int int32_t; typedef long long int64_t;
H
python3 - "$nvrtc" "$root/daemon/kernels/restore.cu" "$tmp/restore.ptx" "$tmp/shim" "$inc" <<'PY'
import ctypes, sys
lib_path, src_path, out_path, *incs = sys.argv[1:]
lib = ctypes.CDLL(lib_path)
lib.nvrtcGetErrorString.restype = ctypes.c_char_p
def check(r, what):
    if r != 0:
        sys.exit(f"nvrtc {what}: {lib.nvrtcGetErrorString(r).decode()}")
prog = ctypes.c_void_p()
check(lib.nvrtcCreateProgram(ctypes.byref(prog), open(src_path, "rb").read(),
                             src_path.encode(), 0, None, None), "create")
opts = [b"--gpu-architecture=compute_90", b"-std=c++17", b"-default-device"]
opts += [b"-I" + i.encode() for i in incs]
r = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
if log.value.strip():
    print(log.value.decode(), file=sys.stderr)
check(r, "compile")
lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
lib.nvrtcGetPTX(prog, ptx)
open(out_path, "wb").write(ptx.value)
PY
"$ptxas" -arch=sm_90 -v "$tmp/restore.ptx" -o "$tmp/restore.cubin" 2>&1 |
  awk -F"'" '/Compiling entry/ { k = $2 }
       /spill/ { sp = $0; sub(/.*: +/, "", sp) }
       /Used/ { u = $0; sub(/.*: +/, "", u); printf "%-22s %s; %s\n", k, u, sp }'
if [ "${1:-}" = --write ]; then
  cp "$tmp/restore.ptx" "$root/daemon/kernels/restore.ptx"
  echo "check-cuda-local: wrote daemon/kernels/restore.ptx"
fi

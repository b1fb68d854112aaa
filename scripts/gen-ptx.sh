#!/usr/bin/env bash
# Compiles daemon/kernels/restore.cu to PTX (sm_90; the driver JIT-compiles it for the actual
# card) and writes daemon/kernels/restore.ptx, which is committed and embedded in the daemon.
#   scripts/gen-ptx.sh            regenerate the committed PTX
#   scripts/gen-ptx.sh --check    fail if the committed PTX differs from a fresh compile
#   scripts/gen-ptx.sh --out F    write the PTX to F instead
# Needs nvcc (CUDA 13), i.e. a GPU host.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/daemon/kernels/restore.cu"
dst="$root/daemon/kernels/restore.ptx"
mode=write
case "${1:-}" in
  --check) mode=check ;;
  --out) dst="$2" ;;
  "") ;;
  *) echo "usage: $0 [--check | --out FILE]" >&2; exit 2 ;;
esac
nvcc="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
[ -x "$nvcc" ] || { echo "gen-ptx: nvcc not found" >&2; exit 1; }
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
"$nvcc" -arch=sm_90 -ptx -O3 -std=c++17 "$src" -o "$tmp"
if [ "$mode" = check ]; then
  if ! diff -q "$tmp" "$dst" >/dev/null; then
    echo "gen-ptx: $dst differs from a fresh compile of $src; run scripts/gen-ptx.sh" >&2
    exit 1
  fi
  echo "gen-ptx: $dst is up to date"
else
  cp "$tmp" "$dst"
  echo "gen-ptx: wrote $dst"
fi

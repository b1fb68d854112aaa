#!/usr/bin/env bash
# Builds llama.cpp (CPU backend, shared libllama + libggml*) from the llama.cpp sources that
# PyPI's llama-cpp-python sdist vendors under vendor/llama.cpp. No prebuilt binaries are used.
#
# Output (git-ignored):
#   build/llama/src/        the unpacked sdist (vendor/llama.cpp inside)
#   build/llama/cmake/      the cmake build tree
#   build/llama/install/    include/llama.h, include/ggml*.h, lib/libllama.so, lib/libggml*.so,
#                           gguf-py/ (the same llama.cpp's GGUF writer, for convert-stories-gguf.py)
#
# The build is skipped when build/llama/install/lib/libllama.so already exists (delete
# build/llama/install to rebuild), or copied from a per-machine cache of a previous build
# (fresh clones, as in CI, would otherwise compile llama.cpp every time: ~15 min on 2 cores).
# Environment:
#   KVF_LLAMA_CACHE   cache folder (default ~/.cache/kvfetcher/llama-cpp-python-VERSION-ARCH;
#                     "none" turns the cache off)
#   LLAMA_JOBS        parallel jobs (default 2: the dev machine is shared)
#   LLAMA_CMAKE_ARGS  extra cmake arguments (e.g. -DGGML_NATIVE=OFF for portable binaries,
#                     -DGGML_CUDA=ON for the GPU host build, which this script does not test)
#   LLAMA_SDIST       path to an already downloaded sdist tarball (skips pip download)
set -euo pipefail

# Pinned: llama-cpp-python 0.3.36 vendors the llama.cpp whose state format examples/llama parses.
LLAMA_CPP_PYTHON_VERSION="0.3.36"
# Build options that change results, named in the cache folder and in a stamp beside the build,
# so a build made with other options is never reused. GGML_LLAMAFILE=OFF: ggml's llamafile sgemm
# kernels are picked by batch shape, which makes the KV llama.cpp computes depend on how a prompt
# was split into batches (measured on SmolLM2: prefilling 299 tokens then 1 differs from 300 at
# once); without them the CPU path is batch-invariant, so reused KV gives exactly what a full
# prefill would (tests/llama/run.sh asserts it). Prefill speed on the dev machine is unchanged.
BUILD_OPTIONS="-DGGML_LLAMAFILE=OFF"
BUILD_TAG="nollamafile"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/build/llama"
SRC="$OUT/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
LLAMA_SRC="$SRC/vendor/llama.cpp"
PREFIX="$OUT/install"
JOBS="${LLAMA_JOBS:-2}"

CACHE="${KVF_LLAMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvfetcher/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$BUILD_TAG-$(uname -m)}"
STAMP="build-options: $BUILD_OPTIONS ${LLAMA_CMAKE_ARGS:-}"

if [[ -f "$PREFIX/lib/libllama.so" && -f "$PREFIX/include/llama.h" && -d "$PREFIX/gguf-py" &&
      "$(cat "$PREFIX/STAMP" 2>/dev/null)" == "$STAMP" ]]; then
    echo "llama-build: cached: $PREFIX/lib/libllama.so"
    exit 0
fi
if [[ "$CACHE" != none && -f "$CACHE/install/lib/libllama.so" && -d "$CACHE/install/gguf-py" &&
      "$(cat "$CACHE/install/STAMP" 2>/dev/null)" == "$STAMP" ]]; then
    mkdir -p "$OUT"
    rm -rf "$PREFIX"
    cp -a "$CACHE/install" "$PREFIX"
    echo "llama-build: copied from the machine cache $CACHE"
    exit 0
fi

if ! command -v cmake >/dev/null && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "llama-build: installing cmake (apt-get)"
    apt-get install -y -q cmake >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q cmake >/dev/null; }
fi
command -v cmake >/dev/null || { echo "llama-build: cmake not found (apt-get install cmake)" >&2; exit 1; }
command -v c++ >/dev/null || { echo "llama-build: no C++ compiler (apt-get install g++)" >&2; exit 1; }

mkdir -p "$OUT/src" "$OUT/dl"
if [[ ! -f "$LLAMA_SRC/CMakeLists.txt" ]]; then
    tarball="${LLAMA_SDIST:-$OUT/dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz}"
    if [[ ! -f "$tarball" ]]; then
        # --no-build-isolation: pip only needs scikit-build-core to read the metadata; with
        # isolation it would build cmake and ninja from source just to name the sdist.
        python3 -m pip install --quiet 'scikit-build-core>=0.9'
        python3 -m pip download "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" \
            --no-deps --no-binary :all: --no-build-isolation -d "$OUT/dl"
    fi
    tar -xzf "$tarball" -C "$OUT/src"
fi
[[ -f "$LLAMA_SRC/CMakeLists.txt" ]] || { echo "llama-build: $LLAMA_SRC missing after unpack" >&2; exit 1; }

# Minimal targets: the libraries only (no common, tools, examples, tests, server, curl/openssl).
# shellcheck disable=SC2086
nice -n 10 cmake -S "$LLAMA_SRC" -B "$OUT/cmake" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$PREFIX" \
    -DCMAKE_INSTALL_LIBDIR=lib \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' \
    -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_COMMON=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_CURL=OFF \
    -DGGML_CPU=ON \
    $BUILD_OPTIONS \
    ${LLAMA_CMAKE_ARGS:-}
nice -n 10 cmake --build "$OUT/cmake" --target llama -j "$JOBS"
cmake --install "$OUT/cmake" >/dev/null
rm -rf "$PREFIX/gguf-py"
cp -a "$LLAMA_SRC/gguf-py" "$PREFIX/gguf-py"
echo "$STAMP" >"$PREFIX/STAMP"
if [[ "$CACHE" != none ]]; then
    mkdir -p "$CACHE"
    rm -rf "$CACHE/install.tmp"
    cp -a "$PREFIX" "$CACHE/install.tmp" && rm -rf "$CACHE/install" && mv "$CACHE/install.tmp" "$CACHE/install"
fi
echo "llama-build: built $PREFIX/lib/libllama.so"

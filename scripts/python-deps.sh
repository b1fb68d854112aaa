#!/usr/bin/env bash
# The Python side's dependencies, without touching the system Python:
#   - third-party packages pinned in python/requirements-test.txt (torch, transformers, gguf,
#     accelerate, safetensors, pytest) are installed once per machine into a cache folder named by
#     the pins' hash (~5.6 GB: PyPI's torch wheel pulls the CUDA libraries, see the file), so a
#     fresh clone (CI) reuses them;
#   - build/pyenv is a virtualenv of this checkout (git-ignored) that sees that folder through a
#     .pth file, with maturin (the wheel's build tool) installed in it; `make python` installs
#     the kvfetcher wheel into it.
# Environment: KVF_PYDEPS_CACHE (default ~/.cache/kvfetcher), PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
REQ="$ROOT/python/requirements-test.txt"
tag="$(sha256sum "$REQ" | cut -c1-12)-$("$PY" -c 'import sys; print("py%d%d" % sys.version_info[:2])')"
CACHE="${KVF_PYDEPS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvfetcher}"
DEPS="$CACHE/pydeps-$tag"
VENV="$ROOT/build/pyenv"

if [[ ! -f "$DEPS/.complete" ]]; then
    "$PY" -m pip --version >/dev/null 2>&1 || { echo "python-deps: $PY has no pip" >&2; exit 1; }
    mkdir -p "$CACHE"
    tmp="$(mktemp -d "$CACHE/pydeps-tmp.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    echo "python-deps: installing $(grep -vc '^#' "$REQ") pinned packages into $DEPS (first time: ~5.6 GB, minutes)"
    start=$SECONDS
    "$PY" -m pip install --quiet --no-warn-script-location --disable-pip-version-check \
        --target "$tmp/site" -r "$REQ"
    touch "$tmp/site/.complete"
    # Another checkout may have finished first: keep its copy.
    mv -T "$tmp/site" "$DEPS" 2>/dev/null || true
    echo "python-deps: installed in $((SECONDS - start)) s"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$DEPS" >"$site/kvfetcher-deps.pth"
MATURIN_VERSION="1.16.0"
if ! "$VENV/bin/maturin" --version 2>/dev/null | grep -qx "maturin $MATURIN_VERSION"; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "maturin==$MATURIN_VERSION"
fi

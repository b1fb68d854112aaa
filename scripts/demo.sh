#!/usr/bin/env bash
# The demo on embedded defaults: builds kvfetcher and the C client (release), then runs
# `kvfetcher demo`, which starts a store and a daemon on loopback (temp dirs, dev certs),
# captures real KV from the shared stories260K model, saves it through the Rust client, fetches
# it back through the C client, verifies every value and prints one summary.
# Extra arguments go to `kvfetcher demo` (e.g. --tokens 256 --seed 7).
set -euo pipefail
cd "$(dirname "$0")/.."
model=../shared/data/stories260K.bin
if [ ! -f "$model" ]; then
    echo "demo: $model is absent (the shared data sits beside the repository)" >&2
    exit 1
fi
cargo build --release --locked -p kvfetcher -p kvfetcher-c
exec target/release/kvfetcher demo --model "$model" --c-lib target/release/libkvfetcher.so "$@"

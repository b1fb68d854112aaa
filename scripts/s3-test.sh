#!/usr/bin/env bash
# Runs the store's S3 backend test against a real Garage on loopback: starts Garage with a
# one-node layout (scripts/garage-start.sh), runs the store_s3 integration test with its
# endpoint and credentials, and stops Garage again. Fails if Garage is not installed (install:
# `cargo install --locked --debug garage --version 2.5.0`, as scripts/install-deps.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'scripts/garage-stop.sh >/dev/null 2>&1 || true' EXIT
eval "$(scripts/garage-start.sh)"
: "${KVF_S3_ENDPOINT:?garage-start.sh did not export KVF_S3_ENDPOINT}"
echo "s3-test: Garage at $KVF_S3_ENDPOINT, bucket $KVF_S3_BUCKET"
cargo test --locked -p kvfetcher --test store_s3 -- --nocapture 2>&1 | tee /tmp/kvf-s3-test.log
if grep -q "skipped" /tmp/kvf-s3-test.log; then
    echo "s3-test: the S3 test skipped although Garage is running" >&2
    exit 1
fi

#!/usr/bin/env bash
# Runs the store's S3 backend test against a real Garage on loopback: builds Garage from source
# if it is not installed, starts it with a one-node layout (scripts/garage-start.sh), runs the
# store_s3 integration test with its endpoint and credentials, and stops Garage again.
#
# Building Garage takes long on a small machine, so the build gets a deadline: GARAGE_BUILD_SECONDS
# (default 1800), or, under .ci/run, whatever is left of CI's budget (KVF_CI_DEADLINE, epoch
# seconds). If Garage cannot be had in time the test is reported as skipped, loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

GARAGE_VERSION=2.5.0
GARAGE=${GARAGE:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
if [ ! -x "$GARAGE" ]; then
    budget=${GARAGE_BUILD_SECONDS:-1800}
    if [ -n "${KVF_CI_DEADLINE:-}" ]; then
        budget=$(( KVF_CI_DEADLINE - $(date +%s) - 300 ))
    fi
    if [ "$budget" -lt 300 ]; then
        echo "s3-test: skipped: Garage is not installed and only ${budget}s are left to build it"
        exit 0
    fi
    echo "s3-test: building Garage $GARAGE_VERSION from source (unoptimized; deadline ${budget}s)"
    start=$(date +%s)
    if ! timeout "$budget" cargo install --locked --debug garage --version "$GARAGE_VERSION" \
        >/tmp/kvf-garage-build.log 2>&1; then
        tail -5 /tmp/kvf-garage-build.log
        echo "s3-test: skipped: Garage could not be built within ${budget}s"
        exit 0
    fi
    echo "s3-test: Garage built in $(( $(date +%s) - start ))s"
    GARAGE=$HOME/.cargo/bin/garage
fi
export GARAGE

trap 'scripts/garage-stop.sh >/dev/null 2>&1 || true' EXIT
eval "$(scripts/garage-start.sh)"
: "${KVF_S3_ENDPOINT:?garage-start.sh did not export KVF_S3_ENDPOINT}"
echo "s3-test: Garage at $KVF_S3_ENDPOINT, bucket $KVF_S3_BUCKET"
cargo test --locked --workspace --test store_s3 -- --nocapture 2>&1 | tee /tmp/kvf-s3-test.log
if grep -q "skipped" /tmp/kvf-s3-test.log; then
    echo "s3-test: the S3 test skipped although Garage is running" >&2
    exit 1
fi

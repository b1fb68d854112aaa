#!/usr/bin/env bash
# Starts Garage (a distributed S3-compatible store) on loopback with a one-node layout, creates
# a bucket and an access key, and prints the environment the store's S3 backend and its tests
# read. Idempotent per directory: a running instance is reused.
#
# Usage:
#   eval "$(scripts/garage-start.sh)"      # exports KVF_S3_ENDPOINT, KVF_S3_BUCKET, ...
#   cargo test -p kvfetcher --test store_s3
#   scripts/garage-stop.sh
#
# Environment: GARAGE (binary; default: PATH, then ~/.cargo/bin/garage), KVF_GARAGE_DIR
# (default /tmp/kvf-garage), KVF_GARAGE_PORT (S3 port, default 3900; RPC and admin use +1, +3).
# Everything binds to 127.0.0.1 only. The same lines are written to $KVF_GARAGE_DIR/env.
set -euo pipefail

GARAGE=${GARAGE:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
DIR=${KVF_GARAGE_DIR:-/tmp/kvf-garage}
PORT=${KVF_GARAGE_PORT:-3900}
BUCKET=kvfetcher
# Fixed test credentials (loopback only): Garage key ids are "GK" + 24 hex digits.
KEY_ID=GK6b7666657463686572746573
SECRET=6b7666657463686572206c6f6f706261636b206f6e6c7920746573742073656b

[ -x "$GARAGE" ] || { echo "garage-start: garage binary not found (cargo install --locked garage)" >&2; exit 2; }
mkdir -p "$DIR/meta" "$DIR/data"
CFG=$DIR/garage.toml
g() { "$GARAGE" -c "$CFG" "$@"; }

if [ ! -f "$CFG" ]; then
    cat > "$CFG" <<TOML
metadata_dir = "$DIR/meta"
data_dir = "$DIR/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((PORT + 1))"
rpc_public_addr = "127.0.0.1:$((PORT + 1))"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$((PORT + 3))"
TOML
fi

if ! { [ -f "$DIR/pid" ] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null; }; then
    nohup "$GARAGE" -c "$CFG" server >"$DIR/garage.log" 2>&1 &
    echo $! > "$DIR/pid"
fi

for _ in $(seq 60); do
    g status >/dev/null 2>&1 && break
    sleep 0.5
done
g status >/dev/null 2>&1 || { echo "garage-start: garage did not come up; see $DIR/garage.log" >&2; exit 1; }

NODE=$(g node id -q 2>/dev/null | cut -c1-64 || g node id | cut -c1-64)
if ! g layout show 2>/dev/null | grep -q "${NODE:0:16}.*dc1"; then
    g layout assign -z dc1 -c 1G "$NODE" >/dev/null
    VERSION=$(( $(g layout show | sed -n 's/.*Current cluster layout version: \([0-9]*\).*/\1/p' | head -1) + 1 ))
    g layout apply --version "$VERSION" >/dev/null
fi
# Wait until the layout is live and bucket creation works.
for _ in $(seq 40); do
    if g bucket info "$BUCKET" >/dev/null 2>&1 || g bucket create "$BUCKET" >/dev/null 2>&1; then break; fi
    sleep 0.5
done
g bucket info "$BUCKET" >/dev/null
g key info "$KEY_ID" >/dev/null 2>&1 || g key import --yes -n kvfetcher "$KEY_ID" "$SECRET" >/dev/null
g bucket allow --read --write --owner "$BUCKET" --key "$KEY_ID" >/dev/null

ENV_LINES="export KVF_S3_ENDPOINT=http://127.0.0.1:$PORT
export KVF_S3_BUCKET=$BUCKET
export KVF_S3_ACCESS_KEY=$KEY_ID
export KVF_S3_SECRET_KEY=$SECRET
export KVF_S3_REGION=garage"
echo "$ENV_LINES" > "$DIR/env"
echo "$ENV_LINES"

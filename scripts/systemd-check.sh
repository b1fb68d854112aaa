#!/usr/bin/env bash
# Checks packaging/kvfetcher.service with `systemd-analyze verify` (ExecStart pointed at the
# built binary, since /usr/bin/kvfetcher need not be installed) and fails on any complaint.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${KVFETCHER_BIN:-$PWD/target/release/kvfetcher}
[ -x "$bin" ] || cargo build --release --locked -p kvfetcher
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#/usr/bin/kvfetcher#$bin#" packaging/kvfetcher.service > "$tmp/kvfetcher.service"
out=$(systemd-analyze verify "$tmp/kvfetcher.service" 2>&1) || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then
    echo "systemd-check: systemd-analyze verify complained:" >&2
    echo "$out" >&2
    exit 1
fi
for key in Type=notify WatchdogSec= RuntimeDirectory=kvfetcher User=kvfetcher Group=kvfetcher; do
    grep -q "^$key" packaging/kvfetcher.service || { echo "systemd-check: unit lacks $key" >&2; exit 1; }
done
echo "systemd-check: packaging/kvfetcher.service verified"

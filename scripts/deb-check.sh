#!/usr/bin/env bash
# Builds the .deb with cargo-deb, installs it with dpkg, checks what it installed (binary,
# config, unit, system user), then starts the installed binary directly - a store and the
# daemon with a test config on loopback - and runs a lookup through the daemon's socket.
# Needs root (dpkg). The lead calls it from .ci/run via `make deb-check`.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

cargo deb -p kvfetcher --locked
deb=$(ls -t target/debian/kvfetcher_*.deb | head -n1)
echo "deb-check: installing $deb"
dpkg-deb --info "$deb" | sed 's/^/  /'
$sudo dpkg -i "$deb"

test -x /usr/bin/kvfetcher
test -f /etc/kvfetcher/kvfetcher.toml
unit=$(dpkg -L kvfetcher | grep -E '/systemd/system/kvfetcher\.service$' || true)
test -n "$unit" || { echo "deb-check: the package installs no kvfetcher.service" >&2; exit 1; }
getent passwd kvfetcher >/dev/null || { echo "deb-check: no kvfetcher user" >&2; exit 1; }
getent group kvfetcher >/dev/null || { echo "deb-check: no kvfetcher group" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port=$(( 20000 + RANDOM % 20000 ))
/usr/bin/kvfetcher store --dev-cert "$work/certs" >/dev/null
/usr/bin/kvfetcher store --listen "127.0.0.1:$port" --data-dir "$work/data" --cert-dir "$work/certs" \
    --insecure-open-writes &
pids+=($!)
cat > "$work/kvfetcher.toml" <<TOML
socket = "$work/kvfetcher.sock"
metrics_addr = "127.0.0.1:$(( port + 1 ))"
[[stores]]
addr = "127.0.0.1:$port"
tls = "$work/certs"
TOML
/usr/bin/kvfetcher daemon --config "$work/kvfetcher.toml" &
pids+=($!)
for _ in $(seq 100); do
    [ -S "$work/kvfetcher.sock" ] && break
    sleep 0.1
done
[ -S "$work/kvfetcher.sock" ] || { echo "deb-check: the installed daemon did not create its socket" >&2; exit 1; }
answer=$(/usr/bin/kvfetcher lookup --socket "$work/kvfetcher.sock" --model deb-check --tokens 1,2,3)
echo "deb-check: lookup answered: $answer"
[ "$answer" = "0 of 3 tokens available" ] || { echo "deb-check: unexpected answer" >&2; exit 1; }
curl -fsS "http://127.0.0.1:$(( port + 1 ))/metrics" 2>/dev/null | grep -q '^kvfetcher_lookups_total 1$' \
    || echo "deb-check: (metrics not checked: curl missing or no answer)"
echo "deb-check: OK"

#!/usr/bin/env bash
# Installs what building, testing and the demo need, and only what is missing.
#   scripts/install-deps.sh            system packages + cargo tools for `make test`
#   scripts/install-deps.sh --demo     only what `make demo` needs
# As root it runs apt-get; otherwise it prints the exact command to run.
set -euo pipefail

mode=${1:-test}
pkgs=(build-essential pkg-config libx265-dev libde265-dev libzstd-dev)
if [ "$mode" != "--demo" ]; then
  pkgs+=(ffmpeg iproute2 systemd valgrind dpkg-dev)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    sh -c "$cmd" >/tmp/kvfetcher-apt.log 2>&1 || { tail -20 /tmp/kvfetcher-apt.log; exit 1; }
  else
    echo "install-deps: missing packages; run as root:" >&2
    echo "  sudo sh -c '$cmd'" >&2
    exit 1
  fi
fi

command -v cargo >/dev/null || { echo "install-deps: cargo not found; install Rust (rustup) first" >&2; exit 1; }
if [ "$mode" != "--demo" ]; then
  # Pinned tool versions: the committed C header is compared against cbindgen's output.
  have() { cargo install --list | grep -q "^$1 v$2:"; }
  have cbindgen 0.29.4 || cargo install --locked cbindgen --version 0.29.4
  have cargo-deb 3.8.0 || cargo install --locked cargo-deb --version 3.8.0
  have cargo-fuzz 0.13.2 || cargo install --locked cargo-fuzz --version 0.13.2
fi

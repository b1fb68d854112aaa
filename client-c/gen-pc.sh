#!/bin/sh
# Writes kvfetcher.pc from kvfetcher.pc.in.
# Usage: client-c/gen-pc.sh PREFIX OUTPUT [LIBDIR]   (LIBDIR defaults to PREFIX/lib)
set -eu
if [ $# -lt 2 ]; then
    echo "usage: $0 PREFIX OUTPUT [LIBDIR]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
prefix=$1
out=$2
libdir=${3:-$prefix/lib}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -n 1)
sed -e "s|@PREFIX@|$prefix|g" -e "s|@LIBDIR@|$libdir|g" -e "s|@VERSION@|$version|g" \
    "$here/kvfetcher.pc.in" > "$out"

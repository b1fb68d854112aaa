#!/bin/sh
# Builds libkvfetcher (static and shared) and the C tests, starts the daemon's local server
# over an in-memory backend (daemon/tests/server_c_harness.rs), and runs:
#   - tests/c/test_client.c linked statically, under AddressSanitizer (leaks included),
#   - the same test under valgrind (if installed; skipped with a message otherwise),
#   - examples/c/fetch.c linked against libkvfetcher.so through kvfetcher.pc (pkg-config), in
#     host mode and in --gpu 0 mode (verified on a GPU host; exit 77 = no GPU support, skipped).
# Exit status 0 on success. Needs gcc; the test data is in data/.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
CC=${CC:-gcc}
target=${CARGO_TARGET_DIR:-$root/target}/debug

if ! command -v "$CC" >/dev/null 2>&1; then
    echo "skipped: $CC not found"
    exit 0
fi

cargo build -q --workspace --lib --bins --tests
harness=$(cargo test -q --workspace --test server_c_harness --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*server_c_harness[^"]*\)".*/\1/p' | tail -n 1)
if [ -z "$harness" ]; then
    echo "run.sh: cannot build the test server" >&2
    exit 1
fi

work=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

cflags="-std=c11 -Wall -Wextra -Werror -g -I$root/include"
libs="-lpthread -ldl -lm"
$CC $cflags -fsanitize=address -fno-omit-frame-pointer tests/c/test_client.c \
    "$target/libkvfetcher.a" $libs -o "$work/test_client_asan"
$CC $cflags tests/c/test_client.c "$target/libkvfetcher.a" $libs -o "$work/test_client"

# pkg-config against a staged install prefix.
mkdir -p "$work/prefix/include" "$work/prefix/lib/pkgconfig"
cp include/kvfetcher.h "$work/prefix/include/"
cp "$target/libkvfetcher.so" "$target/libkvfetcher.a" "$work/prefix/lib/"
client-c/gen-pc.sh "$work/prefix" "$work/prefix/lib/pkgconfig/kvfetcher.pc"
if command -v pkg-config >/dev/null 2>&1; then
    pc=$(PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig" pkg-config --cflags --libs kvfetcher)
else
    echo "note: pkg-config not found; using the flags of kvfetcher.pc by hand"
    pc="-I$work/prefix/include -L$work/prefix/lib -lkvfetcher"
fi
$CC -std=c11 -Wall -Wextra -Werror examples/c/fetch.c $pc -ldl -o "$work/fetch"

mkdir -p "$work/ref"
# kvf-replace.sock: the same server, with this uid allowed to replace stored chunks.
KVF_C_SOCKET="$work/kvf.sock" KVF_C_REFDIR="$work/ref" KVF_C_REPLACE_SOCKET="$work/kvf-replace.sock" \
    "$harness" --ignored --exact serve_for_c_tests --nocapture >"$work/server.log" 2>&1 &
server_pid=$!
i=0
while [ ! -S "$work/kvf.sock" ]; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        wait "$server_pid" && rc=0 || rc=$?
        server_pid=
        echo "run.sh: test server exited ($rc):" >&2
        cat "$work/server.log" >&2
        exit 1
    fi
    i=$((i + 1))
    if [ $i -gt 600 ]; then echo "run.sh: test server did not start" >&2; exit 1; fi
    sleep 0.1
done

echo "== test_client (AddressSanitizer)"
ASAN_OPTIONS=detect_leaks=1 "$work/test_client_asan" "$work/kvf.sock" "$work/ref" "$work/kvf-replace.sock"

if command -v valgrind >/dev/null 2>&1; then
    echo "== test_client (valgrind)"
    valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
        "$work/test_client" "$work/kvf.sock" "$work/ref" "$work/kvf-replace.sock"
else
    echo "skipped: valgrind not found"
fi

echo "== examples/c/fetch (shared library via pkg-config)"
ids=$(od -An -tu4 -v "$work/ref/tokens.bin" | tr -s ' \n' ' ' | cut -d' ' -f2-21)
LD_LIBRARY_PATH="$work/prefix/lib" "$work/fetch" "$work/kvf.sock" codelm-107m $ids >"$work/fetch.out"
cat "$work/fetch.out"
grep -q "shape: 8 layers, 20 tokens, 2 kv heads, head_dim 128" "$work/fetch.out"
grep -q "^layer 7:" "$work/fetch.out"

echo "== examples/c/fetch --gpu 0"
rc=0
LD_LIBRARY_PATH="$work/prefix/lib" "$work/fetch" --gpu 0 --hold-ms 1 "$work/kvf.sock" codelm-107m $ids \
    >"$work/fetch-gpu.out" 2>&1 || rc=$?
cat "$work/fetch-gpu.out"
case $rc in
    0) grep -q "^gpu verified: 8 layers" "$work/fetch-gpu.out" ;;
    77) echo "skipped: no GPU support (driver or daemon)" ;;
    *) echo "run.sh: fetch --gpu 0 failed ($rc)" >&2; exit 1 ;;
esac
echo "C tests passed"

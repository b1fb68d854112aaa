#!/usr/bin/env bash
# Slow-link emulation for the store: a server namespace and a client namespace joined by veth
# pairs, shaped with tc (rate, RTT, optional loss). Runs a server command in one namespace and a
# client command in the other, then removes everything it made (trap on exit).
#
# Only the namespaces it creates (kvf-srv, kvf-cli, kvf-mid) and their private 10.77.0.0/24
# link are ever touched.
#
# Usage (as root):
#   scripts/netns-link.sh --rate 10gbit --rtt 2ms [--loss 0.1%] [--mtu 1500] \
#       [--delay auto|netem|bridge] [--delay-bridge 'kvfetcher-bench delay-bridge'] \
#       --server 'kvfetcher-bench net-serve ...' --client 'kvfetcher-bench net-fetch ...'
#   scripts/netns-link.sh --down          # remove leftovers of an interrupted run
#
# Delay: with netem in the kernel, netem adds rate, delay and loss on each veth end. Without it
# (CONFIG_NET_SCH_NETEM unset, as on the development VM), tbf shapes the rate and a userspace
# delay line (`kvfetcher-bench delay-bridge`) in a middle namespace adds RTT/2 each way.
#
# The commands run through `bash -c`; they see KVF_SERVER_IP and KVF_CLIENT_IP. The client's
# exit status is the script's; the server gets SIGTERM after the client ends, and 10 s to exit.
set -euo pipefail

NS_SRV=kvf-srv
NS_CLI=kvf-cli
NS_MID=kvf-mid
IP_SRV=10.77.0.1
IP_CLI=10.77.0.2
RATE=1gbit
RTT=2ms
LOSS=
MTU=1500
DELAY_MODE=auto
BRIDGE_CMD=${KVF_DELAY_BRIDGE:-kvfetcher-bench delay-bridge}
SERVER_CMD=
CLIENT_CMD=

down() {
    local ns
    for ns in "$NS_SRV" "$NS_CLI" "$NS_MID"; do ip netns del "$ns" 2>/dev/null || true; done
}

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --rate) RATE=$2; shift 2 ;;
        --rtt) RTT=$2; shift 2 ;;
        --loss) LOSS=$2; shift 2 ;;
        --mtu) MTU=$2; shift 2 ;;
        --delay) DELAY_MODE=$2; shift 2 ;;
        --delay-bridge) BRIDGE_CMD=$2; shift 2 ;;
        --server) SERVER_CMD=$2; shift 2 ;;
        --client) CLIENT_CMD=$2; shift 2 ;;
        --down) down; exit 0 ;;
        -h|--help) usage ;;
        *) echo "netns-link: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$SERVER_CMD" ] && [ -n "$CLIENT_CMD" ] || usage
[ "$(id -u)" = 0 ] || { echo "netns-link: needs root (ip netns, tc)" >&2; exit 2; }
command -v tc >/dev/null || { echo "netns-link: tc not found (use the store's --max-rate instead)" >&2; exit 2; }

# "2ms", "500us", "0.002s" -> microseconds.
to_us() {
    awk -v t="$1" 'BEGIN { n = t + 0; u = t; sub(/^[0-9.]+/, "", u);
        printf "%.0f", (u == "us") ? n : (u == "s") ? n * 1e6 : n * 1000 }'
}
# "10gbit", "500mbit" -> bits per second.
to_bps() {
    awk -v r="$1" 'BEGIN { n = r + 0; u = tolower(r); sub(/^[0-9.]+/, "", u);
        m = (u ~ /^g/) ? 1e9 : (u ~ /^m/) ? 1e6 : (u ~ /^k/) ? 1e3 : 1; printf "%.0f", n * m }'
}
RTT_US=$(to_us "$RTT")
HALF_US=$((RTT_US / 2))
BPS=$(to_bps "$RATE")
# Bottleneck queue: two bandwidth-delay products, at least 1 MB (packets: at least 1000).
QUEUE_BYTES=$(awk -v b="$BPS" -v us="$RTT_US" 'BEGIN { q = 2 * b / 8 * us / 1e6; if (q < 1048576) q = 1048576; printf "%.0f", q }')
QUEUE_PKTS=$((QUEUE_BYTES / 1500))
# tbf bucket: half a millisecond at line rate, at least two 64 KiB GSO frames.
BURST=$(awk -v b="$BPS" 'BEGIN { q = b / 8 / 2000; if (q < 131072) q = 131072; printf "%.0f", q }')

if [ "$DELAY_MODE" = auto ]; then
    ip netns add kvf-probe
    if ip netns exec kvf-probe tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then DELAY_MODE=netem; else DELAY_MODE=bridge; fi
    ip netns del kvf-probe
fi

SERVER_PID=
BRIDGE_PID=
stop_pid() {
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    stop_pid "$SERVER_PID"
    stop_pid "$BRIDGE_PID"
    down
}
trap cleanup EXIT INT TERM

down
ip netns add "$NS_SRV"
ip netns add "$NS_CLI"
for ns in "$NS_SRV" "$NS_CLI"; do
    ip -n "$ns" link set lo up
    # Large socket buffers so neither TCP nor QUIC is limited by the defaults at 25-40 Gbit/s.
    ip netns exec "$ns" sysctl -qw net.core.rmem_max=268435456 net.core.wmem_max=268435456 \
        net.ipv4.tcp_rmem="4096 131072 268435456" net.ipv4.tcp_wmem="4096 131072 268435456" 2>/dev/null || true
done

if [ "$DELAY_MODE" = netem ]; then
    ip link add kvf-s type veth peer name kvf-c
    ip link set kvf-s netns "$NS_SRV"
    ip link set kvf-c netns "$NS_CLI"
    LOSS_ARGS=()
    [ -n "$LOSS" ] && LOSS_ARGS=(loss "$LOSS")
    ip netns exec "$NS_SRV" tc qdisc add dev kvf-s root netem delay "${HALF_US}us" rate "$RATE" limit "$QUEUE_PKTS" "${LOSS_ARGS[@]}"
    ip netns exec "$NS_CLI" tc qdisc add dev kvf-c root netem delay "${HALF_US}us" rate "$RATE" limit "$QUEUE_PKTS" "${LOSS_ARGS[@]}"
else
    ip netns add "$NS_MID"
    ip netns exec "$NS_MID" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
    ip link add kvf-s type veth peer name kvf-ms
    ip link add kvf-c type veth peer name kvf-mc
    ip link set kvf-s netns "$NS_SRV"
    ip link set kvf-c netns "$NS_CLI"
    ip link set kvf-ms netns "$NS_MID"
    ip link set kvf-mc netns "$NS_MID"
    for dev in kvf-ms kvf-mc; do
        ip -n "$NS_MID" link set "$dev" mtu "$MTU" up
        ip netns exec "$NS_MID" tc qdisc add dev "$dev" root tbf rate "$RATE" burst "$BURST" limit "$QUEUE_BYTES"
    done
    LOSS_PPM=0
    [ -n "$LOSS" ] && LOSS_PPM=$(awk -v l="${LOSS%\%}" 'BEGIN { printf "%.0f", l * 10000 }')
    ip netns exec "$NS_MID" bash -c "exec $BRIDGE_CMD --a kvf-ms --b kvf-mc --delay-us $HALF_US --loss-ppm $LOSS_PPM" &
    BRIDGE_PID=$!
fi
ip -n "$NS_SRV" addr add "$IP_SRV/24" dev kvf-s
ip -n "$NS_CLI" addr add "$IP_CLI/24" dev kvf-c
ip -n "$NS_SRV" link set kvf-s mtu "$MTU" up
ip -n "$NS_CLI" link set kvf-c mtu "$MTU" up
echo "netns-link: $IP_SRV <-> $IP_CLI, $RATE, rtt ${RTT_US}us${LOSS:+, loss $LOSS}, mtu $MTU, delay by $DELAY_MODE, queue $QUEUE_BYTES B" >&2

# Give the bridge a moment to bind its sockets.
sleep 0.3
[ -z "$BRIDGE_PID" ] || kill -0 "$BRIDGE_PID" 2>/dev/null || { echo "netns-link: delay bridge exited" >&2; exit 1; }

export KVF_SERVER_IP=$IP_SRV KVF_CLIENT_IP=$IP_CLI
ip netns exec "$NS_SRV" bash -c "exec $SERVER_CMD" &
SERVER_PID=$!
set +e
ip netns exec "$NS_CLI" bash -c "$CLIENT_CMD"
STATUS=$?
set -e
stop_pid "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=
exit "$STATUS"

//! QUIC transport parameters shared by the store server and its clients, tuned for moving
//! large objects over 1-40 Gbit/s links with 1-20 ms RTT.
//!
//! quinn's defaults target the public internet (a 1.25 MB stream window, about 100 Mbit/s at
//! 100 ms); a KV fetch needs windows of at least one bandwidth-delay product per connection.

use std::net::SocketAddr;
use std::sync::{Arc, Once};
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{AckFrequencyConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

/// Per-stream receive window: 25 Gbit/s x 10 ms is 31 MB; one object stream may use it all.
pub(crate) const STREAM_WINDOW: u32 = 32 << 20;
/// Per-connection receive window: four full streams, a 40 Gbit/s x 20 ms path.
pub(crate) const CONNECTION_WINDOW: u32 = 128 << 20;
/// Bytes a sender keeps unacknowledged per connection, matched to the receive window.
pub(crate) const SEND_WINDOW: u64 = 128 << 20;
/// Largest UDP payload probed by MTU discovery: a 1500-byte Ethernet MTU minus IPv6/UDP headers
/// (quinn starts at 1200 and climbs). 1472 (the IPv4 figure) was tried: no measurable gain.
pub(crate) const MTU_UPPER_BOUND: u16 = 1452;

/// Kernel buffer asked for on every QUIC endpoint's UDP socket, each way. The default (about
/// 208 KB) holds under 2 ms of a 1 Gbit/s stream: a receiver descheduled that long on a busy
/// host drops datagrams, which loss-based congestion control reads as congestion (measured on
/// the 2-core dev box: RcvbufErrors and CUBIC at 40-70% of the link). TCP does not suffer,
/// because its receive window stops the sender instead. Capped by `net.core.rmem_max` /
/// `wmem_max`; raise those on hosts that fetch at many Gbit/s.
pub(crate) const UDP_SOCKET_BUFFER: usize = 32 << 20;

/// Binds a UDP socket for a QUIC endpoint with [`UDP_SOCKET_BUFFER`]-sized kernel buffers
/// (best effort: a smaller grant is logged once, not an error).
pub(crate) fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let sock = std::net::UdpSocket::bind(addr)?;
    let _ = setsockopt(&sock, sockopt::RcvBuf, &UDP_SOCKET_BUFFER);
    let _ = setsockopt(&sock, sockopt::SndBuf, &UDP_SOCKET_BUFFER);
    // Linux reports twice the size it granted.
    if let Ok(got) = getsockopt(&sock, sockopt::RcvBuf) {
        if got / 2 < UDP_SOCKET_BUFFER {
            static WARN: Once = Once::new();
            WARN.call_once(|| {
                tracing::warn!(
                    granted = got / 2,
                    wanted = UDP_SOCKET_BUFFER,
                    "UDP receive buffer capped by net.core.rmem_max; fast QUIC fetches may lose \
                     datagrams on a busy host"
                )
            });
        }
    }
    Ok(sock)
}

/// A quinn endpoint (client when `server` is None) on a socket from [`bind_udp`].
pub(crate) fn quic_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        bind_udp(addr)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Which congestion controller quinn runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC (quinn's default): loss-based.
    #[default]
    Cubic,
    /// BBR (quinn's experimental implementation): model-based, tolerates random loss.
    Bbr,
    /// NewReno: the classic loss-based controller.
    NewReno,
}

/// Knobs that differ between uses of `transport_config`.
#[derive(Debug, Clone, Copy)]
pub struct TransportTuning {
    /// Congestion controller.
    pub congestion: Congestion,
    /// Concurrent bidirectional streams the peer may open.
    pub max_streams: u32,
    /// Connection closed after this long without any packet.
    pub idle_timeout: Duration,
    /// Keep-alive interval (clients set one below the server's idle timeout).
    pub keep_alive: Option<Duration>,
    /// Use the large windows above; off gives quinn's defaults, for comparison.
    pub large_windows: bool,
    /// Ask the peer (QUIC ACK frequency extension) to acknowledge only every this many
    /// ack-eliciting packets; `None` keeps quinn's default (every other packet).
    pub ack_every: Option<u32>,
}

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning {
            congestion: Congestion::Cubic,
            max_streams: 256,
            idle_timeout: Duration::from_secs(30),
            keep_alive: None,
            large_windows: true,
            ack_every: None,
        }
    }
}

/// Builds a quinn transport configuration from `t`.
pub(crate) fn transport_config(t: &TransportTuning) -> TransportConfig {
    let mut c = TransportConfig::default();
    c.max_concurrent_bidi_streams(VarInt::from_u32(t.max_streams));
    c.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Durations above 2^62 ms cannot occur for configured timeouts; fall back to none.
    c.max_idle_timeout(IdleTimeout::try_from(t.idle_timeout).ok());
    c.keep_alive_interval(t.keep_alive);
    if t.large_windows {
        c.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
        c.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
        c.send_window(SEND_WINDOW);
    }
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    c.mtu_discovery_config(Some(mtu));
    c.enable_segmentation_offload(true);
    if let Some(n) = t.ack_every {
        let mut ack = AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(n.saturating_sub(1)));
        c.ack_frequency_config(Some(ack));
    }
    match t.congestion {
        Congestion::Cubic => c.congestion_controller_factory(Arc::new(CubicConfig::default())),
        Congestion::Bbr => c.congestion_controller_factory(Arc::new(BbrConfig::default())),
        Congestion::NewReno => c.congestion_controller_factory(Arc::new(NewRenoConfig::default())),
    };
    c
}

//! QUIC transport parameters shared by the store server and its clients, tuned for moving
//! large objects over 1-40 Gbit/s links with 1-20 ms RTT.
//!
//! quinn's defaults target the public internet (a 1.25 MB stream window, about 100 Mbit/s at
//! 100 ms); a KV fetch needs windows of at least one bandwidth-delay product per connection.

use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{AckFrequencyConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

/// Per-stream receive window: 25 Gbit/s x 10 ms is 31 MB; one object stream may use it all.
pub const STREAM_WINDOW: u32 = 32 << 20;
/// Per-connection receive window: four full streams, a 40 Gbit/s x 20 ms path.
pub const CONNECTION_WINDOW: u32 = 128 << 20;
/// Bytes a sender keeps unacknowledged per connection, matched to the receive window.
pub const SEND_WINDOW: u64 = 128 << 20;
/// Largest UDP payload probed by MTU discovery: a 1500-byte Ethernet MTU minus IPv6/UDP headers
/// (quinn starts at 1200 and climbs).
pub const MTU_UPPER_BOUND: u16 = 1452;

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

/// Knobs that differ between uses of [`transport_config`].
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
pub fn transport_config(t: &TransportTuning) -> TransportConfig {
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

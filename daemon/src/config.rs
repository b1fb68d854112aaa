//! The daemon's TOML configuration: where it listens, which stores it talks to, how hard it
//! works, and what it saves.
//!
//! This module only parses and validates; it opens no sockets and reads no certificates.
//! Every field has a default, so an empty file is a valid configuration (one store on loopback).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default Unix socket path, under the systemd `RuntimeDirectory`.
pub const DEFAULT_SOCKET: &str = "/run/kvfetcher/kvfetcher.sock";

/// Most QUIC connections the daemon keeps to one store (`fetch.connections_per_store`).
pub const MAX_CONNECTIONS_PER_STORE: usize = 16;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("cannot parse config: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range or inconsistent with another.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unix socket the local protocol listens on.
    pub socket: PathBuf,
    /// Permission bits of the socket, as an octal string (`"0660"`: owner and group only).
    pub socket_mode: String,
    /// Loopback address of the Prometheus endpoint; `None` turns metrics off.
    pub metrics_addr: Option<SocketAddr>,
    /// Log format: `"text"` or `"json"`.
    pub log_format: LogFormat,
    /// Stores to fetch from and save to; chunk keys are spread over them by hash.
    pub stores: Vec<StoreConfig>,
    /// Fetch tuning.
    pub fetch: FetchConfig,
    /// Save tuning.
    pub save: SaveConfig,
    /// Codec profiles.
    pub codec: CodecConfig,
    /// GPU fetch buffers and saves.
    pub gpu: GpuConfig,
    /// Limits of the local server (per client and in total).
    pub server: ServerConfig,
}

/// Limits of the local Unix-socket server: how much one client may hold of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Connected clients at most; one more is answered `busy`.
    pub max_clients: usize,
    /// Connected clients of one uid at most; one more is answered `busy`.
    pub max_clients_per_uid: usize,
    /// Connections in their handshake at most (not counted as clients); at the cap the
    /// oldest pending handshake is closed to make room.
    pub max_handshakes: usize,
    /// Milliseconds a connection may take to send its handshake.
    pub handshake_timeout_ms: u64,
    /// Seconds without a request, with nothing in progress, after which a client is
    /// disconnected; 0: never.
    pub idle_timeout_s: u64,
    /// Live fetch handles per connection at most.
    pub max_fetches_per_client: usize,
    /// Live fetch handles in the daemon at most; one more fetch is answered `busy`.
    pub max_fetches: usize,
    /// Messages queued for one client and not yet written to its socket; a client that
    /// does not read its replies reaches this bound and is disconnected.
    pub max_queued_replies: usize,
    /// Lookups and saves of one client in progress at once; one more disconnects it.
    pub max_pending_requests: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let d = crate::server::ServeOptions::default();
        ServerConfig {
            max_clients: d.max_clients,
            max_clients_per_uid: d.max_clients_per_uid,
            max_handshakes: d.max_handshakes,
            handshake_timeout_ms: d.handshake_timeout.as_millis() as u64,
            idle_timeout_s: d.idle_timeout.map_or(0, |t| t.as_secs()),
            max_fetches_per_client: d.max_fetches_per_client,
            max_fetches: d.max_fetches,
            max_queued_replies: d.max_queued_replies,
            max_pending_requests: d.max_pending_requests,
        }
    }
}

impl ServerConfig {
    /// The options of the daemon's [`crate::server::serve_with`].
    pub fn options(&self) -> crate::server::ServeOptions {
        crate::server::ServeOptions {
            max_clients: self.max_clients,
            max_clients_per_uid: self.max_clients_per_uid,
            max_handshakes: self.max_handshakes,
            handshake_timeout: std::time::Duration::from_millis(self.handshake_timeout_ms),
            idle_timeout: (self.idle_timeout_s > 0)
                .then(|| std::time::Duration::from_secs(self.idle_timeout_s)),
            max_fetches_per_client: self.max_fetches_per_client,
            max_fetches: self.max_fetches,
            max_queued_replies: self.max_queued_replies,
            max_pending_requests: self.max_pending_requests,
            ..crate::server::ServeOptions::default()
        }
    }
}

/// GPU settings: whether `gpu:N` requests are served and with how many NVDEC sessions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Serve fetches into and saves from GPU memory (false: such requests are answered
    /// `gpu_unsupported`, "disabled in config").
    pub enabled: bool,
    /// NVDEC sessions per GPU; 0 means one per NVDEC engine of the card.
    pub nvdec_sessions: usize,
    /// How the daemon's threads wait for the GPU: `auto` (the driver's choice, default), `spin`,
    /// `yield` or `block`.
    pub host_wait: crate::gpu::HostWait,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: true,
            nvdec_sessions: 0,
            host_wait: crate::gpu::HostWait::default(),
        }
    }
}

impl GpuConfig {
    /// The options of the daemon's [`crate::gpu::GpuDevices`].
    pub fn options(&self) -> crate::gpu::GpuOptions {
        crate::gpu::GpuOptions {
            enabled: self.enabled,
            nvdec_sessions: self.nvdec_sessions,
            host_wait: self.host_wait,
        }
    }
}

/// How logs are written to stderr (journald captures them under systemd).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// One remote store reached over QUIC.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// UDP address of the store.
    pub addr: SocketAddr,
    /// TLS server name the store's certificate must carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// TLS trust for the store: a directory (its `ca.pem` is trusted, else its `cert.pem` is
    /// pinned; `client-cert.pem`/`client-key.pem` there enable mutual TLS) or a CA bundle file.
    #[serde(default = "default_tls")]
    pub tls: PathBuf,
    /// File holding a bearer token the store requires, if any.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Milliseconds between QUIC keep-alives on an idle connection to the store.
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
    /// Milliseconds without a packet from the store after which its connection counts as
    /// dead: requests on it fail and the next one reconnects. Must exceed `keep_alive_ms`.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

/// Fetch-side limits: memory bound, parallelism and fairness.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// Sections one fetch keeps requested but not yet restored.
    pub max_inflight_sections: usize,
    /// Bytes of compressed sections held in memory by all fetches together (back-pressure).
    pub max_inflight_bytes: usize,
    /// Sections decoded at once across all fetches (the decode worker pool).
    pub decode_workers: usize,
    /// Milliseconds to wait for a store's QUIC handshake before reporting it unavailable.
    pub connect_timeout_ms: u64,
    /// QUIC connections kept to each store, 1..=16, used round robin. One connection is
    /// driven by one task and tops out near 4 Gbit/s of CPU; more let a fetch use more cores.
    pub connections_per_store: usize,
    /// Which decoder restores sections into GPU memory: `auto` (NVDEC or the CPU, which leave
    /// the SMs to the engine, when idle and fast enough for the link; else the fastest),
    /// `fastest`, or `gpu`, `nvdec`, `cpu` wherever a section allows it.
    pub restore_route: crate::pipeline::RoutePolicy,
}

/// Save-side settings: what the daemon encodes and with how many workers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaveConfig {
    /// Variant name to encode with (`zstd`, `packed`, `hevc`, or `rans`: transform coding with
    /// the model's codec profile from `codec.profile_dir`, steps chosen for `target_kl`;
    /// models without a profile are saved as `zstd` at `bits`).
    pub variant: String,
    /// `rans` only: the mean KL of the next-token distribution (nats) the per-layer steps are
    /// chosen for, as the profile predicts it (default [`kvfetcher_codec::DEFAULT_TARGET_KL`]).
    pub target_kl: f64,
    /// Quantization bits, 1..=8, or 16 for bit-exact.
    pub bits: u8,
    /// Tokens per chunk.
    pub chunk_tokens: u32,
    /// Layers per section (layer group).
    pub layers_per_group: u32,
    /// `hevc` only: frames per HEVC stream, 0 = one stream per section. The streams of a section
    /// decode on several NVDEC engines at once, for 1.4-2.4% larger sections; on small frames
    /// the per-stream cost ate the gain (docs/LAYOUT.md), hence the default.
    pub hevc_stream_frames: u32,
    /// `hevc` only: how codes become frames (docs/LAYOUT.md: `frames`, `rows`, `frames420`,
    /// `rows420`, `frames:N`); unset = the codec's default (`frames`).
    pub hevc_layout: Option<String>,
    /// Chunks encoded at once.
    pub workers: usize,
    /// Uids that may save; with `save_gids` both empty (the default) every client that can
    /// open the socket may save.
    pub save_uids: Vec<u32>,
    /// Primary gids that may save.
    pub save_gids: Vec<u32>,
    /// Uids that may overwrite stored chunks (a save with `replace`); with `replace_gids`
    /// both empty (the default) nobody may: stored chunks are write-once.
    pub replace_uids: Vec<u32>,
    /// Primary gids that may overwrite stored chunks.
    pub replace_gids: Vec<u32>,
}

/// Codec profiles: the per-model transforms transform-coded (`rans`) chunks are saved and
/// restored with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodecConfig {
    /// A directory of profile files (`*.kvfp`, from `kvfetcher-bench profile`), loaded at start:
    /// chunks naming one of them can be fetched, and saves of its model can use `rans`.
    pub profile_dir: Option<PathBuf>,
    /// Where profiles fetched from the store are kept (`<id hex>.kvfp`; created if missing,
    /// loaded at start), so a restarted daemon need not fetch them again. Unset: fetched
    /// profiles are kept in memory only.
    pub profile_cache_dir: Option<PathBuf>,
    /// The largest profile object accepted from the store (bytes); a larger one fails the
    /// fetch that needs it without being read. Default 256 MiB (a 70B-class model's profile is
    /// about 90 MB).
    pub max_profile_bytes: u64,
}

/// Default of [`CodecConfig::max_profile_bytes`].
pub const DEFAULT_MAX_PROFILE_BYTES: u64 = 256 << 20;

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            profile_dir: None,
            profile_cache_dir: None,
            max_profile_bytes: DEFAULT_MAX_PROFILE_BYTES,
        }
    }
}

impl SaveConfig {
    /// Frames per HEVC stream for the encoder (`None`: one stream per section).
    pub fn hevc_stream_frames(&self) -> Option<usize> {
        (self.hevc_stream_frames > 0).then_some(self.hevc_stream_frames as usize)
    }

    /// The allow-lists the local server checks saves against.
    pub fn access(&self) -> crate::server::SaveAccess {
        crate::server::SaveAccess {
            save_uids: self.save_uids.clone(),
            save_gids: self.save_gids.clone(),
            replace_uids: self.replace_uids.clone(),
            replace_gids: self.replace_gids.clone(),
        }
    }
}

fn default_server_name() -> String {
    "localhost".to_string()
}

impl StoreConfig {
    /// The store at `addr` trusted through `tls`, every other setting at its default.
    pub fn new(addr: SocketAddr, tls: PathBuf) -> StoreConfig {
        StoreConfig {
            addr,
            server_name: default_server_name(),
            tls,
            token_file: None,
            keep_alive_ms: default_keep_alive_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
        }
    }
}

fn default_keep_alive_ms() -> u64 {
    crate::transport::DEFAULT_KEEP_ALIVE.as_millis() as u64
}

fn default_idle_timeout_ms() -> u64 {
    crate::transport::DEFAULT_IDLE_TIMEOUT.as_millis() as u64
}

fn default_tls() -> PathBuf {
    PathBuf::from("/etc/kvfetcher/tls")
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: "0660".to_string(),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            log_format: LogFormat::Text,
            stores: vec![StoreConfig::new(
                SocketAddr::from(([127, 0, 0, 1], 4433)),
                default_tls(),
            )],
            fetch: FetchConfig::default(),
            save: SaveConfig::default(),
            codec: CodecConfig::default(),
            gpu: GpuConfig::default(),
            server: ServerConfig::default(),
        }
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            // Enough to cover one round trip of a few sections on a 10 Gbit/s link.
            max_inflight_sections: 16,
            max_inflight_bytes: 256 << 20,
            decode_workers: available_cores(),
            connect_timeout_ms: 3000,
            // Enough for a few Gbit/s on any host; GPU nodes on 10 Gbit/s+ links want 16
            // (packaging/kvfetcher.toml).
            connections_per_store: 4,
            restore_route: crate::pipeline::RoutePolicy::Auto,
        }
    }
}

impl Default for SaveConfig {
    fn default() -> Self {
        SaveConfig {
            // Measured (DESIGN.md section 5): zstd at 8 bits beats lossless HEVC on real KV.
            variant: "zstd".to_string(),
            target_kl: kvfetcher_codec::DEFAULT_TARGET_KL,
            bits: 8,
            chunk_tokens: 256,
            layers_per_group: 1,
            hevc_stream_frames: 0,
            hevc_layout: None,
            workers: available_cores().div_ceil(2),
            save_uids: Vec::new(),
            save_gids: Vec::new(),
            replace_uids: Vec::new(),
            replace_gids: Vec::new(),
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// The socket mode as permission bits.
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        let digits = self.socket_mode.trim_start_matches("0o");
        u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ConfigError::Invalid(format!("socket_mode {:?} is not octal", self.socket_mode))
            })
    }

    /// Checks ranges and cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        self.socket_mode_bits()?;
        if let Some(addr) = self.metrics_addr {
            if !addr.ip().is_loopback() {
                return invalid(format!("metrics_addr {addr} is not a loopback address"));
            }
        }
        if self.stores.is_empty() {
            return invalid("at least one store is needed".into());
        }
        for s in &self.stores {
            if s.keep_alive_ms == 0 || s.idle_timeout_ms <= s.keep_alive_ms {
                return invalid(format!(
                    "store {}: keep_alive_ms must be positive and below idle_timeout_ms",
                    s.addr
                ));
            }
        }
        let f = &self.fetch;
        if f.max_inflight_sections == 0
            || f.decode_workers == 0
            || f.max_inflight_bytes == 0
            || f.connect_timeout_ms == 0
        {
            return invalid("fetch limits must be positive".into());
        }
        if !(1..=MAX_CONNECTIONS_PER_STORE).contains(&f.connections_per_store) {
            return invalid(format!(
                "fetch.connections_per_store {} is not 1..={MAX_CONNECTIONS_PER_STORE}",
                f.connections_per_store
            ));
        }
        let s = &self.save;
        if !(1..=8).contains(&s.bits) && s.bits != 16 {
            return invalid(format!("save.bits {} is not 1..=8 or 16", s.bits));
        }
        if s.chunk_tokens == 0 || s.layers_per_group == 0 || s.workers == 0 {
            return invalid(
                "save.chunk_tokens, layers_per_group and workers must be positive".into(),
            );
        }
        let v = &self.server;
        if v.max_clients == 0
            || v.max_clients_per_uid == 0
            || v.max_handshakes == 0
            || v.handshake_timeout_ms == 0
            || v.max_fetches_per_client == 0
            || v.max_fetches == 0
            || v.max_queued_replies == 0
            || v.max_pending_requests == 0
        {
            return invalid("server limits must be positive".into());
        }
        if self.codec.max_profile_bytes == 0 {
            return invalid("codec.max_profile_bytes must be positive".into());
        }
        if self.gpu.nvdec_sessions > 64 {
            return invalid(format!(
                "gpu.nvdec_sessions {} is more than 64",
                self.gpu.nvdec_sessions
            ));
        }
        if !["zstd", "packed", "hevc", "rans"].contains(&s.variant.as_str()) {
            return invalid(format!(
                "save.variant {:?} is not zstd, packed, hevc or rans",
                s.variant
            ));
        }
        if !(s.target_kl.is_finite() && s.target_kl > 0.0) {
            return invalid(format!("save.target_kl {} must be positive", s.target_kl));
        }
        if let Some(l) = &s.hevc_layout {
            if let Err(e) = l.parse::<kvfetcher_codec::LayoutSpec>() {
                return invalid(format!("save.hevc_layout: {e}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.socket_mode_bits().unwrap(), 0o660);
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kvfetcher.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert!(c.metrics_addr.unwrap().ip().is_loopback());
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            "metrics_addr = \"0.0.0.0:9464\"",
            "socket_mode = \"0999\"",
            "stores = []",
            "[save]\nbits = 12",
            "[save]\nvariant = \"lz4\"",
            "[save]\nhevc_layout = \"columns\"",
            "[save]\ntarget_kl = 0",
            "[save]\ntarget_kl = -1.0",
            "[codec]\nunknown = 1",
            "[codec]\nprofile_dir = 3",
            "[codec]\nmax_profile_bytes = 0",
            "[codec]\nprofile_cache = \"/c\"",
            "[save]\nhevc_layout = \"rows:24\"",
            "[fetch]\ndecode_workers = 0",
            "unknown_key = 1",
            "[gpu]\nenabled = \"yes\"",
            "[gpu]\nnvdec_sessions = 1000",
            "[gpu]\nunknown = 1",
            "[fetch]\nconnections_per_store = 0",
            "[fetch]\nconnections_per_store = 17",
            "[fetch]\nconnections_per_store = -1",
            "[fetch]\nrestore_route = \"nvenc\"",
            "[fetch]\nrestore_route = 1",
            "[server]\nmax_queued_replies = 0",
            "[server]\nmax_fetches = 0",
            "[server]\nmax_pending_requests = 0",
            "[server]\nmax_handshakes = 0",
            "[server]\nhandshake_timeout_ms = 0",
            "[server]\nmax_clients_per_uid = 0",
            "[server]\nunknown = 1",
            "[[stores]]\naddr = \"10.0.0.2:4433\"\nkeep_alive_ms = 0",
            "[[stores]]\naddr = \"10.0.0.2:4433\"\nidle_timeout_ms = 1000",
        ] {
            assert!(Config::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn reads_transform_coding_settings() {
        let c = Config::parse(
            "[save]\nvariant = \"rans\"\ntarget_kl = 0.005\n[codec]\nprofile_dir = \"/p\"\n\
             profile_cache_dir = \"/c\"\nmax_profile_bytes = 1000\n",
        )
        .unwrap();
        assert_eq!(c.codec.profile_cache_dir, Some(PathBuf::from("/c")));
        assert_eq!(c.codec.max_profile_bytes, 1000);
        assert_eq!(c.save.variant, "rans");
        assert_eq!(c.save.target_kl, 0.005);
        assert_eq!(c.codec.profile_dir, Some(PathBuf::from("/p")));
        let d = Config::parse("").unwrap();
        assert_eq!(d.save.target_kl, kvfetcher_codec::DEFAULT_TARGET_KL);
        assert_eq!(d.codec.profile_dir, None);
        assert_eq!(d.codec.profile_cache_dir, None);
        assert_eq!(d.codec.max_profile_bytes, DEFAULT_MAX_PROFILE_BYTES);
    }

    #[test]
    fn reads_store_liveness() {
        let c = Config::parse("[[stores]]\naddr = \"10.0.0.2:4433\"\n").unwrap();
        assert_eq!(
            (c.stores[0].keep_alive_ms, c.stores[0].idle_timeout_ms),
            (1000, 3000)
        );
        let c = Config::parse(
            "[[stores]]\naddr = \"10.0.0.2:4433\"\nkeep_alive_ms = 500\nidle_timeout_ms = 2000\n",
        )
        .unwrap();
        assert_eq!(
            (c.stores[0].keep_alive_ms, c.stores[0].idle_timeout_ms),
            (500, 2000)
        );
    }

    #[test]
    fn reads_stores_and_limits() {
        let c = Config::parse(
            "socket = \"/tmp/x.sock\"\n[[stores]]\naddr = \"10.0.0.2:4433\"\nserver_name = \"s\"\n\
             [fetch]\nmax_inflight_sections = 4\n[save]\nbits = 4\nvariant = \"packed\"\n\
             hevc_layout = \"frames:64\"\n",
        )
        .unwrap();
        assert_eq!(c.stores.len(), 1);
        assert_eq!(c.stores[0].server_name, "s");
        assert_eq!(c.fetch.max_inflight_sections, 4);
        assert_eq!(c.save.bits, 4);
        assert_eq!(c.save.variant, "packed");
        assert_eq!(c.save.hevc_layout.as_deref(), Some("frames:64"));
        assert_eq!(c.gpu, GpuConfig::default());
        assert!(c.gpu.enabled);
    }

    #[test]
    fn reads_connections_per_store() {
        assert_eq!(Config::default().fetch.connections_per_store, 4);
        for n in [1, 4, MAX_CONNECTIONS_PER_STORE] {
            let c = Config::parse(&format!("[fetch]\nconnections_per_store = {n}\n")).unwrap();
            assert_eq!(c.fetch.connections_per_store, n);
        }
        let err = Config::parse("[fetch]\nconnections_per_store = 17\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid(m) if m.contains("connections_per_store")),
            "{err}"
        );
    }

    #[test]
    fn reads_restore_route() {
        use crate::pipeline::RoutePolicy;
        assert_eq!(Config::default().fetch.restore_route, RoutePolicy::Auto);
        for (name, want) in [
            ("auto", RoutePolicy::Auto),
            ("fastest", RoutePolicy::Fastest),
            ("gpu", RoutePolicy::Gpu),
            ("nvdec", RoutePolicy::Nvdec),
            ("cpu", RoutePolicy::Cpu),
        ] {
            let c = Config::parse(&format!("[fetch]\nrestore_route = \"{name}\"\n")).unwrap();
            assert_eq!(c.fetch.restore_route, want);
            assert_eq!(RoutePolicy::parse(name), Ok(want));
            assert_eq!(want.name(), name);
        }
        let err = Config::parse("[fetch]\nrestore_route = \"GPU\"\n").unwrap_err();
        assert!(err.to_string().contains("restore_route"), "{err}");
    }

    #[test]
    fn reads_server_limits() {
        let d = crate::server::ServeOptions::default();
        assert_eq!(Config::default().server.options(), d);
        let c = Config::parse(
            "[server]\nmax_clients = 8\nmax_fetches_per_client = 2\nmax_queued_replies = 16\n\
             max_pending_requests = 4\nmax_clients_per_uid = 3\nmax_handshakes = 5\n\
             handshake_timeout_ms = 250\nidle_timeout_s = 60\nmax_fetches = 9\n",
        )
        .unwrap();
        let o = c.server.options();
        assert_eq!(o.max_clients_per_uid, 3);
        assert_eq!(o.max_handshakes, 5);
        assert_eq!(o.handshake_timeout, std::time::Duration::from_millis(250));
        assert_eq!(o.idle_timeout, Some(std::time::Duration::from_secs(60)));
        assert_eq!(d.idle_timeout, None);
        assert_eq!(o.max_clients, 8);
        assert_eq!(o.max_fetches_per_client, 2);
        assert_eq!(o.max_fetches, 9);
        assert_eq!(o.max_queued_replies, 16);
        assert_eq!(o.max_pending_requests, 4);
        assert_eq!(o.max_frame, d.max_frame);
    }

    #[test]
    fn reads_gpu_settings() {
        let c = Config::parse("[gpu]\nenabled = false\nnvdec_sessions = 3\n").unwrap();
        assert!(!c.gpu.enabled);
        assert_eq!(c.gpu.nvdec_sessions, 3);
        let o = c.gpu.options();
        assert!(!o.enabled);
        assert_eq!(o.nvdec_sessions, 3);
        let c = Config::parse("[gpu]\nnvdec_sessions = 0\n").unwrap();
        assert!(c.gpu.enabled);
        assert_eq!(c.gpu.nvdec_sessions, 0);
        assert_eq!(c.gpu.host_wait, crate::gpu::HostWait::Auto);
        let c = Config::parse("[gpu]\nhost_wait = \"block\"\n").unwrap();
        assert_eq!(c.gpu.options().host_wait, crate::gpu::HostWait::Block);
        let err = Config::parse("[gpu]\nhost_wait = \"busy\"\n").unwrap_err();
        assert!(err.to_string().contains("host_wait"), "{err}");
    }
}

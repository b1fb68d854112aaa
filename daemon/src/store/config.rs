//! The store server's TOML configuration (`kvfetcher store --config FILE`), merged with the
//! command line. Parsing and validation only: nothing is opened here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::s3::S3Config;
use super::service::ServerOptions;
use crate::transport::Congestion;

/// Largest `max_connections` / `max_uploads`: far above what one host serves, and well inside
/// what a tokio semaphore counts.
const MAX_SLOTS: usize = 1 << 20;

/// Why a store configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum StoreConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("cannot parse store config: {0}")]
    Parse(#[from] toml::de::Error),
    /// Values are missing or contradict each other.
    #[error("invalid store config: {0}")]
    Invalid(String),
    /// Neither mutual TLS nor a bearer token is configured, and open access was not asked for.
    #[error(
        "the store requires client authentication: give --client-ca FILE (client_ca, mutual \
         TLS) or --token-file FILE (token_file, a bearer token); only for a trusted network, \
         --insecure-open-writes (insecure_open_writes = true) lets anyone who reaches the port \
         read, write and replace chunks"
    )]
    NoClientAuth,
}

/// Everything `kvfetcher store` needs. Every field may also come from the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// UDP address to listen on.
    pub listen: Option<SocketAddr>,
    /// Local directory backend root (the default backend).
    pub data_dir: Option<PathBuf>,
    /// S3-compatible backend instead of a local directory.
    pub s3: Option<S3Config>,
    /// Directory with `cert.pem` and `key.pem`.
    pub cert_dir: Option<PathBuf>,
    /// Server certificate chain (PEM), instead of `cert_dir`.
    pub cert: Option<PathBuf>,
    /// Server key (PEM), instead of `cert_dir`.
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) for client certificates: enables mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// File holding the bearer token clients must present.
    pub token_file: Option<PathBuf>,
    /// Largest object accepted.
    pub max_object_bytes: Option<u64>,
    /// Concurrent streams per connection.
    pub max_streams: Option<u32>,
    /// Connection idle timeout in seconds.
    pub idle_timeout_s: Option<u64>,
    /// Per-stream inactivity timeout in seconds.
    pub stream_timeout_s: Option<u64>,
    /// Send-rate limit in bytes per second.
    pub max_rate: Option<u64>,
    /// Congestion controller.
    pub congestion: Option<Congestion>,
    /// Connections served at once.
    pub max_connections: Option<usize>,
    /// Puts received at once, over all connections.
    pub max_uploads: Option<usize>,
    /// Serve without client authentication (no `client_ca`, no `token_file`): anyone who
    /// reaches the port may read, write and replace chunks. Without it such a store refuses to
    /// start.
    pub insecure_open_writes: Option<bool>,
}

impl StoreConfig {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<StoreConfig, StoreConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| StoreConfigError::Read {
            path: path.into(),
            source,
        })?;
        Ok(toml::from_str(&text)?)
    }

    /// True when clients need not authenticate: neither `client_ca` nor `token_file` is set
    /// ([`StoreConfig::server_options`] refuses that without `insecure_open_writes`).
    pub fn open_to_anyone(&self) -> bool {
        self.client_ca.is_none() && self.token_file.is_none()
    }

    /// The server options these settings give (defaults for unset fields).
    pub fn server_options(&self) -> Result<ServerOptions, StoreConfigError> {
        let d = ServerOptions::default();
        if self.open_to_anyone() && self.insecure_open_writes != Some(true) {
            return Err(StoreConfigError::NoClientAuth);
        }
        let token = match &self.token_file {
            None => None,
            Some(p) => {
                let t = std::fs::read_to_string(p).map_err(|source| StoreConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
                let t = t.trim().as_bytes().to_vec();
                if t.is_empty() {
                    return Err(StoreConfigError::Invalid(format!(
                        "{} holds an empty token",
                        p.display()
                    )));
                }
                Some(t)
            }
        };
        if self.max_streams == Some(0) {
            return Err(StoreConfigError::Invalid(
                "max_streams must be at least 1".into(),
            ));
        }
        for (name, value) in [
            ("max_connections", self.max_connections),
            ("max_uploads", self.max_uploads),
        ] {
            if let Some(v) = value.filter(|v| !(1..=MAX_SLOTS).contains(v)) {
                return Err(StoreConfigError::Invalid(format!(
                    "{name} = {v} is outside 1..={MAX_SLOTS}"
                )));
            }
        }
        if self.max_rate == Some(0) {
            return Err(StoreConfigError::Invalid(
                "max_rate must be positive".into(),
            ));
        }
        if self.data_dir.is_some() && self.s3.is_some() {
            return Err(StoreConfigError::Invalid(
                "choose data_dir or s3, not both".into(),
            ));
        }
        Ok(ServerOptions {
            max_object_bytes: self.max_object_bytes.unwrap_or(d.max_object_bytes),
            max_streams: self.max_streams.unwrap_or(d.max_streams),
            idle_timeout: self
                .idle_timeout_s
                .map_or(d.idle_timeout, Duration::from_secs),
            stream_timeout: self
                .stream_timeout_s
                .map_or(d.stream_timeout, Duration::from_secs),
            max_rate: self.max_rate,
            token,
            congestion: self.congestion.unwrap_or(d.congestion),
            large_windows: true,
            ack_every: None,
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_uploads: self.max_uploads.unwrap_or(d.max_uploads),
            auth_throttle: d.auth_throttle,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let c: StoreConfig = toml::from_str(
            "listen = \"127.0.0.1:4433\"\ndata_dir = \"/tmp/x\"\nmax_rate = 125000000\ncongestion = \"bbr\"\n\
             insecure_open_writes = true\n",
        )
        .unwrap();
        let o = c.server_options().unwrap();
        assert_eq!(o.max_rate, Some(125_000_000));
        assert_eq!(o.congestion, Congestion::Bbr);
        assert!(toml::from_str::<StoreConfig>("lisen = \"x\"").is_err());
        let caps: StoreConfig =
            toml::from_str("max_connections = 8\nmax_uploads = 2\nclient_ca = \"/ca.pem\"\n")
                .unwrap();
        let o = caps.server_options().unwrap();
        assert_eq!((o.max_connections, o.max_uploads), (8, 2));
        let zero: StoreConfig =
            toml::from_str("max_uploads = 0\ninsecure_open_writes = true\n").unwrap();
        assert!(matches!(
            zero.server_options(),
            Err(StoreConfigError::Invalid(_))
        ));
        let both: StoreConfig = toml::from_str(
            "data_dir = \"/x\"\ninsecure_open_writes = true\n[s3]\nendpoint = \"http://e\"\nbucket = \"b\"\naccess_key = \"a\"\nsecret_key = \"s\"\n",
        )
        .unwrap();
        assert!(matches!(
            both.server_options(),
            Err(StoreConfigError::Invalid(_))
        ));
    }

    /// Without a client CA or a token the store refuses to start, naming both and the flag;
    /// either one, or `insecure_open_writes = true`, lets it start.
    #[test]
    fn client_authentication_is_required_unless_open_writes_are_asked_for() {
        let none = StoreConfig::default();
        let e = none.server_options().unwrap_err();
        assert!(matches!(e, StoreConfigError::NoClientAuth));
        let m = e.to_string();
        for part in ["--client-ca", "--token-file", "--insecure-open-writes"] {
            assert!(m.contains(part), "{m}");
        }
        let off: StoreConfig = toml::from_str("insecure_open_writes = false\n").unwrap();
        assert!(matches!(
            off.server_options(),
            Err(StoreConfigError::NoClientAuth)
        ));
        let open: StoreConfig = toml::from_str("insecure_open_writes = true\n").unwrap();
        assert!(open.open_to_anyone());
        assert_eq!(open.server_options().unwrap().token, None);
        let mtls: StoreConfig = toml::from_str("client_ca = \"/etc/ca.pem\"\n").unwrap();
        assert!(!mtls.open_to_anyone());
        mtls.server_options().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let tok = StoreConfig {
            token_file: Some(token),
            ..StoreConfig::default()
        };
        assert_eq!(
            tok.server_options().unwrap().token,
            Some(b"s3cret".to_vec())
        );
    }

    /// The packaged store config parses, asks for a token and leaves writes closed.
    #[test]
    fn packaged_store_config_requires_a_token() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kvfetcher-store.toml");
        let c = StoreConfig::load(&path).unwrap();
        assert_eq!(
            c.token_file.as_deref(),
            Some(Path::new("/etc/kvfetcher/store-token"))
        );
        assert_eq!(c.insecure_open_writes, None);
        assert!(!c.open_to_anyone());
        let open = StoreConfig {
            token_file: None,
            ..c
        };
        assert!(matches!(
            open.server_options(),
            Err(StoreConfigError::NoClientAuth)
        ));
    }
}

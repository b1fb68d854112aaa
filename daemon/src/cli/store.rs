//! `kvfetcher store` (run the QUIC chunk store), `kvfetcher put` and `kvfetcher get` (move
//! chunk objects to and from one).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use kvfetcher_codec::ChunkKey;

use crate::store::{LocalDir, S3Backend, S3Config, Storage, StoreConfig, StoreServer};
use crate::transport::{write_dev_pki, Congestion, StoreClient, TlsClientConfig, TlsServerConfig};

/// Arguments of `kvfetcher store`.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Write a self-signed dev CA, server and client certificates into DIR and exit.
    #[arg(long, value_name = "DIR")]
    pub dev_cert: Option<PathBuf>,
    /// TOML configuration file; command-line options override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// UDP address to listen on.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Local directory backend.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Use the S3 backend configured by KVF_S3_ENDPOINT, KVF_S3_BUCKET, KVF_S3_ACCESS_KEY,
    /// KVF_S3_SECRET_KEY (and KVF_S3_REGION).
    #[arg(long)]
    pub s3_from_env: bool,
    /// Directory with cert.pem and key.pem.
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Server certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// CA bundle for client certificates: enables mutual TLS. The store requires client
    /// authentication: this, --token-file, or --insecure-open-writes.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// File with the bearer token clients must present (authenticates clients, as --client-ca
    /// does).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Start without client authentication (no --client-ca, no --token-file): anyone who
    /// reaches the port may read, write and replace chunks. Only for a trusted network or a
    /// test; a warning is logged at startup.
    #[arg(long)]
    pub insecure_open_writes: bool,
    /// Limit on bytes per second sent to all clients (slow-link emulation without tc: a token
    /// bucket of half a millisecond, like scripts/netns-link.sh's tbf).
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub max_rate: Option<u64>,
    /// Largest object accepted.
    #[arg(long, value_name = "BYTES")]
    pub max_object_bytes: Option<u64>,
    /// Concurrent streams per connection.
    #[arg(long)]
    pub max_streams: Option<u32>,
    /// Seconds a request stream may stay silent before it is cut off.
    #[arg(long, value_name = "SECONDS")]
    pub stream_timeout: Option<u64>,
    /// Seconds a connection may stay silent before it is closed.
    #[arg(long, value_name = "SECONDS")]
    pub idle_timeout: Option<u64>,
    /// Congestion controller.
    #[arg(long, value_enum)]
    pub congestion: Option<Congestion>,
    /// Connections served at once (default 1024); more are closed with "too many connections".
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Puts received at once over all connections (default 32); more are refused as Busy.
    #[arg(long, value_name = "N")]
    pub max_uploads: Option<usize>,
}

/// How a client command reaches a store.
#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// The store, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub store: String,
    /// A directory with ca.pem (trust that CA) or cert.pem (pin it), or a CA file; a
    /// directory's client-cert.pem and client-key.pem are used for mutual TLS.
    #[arg(long, value_name = "DIR")]
    pub ca: PathBuf,
    /// Name to check in the server certificate (default: the host of --store).
    #[arg(long)]
    pub server_name: Option<String>,
    /// File with a bearer token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// Arguments of `kvfetcher put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// Where the store is.
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Chunk object files to upload (each under the key in its header).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// Arguments of `kvfetcher get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Where the store is.
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The chunk key, 64 hex digits.
    pub key: String,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

impl StoreArgs {
    fn merged(&self) -> anyhow::Result<StoreConfig> {
        let mut c = match &self.config {
            Some(p) => StoreConfig::load(p)?,
            None => StoreConfig::default(),
        };
        macro_rules! over {
            ($($f:ident <- $v:expr),*) => { $( if let Some(v) = $v.clone() { c.$f = Some(v); } )* };
        }
        over!(listen <- self.listen, data_dir <- self.data_dir, cert_dir <- self.cert_dir, cert <- self.cert,
              key <- self.key, client_ca <- self.client_ca, token_file <- self.token_file,
              max_rate <- self.max_rate, max_object_bytes <- self.max_object_bytes,
              max_streams <- self.max_streams, stream_timeout_s <- self.stream_timeout,
              idle_timeout_s <- self.idle_timeout, congestion <- self.congestion,
              max_connections <- self.max_connections, max_uploads <- self.max_uploads);
        if self.insecure_open_writes {
            c.insecure_open_writes = Some(true);
        }
        if self.s3_from_env {
            c.s3 = Some(S3Config::from_env().context("--s3-from-env needs KVF_S3_ENDPOINT, KVF_S3_BUCKET, KVF_S3_ACCESS_KEY, KVF_S3_SECRET_KEY")?);
            c.data_dir = None;
        }
        Ok(c)
    }
}

/// Runs `kvfetcher store`.
pub(super) fn run_store(args: StoreArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.dev_cert {
        write_dev_pki(dir)?;
        println!("wrote dev certificates to {}", dir.display());
        return Ok(());
    }
    super::daemon::init_logging(crate::config::LogFormat::Text, "info");
    let cfg = args.merged()?;
    let opts = cfg.server_options()?;
    let tls = match (&cfg.cert, &cfg.key, &cfg.cert_dir) {
        (Some(c), Some(k), _) => TlsServerConfig::from_files(c, k, cfg.client_ca.as_deref())?,
        (None, None, Some(dir)) => {
            let mut t = TlsServerConfig::from_dir(dir)?;
            if let Some(ca) = &cfg.client_ca {
                t.client_ca = Some(crate::transport::load_certs(ca)?);
            }
            t
        }
        _ => bail!("give --cert-dir, or both --cert and --key (use --dev-cert DIR to make a loopback pair)"),
    };
    let listen = cfg.listen.context("give --listen ADDR")?;
    let backend: Arc<dyn Storage> = match (&cfg.s3, &cfg.data_dir) {
        (Some(s3), _) => Arc::new(S3Backend::new(s3)?),
        (None, Some(dir)) => Arc::new(LocalDir::open(dir)?),
        (None, None) => bail!("give --data-dir DIR or an S3 backend"),
    };
    runtime()?.block_on(async move {
        let server = StoreServer::bind(listen, &tls, backend, opts)?;
        if cfg.open_to_anyone() {
            tracing::warn!(
                addr = %server.local_addr(),
                "insecure_open_writes: no client authentication (no client_ca, no token_file); \
                 anyone who reaches this address may read, write and replace chunks"
            );
        }
        // Tests and scripts read this line to learn the port when listening on port 0.
        println!("listening on {}", server.local_addr());
        use std::io::Write;
        std::io::stdout().flush()?;
        server.run(shutdown_signal()).await;
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

impl RemoteArgs {
    /// Resolves the address and loads the client TLS configuration.
    pub fn resolve(&self) -> anyhow::Result<(SocketAddr, TlsClientConfig)> {
        let addr = self
            .store
            .to_socket_addrs()
            .with_context(|| format!("resolve {}", self.store))?
            .next()
            .with_context(|| format!("{} has no address", self.store))?;
        let mut tls = TlsClientConfig::from_path(&self.ca)?;
        tls.server_name = match &self.server_name {
            Some(n) => n.clone(),
            None => {
                let host = self
                    .store
                    .rsplit_once(':')
                    .map_or(self.store.as_str(), |(h, _)| h);
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            }
        };
        if let Some(p) = &self.token_file {
            tls.token = Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("read {}", p.display()))?
                    .trim()
                    .into(),
            );
        }
        Ok((addr, tls))
    }
}

/// Runs `kvfetcher put`.
pub(super) fn run_put(args: PutArgs) -> anyhow::Result<()> {
    let (addr, tls) = args.remote.resolve()?;
    runtime()?.block_on(async move {
        let client = StoreClient::connect(addr, tls).await?;
        for f in &args.files {
            let bytes = std::fs::read(f).with_context(|| format!("read {}", f.display()))?;
            let key = crate::transport::verify_object(&bytes)
                .with_context(|| format!("{}", f.display()))?
                .key;
            let created = client
                .put(bytes.into())
                .await
                .with_context(|| format!("put {}", f.display()))?;
            println!(
                "{key} {} {}",
                if created { "stored" } else { "present" },
                f.display()
            );
        }
        client.close().await;
        Ok(())
    })
}

/// Runs `kvfetcher get`.
pub(super) fn run_get(args: GetArgs) -> anyhow::Result<()> {
    let key = ChunkKey::from_hex(&args.key)?;
    let (addr, tls) = args.remote.resolve()?;
    runtime()?.block_on(async move {
        let client = StoreClient::connect(addr, tls).await?;
        let bytes = client.get(&key).await?;
        let tmp = args.out.with_extension("part");
        std::fs::write(&tmp, &bytes).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &args.out)
            .with_context(|| format!("write {}", args.out.display()))?;
        println!("{key} {} bytes -> {}", bytes.len(), args.out.display());
        client.close().await;
        Ok(())
    })
}

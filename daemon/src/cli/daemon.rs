//! `kvfetcher daemon --config FILE`: the node service. Loads the config, sets up logging,
//! binds the Unix socket (mode from the config; one daemon per path, see `socket`) and the
//! metrics endpoint, serves the local protocol with the fetch pipeline as backend, tells
//! systemd it is ready, pings the watchdog, and shuts down cleanly on SIGTERM or SIGINT.

mod notify;
mod socket;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use kvfetcher_codec::{CodecRegistry, VariantKind};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, LogFormat};
use crate::gpu::{DeviceHevcDecoder, GpuDevices};
use crate::metrics::{serve_metrics, Metrics};
use crate::pipeline::Pipeline;
use notify::Notifier;
pub use socket::SocketLock;

/// Exit status for a bad configuration (sysexits.h `EX_CONFIG`).
pub(crate) const EX_CONFIG: i32 = 78;

/// Arguments of `kvfetcher daemon`.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// TOML configuration file.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/kvfetcher/kvfetcher.toml"
    )]
    pub config: PathBuf,
    /// Overrides the config's socket path.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// A running daemon's handles, for callers that embed one (the demo, tests).
#[derive(Debug)]
pub struct Running {
    /// The bound Unix socket path.
    pub socket: PathBuf,
    /// The bound metrics address, if any.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The pipeline's metrics.
    pub metrics: Arc<Metrics>,
    /// The socket path's lock, held while this daemon serves it.
    pub lock: SocketLock,
}

/// Runs `kvfetcher daemon`.
pub(crate) fn run(args: DaemonArgs) -> anyhow::Result<()> {
    // A ConfigError exits with EX_CONFIG (`exit_code`): the unit's RestartPreventExitStatus
    // keeps systemd from retrying a configuration that cannot get better by itself.
    let mut config = Config::load(&args.config)?;
    if let Some(s) = args.socket {
        config.socket = s;
    }
    init_logging(config.log_format, "info");
    match crate::rlimit::raise_nofile() {
        Ok(l) => tracing::info!(
            soft_before = l.before,
            soft = l.soft,
            hard = l.hard,
            "open file limit (RLIMIT_NOFILE)"
        ),
        Err(e) => tracing::warn!("cannot raise the open file limit: {e}"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kvf-daemon")
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = watch::channel(false);
        let running = start(&config, stop_rx.clone()).await?;
        tracing::info!(socket = %running.socket.display(), metrics = ?running.metrics_addr, stores = config.stores.len(), "kvfetcher daemon ready");
        let notifier = Notifier::from_env().context("NOTIFY_SOCKET")?;
        notifier.notify("READY=1").context("notifying systemd")?;
        if let Some(every) = Notifier::watchdog_interval() {
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let Ok(n) = Notifier::from_env() else { return };
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => { let _ = n.notify("WATCHDOG=1"); }
                        _ = stop.changed() => return,
                    }
                }
            });
        }
        wait_for_signal().await?;
        tracing::info!("shutting down");
        let _ = notifier.notify("STOPPING=1");
        let _ = stop_tx.send(true);
        // Give open connections a moment to see the shutdown before the runtime drops them.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let _ = std::fs::remove_file(&running.socket);
        Ok(())
    })
}

/// Sets up `tracing` on stderr (journald captures it), filtered by `RUST_LOG`, else
/// `default_level`.
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The daemon's codecs: the standard registry, with HEVC sections of host fetches decoded on
/// GPU 0's NVDEC sessions when GPUs are enabled and the host has one (GPU hosts often lack
/// libde265, and NVDEC spares the CPU); else the software decoder, if any. Nothing is opened
/// until the first HEVC section.
/// Codec profiles from `codec.profile_dir` are registered too (an unreadable or malformed
/// profile stops the start with its path).
fn codec_registry(gpus: &Arc<GpuDevices>, config: &Config) -> anyhow::Result<CodecRegistry> {
    let mut reg = CodecRegistry::default();
    if let Some(dir) = &config.codec.profile_dir {
        // A profile that cannot be read is a configuration error (EX_CONFIG), not a crash.
        let profiles = load_profiles(dir)
            .map_err(|e| crate::config::ConfigError::Invalid(format!("{e:#}")))?;
        for profile in profiles {
            tracing::info!(profile = %profile.id(), model = %profile.model, "codec profile loaded");
            reg = reg.with_profile(profile);
        }
    }
    if !gpus.enabled() {
        return Ok(reg);
    }
    let nvdec = DeviceHevcDecoder::new(gpus.clone(), 0, reg.clone());
    Ok(reg.with_decoder(VariantKind::Hevc, Arc::new(nvdec)))
}

/// Every `*.kvfp` file of `dir`, checked.
fn load_profiles(dir: &std::path::Path) -> anyhow::Result<Vec<Arc<kvfetcher_codec::CodecProfile>>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("codec.profile_dir {}", dir.display()))?;
    let mut paths = Vec::new();
    for e in entries {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "kvfp") {
            paths.push(path);
        }
    }
    paths.sort();
    paths
        .iter()
        .map(|p| crate::cli::codec::load_profile(p))
        .collect()
}

/// Binds the socket and metrics endpoint and starts serving in the background until `stop`
/// turns true. Must be called inside a tokio runtime.
pub async fn start(config: &Config, stop: watch::Receiver<bool>) -> anyhow::Result<Running> {
    let metrics = Metrics::new();
    // One per daemon: each GPU is opened on the first request for it.
    let gpus = Arc::new(GpuDevices::new(config.gpu.options(), metrics.clone()));
    let pipeline = Pipeline::from_config(config, codec_registry(&gpus, config)?, metrics.clone())?;
    let (listener, lock) = socket::bind_socket(&config.socket, config.socket_mode_bits()?)?;
    let mut metrics_addr = None;
    if let Some(addr) = config.metrics_addr {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        metrics_addr = Some(l.local_addr()?);
        tokio::spawn(serve_metrics(l, metrics.clone(), stopped(stop.clone())));
    }
    let backend: Arc<dyn crate::server::Backend> = Arc::new(pipeline);
    let mut opts = config.server.options();
    opts.save_access = config.save.access();
    tokio::spawn(async move {
        if let Err(e) =
            crate::server::serve_with(listener, backend, opts, gpus, stopped(stop)).await
        {
            tracing::error!(error = %e, "local server stopped");
        }
    });
    Ok(Running {
        socket: config.socket.clone(),
        metrics_addr,
        metrics,
        lock,
    })
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfetcher_codec::{
        CodecProfile, HeadBasis, LayerProfile, ModelFingerprint, Rope, TensorProfile,
    };

    fn tiny_profile(model: &[u8]) -> CodecProfile {
        let tensor = || TensorProfile {
            heads: vec![HeadBasis::identity(vec![0.0; 4], vec![1.0; 4])],
            sensitivity: 1.0,
            curve: Vec::new(),
        };
        CodecProfile {
            model: ModelFingerprint::of_bytes(model),
            kv_heads: 1,
            head_dim: 4,
            sinks: 0,
            rope: Rope::NONE,
            layers: vec![LayerProfile {
                key: tensor(),
                value: tensor(),
            }],
        }
    }

    #[test]
    fn profile_dirs_load_every_kvfp_and_refuse_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (tiny_profile(b"a"), tiny_profile(b"b"));
        std::fs::write(dir.path().join("a.kvfp"), a.to_bytes()).unwrap();
        std::fs::write(dir.path().join("b.kvfp"), b.to_bytes()).unwrap();
        std::fs::write(dir.path().join("README"), b"not a profile").unwrap();
        let loaded = load_profiles(dir.path()).unwrap();
        let ids: Vec<_> = loaded.iter().map(|p| p.id()).collect();
        assert_eq!(ids, vec![a.id(), b.id()]);
        std::fs::write(dir.path().join("c.kvfp"), b"KVFP junk").unwrap();
        let err = load_profiles(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("c.kvfp"), "{err:#}");
        assert!(load_profiles(&dir.path().join("missing")).is_err());
    }
}

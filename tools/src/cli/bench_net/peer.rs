//! The two ends of one benchmark run, each a separate process (possibly in its own network
//! namespace): `net-serve` holds the chunk set in memory and serves it over QUIC (the real
//! store server) or as one plain TCP stream; `net-fetch` fetches all of it once and reports
//! goodput and CPU time as JSON.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::chunkset;
use super::sys::cpu_seconds;
use kvfetcher::store::{MemoryBackend, Pacer, ServerOptions, StoreServer};
use kvfetcher::transport::{
    ClientOptions, Congestion, StoreClient, TlsClientConfig, TlsServerConfig, TransportTuning,
};

/// Transport of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// The store protocol over QUIC (TLS 1.3, per-object streams, checksums verified).
    Quic,
    /// The same bytes as one plain TCP stream (no TLS, no framing, no checks).
    Tcp,
}

/// Arguments of `kvfetcher-bench net-serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Transport.
    #[arg(long, value_enum)]
    pub proto: Proto,
    /// QUIC congestion controller.
    #[arg(long, value_enum, default_value = "cubic")]
    pub congestion: Congestion,
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Directory with dev certificates (`kvfetcher store --dev-cert`).
    #[arg(long)]
    pub certs: PathBuf,
    /// The KV file the chunk set is made from.
    #[arg(long)]
    pub kv: PathBuf,
    /// Size of the chunk set in MiB.
    #[arg(long, default_value_t = 512)]
    pub set_mb: u64,
    /// Use quinn's default flow-control windows instead of the tuned ones.
    #[arg(long)]
    pub quinn_defaults: bool,
    /// Ask the peer to acknowledge every N packets (QUIC ACK frequency).
    #[arg(long)]
    pub ack_every: Option<u32>,
    /// Run on a single-threaded tokio runtime instead of one worker per core.
    #[arg(long)]
    pub current_thread: bool,
    /// Send-rate limit in bytes per second (loopback emulation).
    #[arg(long)]
    pub max_rate: Option<u64>,
    /// File created once the server listens.
    #[arg(long)]
    pub ready: PathBuf,
    /// Where to write the server's JSON report on SIGTERM.
    #[arg(long)]
    pub report: PathBuf,
}

/// Arguments of `kvfetcher-bench net-fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Transport.
    #[arg(long, value_enum)]
    pub proto: Proto,
    /// QUIC congestion controller.
    #[arg(long, value_enum, default_value = "cubic")]
    pub congestion: Congestion,
    /// The server.
    #[arg(long)]
    pub server: SocketAddr,
    /// Directory with dev certificates.
    #[arg(long)]
    pub certs: PathBuf,
    /// Use quinn's default flow-control windows instead of the tuned ones.
    #[arg(long)]
    pub quinn_defaults: bool,
    /// Ask the peer to acknowledge every N packets (QUIC ACK frequency).
    #[arg(long)]
    pub ack_every: Option<u32>,
    /// Run on a single-threaded tokio runtime instead of one worker per core.
    #[arg(long)]
    pub current_thread: bool,
    /// Objects fetched in parallel (QUIC streams), over all connections together.
    #[arg(long, default_value_t = 16)]
    pub streams: usize,
    /// QUIC connections (each its own client and UDP socket); objects are spread over them
    /// round robin. Ignored for TCP.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: u16,
    /// Wait for this file before connecting.
    #[arg(long)]
    pub ready: PathBuf,
    /// Where to write the JSON report.
    #[arg(long)]
    pub report: PathBuf,
}

/// What the server reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServeReport {
    /// CPU seconds spent serving (after the set was built).
    pub cpu_s: f64,
}

/// What the client reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchReport {
    /// Transport.
    pub proto: Proto,
    /// Object bytes received.
    pub bytes: u64,
    /// Objects received (1 for TCP).
    pub objects: u64,
    /// Connections the objects came over (1 for TCP).
    #[serde(default = "one")]
    pub connections: u16,
    /// Seconds from the first request to the last byte.
    pub seconds: f64,
    /// CPU seconds spent during the fetch.
    pub cpu_s: f64,
    /// Smoothed RTT at the end (QUIC only), milliseconds; the mean over connections.
    pub rtt_ms: Option<f64>,
    /// Packets QUIC declared lost, over all connections.
    pub lost_packets: Option<u64>,
}

fn one() -> u16 {
    1
}

/// The peer's runtime: multi-threaded like the daemon and the store, or (for comparison) one
/// thread, which saves the cross-thread wake-ups on a small machine.
fn runtime(current_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    b.enable_all().build().context("tokio runtime")
}

async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    if let Ok(mut term) = signal(SignalKind::terminate()) {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    } else {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("write {}", path.display()))
}

/// Runs `bench net-serve` until SIGTERM.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let set = chunkset::build(&args.kv, args.set_mb << 20)?;
    let rt = runtime(args.current_thread)?;
    rt.block_on(async move {
        let cpu0;
        match args.proto {
            Proto::Quic => {
                let backend = MemoryBackend::new();
                for (k, b) in &set {
                    backend.insert(*k, chunkset::bench_model(), b.clone());
                }
                let tls = TlsServerConfig::from_dir(&args.certs)?;
                let opts = ServerOptions {
                    congestion: args.congestion,
                    max_rate: args.max_rate,
                    large_windows: !args.quinn_defaults,
                    ack_every: args.ack_every,
                    ..ServerOptions::default()
                };
                let server = StoreServer::bind(args.listen, &tls, Arc::new(backend), opts)?;
                std::fs::write(&args.ready, b"")?;
                cpu0 = cpu_seconds();
                server.run(terminated()).await;
            }
            Proto::Tcp => {
                let listener = tokio::net::TcpListener::bind(args.listen).await?;
                std::fs::write(&args.ready, b"")?;
                cpu0 = cpu_seconds();
                let set = Arc::new(set);
                let pacer = args.max_rate.map(|r| Arc::new(Pacer::new(r)));
                let accept = async {
                    loop {
                        let Ok((mut sock, _)) = listener.accept().await else {
                            continue;
                        };
                        let set = set.clone();
                        let pacer = pacer.clone();
                        tokio::spawn(async move {
                            for (_, b) in set.iter() {
                                let sent = match &pacer {
                                    None => sock.write_all(b).await,
                                    Some(p) => {
                                        let mut r = Ok(());
                                        for piece in b.chunks(64 << 10) {
                                            p.acquire(piece.len()).await;
                                            r = sock.write_all(piece).await;
                                            if r.is_err() {
                                                break;
                                            }
                                        }
                                        r
                                    }
                                };
                                if sent.is_err() {
                                    return;
                                }
                            }
                            let _ = sock.shutdown().await;
                        });
                    }
                };
                tokio::select! {
                    _ = terminated() => {}
                    _ = accept => {}
                }
            }
        }
        write_json(
            &args.report,
            &ServeReport {
                cpu_s: cpu_seconds() - cpu0,
            },
        )
    })
}

/// Runs `bench net-fetch`: one fetch of the whole chunk set.
pub fn fetch(args: FetchArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !args.ready.exists() {
        anyhow::ensure!(Instant::now() < deadline, "server not ready after 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = runtime(args.current_thread)?;
    let report_path = args.report.clone();
    let report = rt.block_on(async move {
        // Spawned rather than run inside block_on: like the daemon's own tasks, the fetch then
        // runs on the runtime's workers next to quinn's drivers, not woken across threads.
        tokio::spawn(fetch_all(args)).await.context("fetch task")?
    })?;
    write_json(&report_path, &report)
}

/// The fetch itself: the whole chunk set once, timed from the first request.
async fn fetch_all(args: FetchArgs) -> anyhow::Result<FetchReport> {
    match args.proto {
        Proto::Quic => {
            let tls = TlsClientConfig::from_path(&args.certs)?;
            let tuning = TransportTuning {
                congestion: args.congestion,
                large_windows: !args.quinn_defaults,
                ack_every: args.ack_every,
                ..TransportTuning::default()
            };
            let opts = ClientOptions { tuning };
            // Connected before the clock starts, like the single connection: handshakes are
            // not part of the fetch.
            let clients = futures::future::try_join_all(
                (0..args.connections)
                    .map(|_| StoreClient::connect_with(args.server, tls.clone(), opts)),
            )
            .await?;
            let first = clients
                .first()
                .context("--connections must be at least 1")?;
            let keys = first.list(&chunkset::bench_model()).await?;
            let cpu0 = cpu_seconds();
            let t0 = Instant::now();
            // Keys by value: a closure over borrowed keys is not provably Send for tokio::spawn.
            // Round robin over the connections; `--streams` bounds the objects in flight on all
            // of them together, so one connection's numbers stay comparable.
            let mut gets = futures::stream::iter(keys.into_iter().enumerate().map(|(i, k)| {
                let c = clients[i % clients.len()].clone();
                async move { c.get(&k).await.map(|b| b.len() as u64) }
            }))
            .buffer_unordered(args.streams.max(1));
            let (mut bytes, mut objects) = (0u64, 0u64);
            while let Some(r) = gets.next().await {
                bytes += r?;
                objects += 1;
            }
            let seconds = t0.elapsed().as_secs_f64();
            let cpu_s = cpu_seconds() - cpu0;
            drop(gets);
            let n = clients.len();
            let lost: u64 = clients
                .iter()
                .map(|c| c.connection().stats().path.lost_packets)
                .sum();
            let rtt_s: f64 = clients
                .iter()
                .map(|c| c.connection().rtt().as_secs_f64())
                .sum();
            futures::future::join_all(clients.into_iter().map(StoreClient::close)).await;
            Ok::<_, anyhow::Error>(FetchReport {
                proto: Proto::Quic,
                bytes,
                objects,
                connections: n as u16,
                seconds,
                cpu_s,
                rtt_ms: Some(rtt_s / n as f64 * 1e3),
                lost_packets: Some(lost),
            })
        }
        Proto::Tcp => {
            let mut sock = tokio::net::TcpStream::connect(args.server).await?;
            // Timed from the connection, as QUIC is timed from its first request.
            let cpu0 = cpu_seconds();
            let t0 = Instant::now();
            let mut buf = vec![0u8; 1 << 20];
            let mut bytes = 0u64;
            loop {
                let n = sock.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                bytes += n as u64;
            }
            Ok(FetchReport {
                proto: Proto::Tcp,
                bytes,
                objects: 1,
                connections: 1,
                seconds: t0.elapsed().as_secs_f64(),
                cpu_s: cpu_seconds() - cpu0,
                rtt_ms: None,
                lost_packets: None,
            })
        }
    }
}

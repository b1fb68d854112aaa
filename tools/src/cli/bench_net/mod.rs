//! `kvfetcher-bench net`: goodput of one fetch of a large chunk set over emulated links, for
//! QUIC (the real store server and client, CUBIC and BBR) against a plain TCP stream, with the
//! CPU time each side spends per GB.
//!
//! Each run is two processes: `net-serve` and `net-fetch`. With `--emulation netns`
//! (root) they run in two network namespaces joined through `scripts/netns-link.sh`, which
//! shapes the rate with `tc` and adds the RTT (netem, or `delay-bridge` where the kernel
//! lacks netem). With `--emulation loopback` they run on 127.0.0.1 and the servers pace
//! themselves (`--max-rate`); loopback adds no RTT.
//!
//! `--connections N` spreads a QUIC fetch over N connections (N clients, each with its own UDP
//! socket) so it can use more than the one core quinn drives a connection on; the server's
//! `--max-rate` is shared by all of them, so the link rate stays the same.

mod bridge;
mod chunkset;
mod peer;
mod sys;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::Serialize;

pub use peer::{fetch, serve, FetchArgs, FetchReport, Proto, ServeArgs, ServeReport};

use kvfetcher::transport::Congestion;

/// How links are emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Emulation {
    /// Network namespaces shaped with tc (needs root).
    Netns,
    /// Loopback with the servers' own rate limit (no RTT).
    Loopback,
}

/// Arguments of `kvfetcher-bench net`.
#[derive(Debug, Args)]
pub struct NetArgs {
    /// Link rates in Gbit/s, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,25")]
    pub rates: Vec<f64>,
    /// Round-trip time in milliseconds.
    #[arg(long, default_value_t = 2.0)]
    pub rtt_ms: f64,
    /// Packet loss in percent.
    #[arg(long)]
    pub loss: Option<f64>,
    /// Size of the chunk set in MiB.
    #[arg(long, default_value_t = 512)]
    pub set_mb: u64,
    /// Objects fetched in parallel, over all connections together.
    #[arg(long, default_value_t = 16)]
    pub streams: usize,
    /// QUIC connections per fetch, objects spread over them round robin (one connection is
    /// driven by one task, about 4 Gbit/s of CPU). The default 1 is the configuration the
    /// recorded numbers were taken with; TCP always uses one stream.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: u16,
    /// Transports to compare: quic-cubic, quic-bbr, quic-newreno, tcp; a `-defaults` suffix on
    /// a QUIC label uses quinn's default windows (e.g. quic-cubic-defaults), `-ackN` asks for
    /// an ACK every N packets (e.g. quic-cubic-ack8), a final `-ct` runs both peers on a
    /// single-threaded runtime (e.g. quic-cubic-ack8-ct, tcp-ct).
    #[arg(long, value_delimiter = ',', default_value = "quic-cubic,quic-bbr,tcp")]
    pub protos: Vec<String>,
    /// Link emulation.
    #[arg(long, value_enum, default_value = "netns")]
    pub emulation: Emulation,
    /// The KV file the chunk set is made from.
    #[arg(long, default_value = "data/codelm-kv-a.safetensors")]
    pub kv: PathBuf,
    /// The namespace script.
    #[arg(long, default_value = "scripts/netns-link.sh")]
    pub script: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Departure window of the delay bridge in microseconds (see `delay-bridge`).
    #[arg(long)]
    pub bridge_window_us: Option<u64>,
}

/// Arguments of `kvfetcher-bench delay-bridge`.
#[derive(Debug, Args)]
pub struct BridgeArgs {
    /// First interface.
    #[arg(long)]
    pub a: String,
    /// Second interface.
    #[arg(long)]
    pub b: String,
    /// Delay each way, in microseconds.
    #[arg(long)]
    pub delay_us: u64,
    /// Frames dropped per million (random loss).
    #[arg(long, default_value_t = 0)]
    pub loss_ppm: u32,
    /// Departure window in microseconds: frames due within it leave together (fewer
    /// wake-ups); each leaves within half of it of its exact time.
    #[arg(long, default_value_t = bridge::DEFAULT_WINDOW.as_micros() as u64)]
    pub window_us: u64,
    /// On SIGTERM, write the bridge's CPU seconds and counters here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// One row of the results.
#[derive(Debug, Clone, Serialize)]
pub struct NetResult {
    /// Link rate, Gbit/s.
    pub rate_gbps: f64,
    /// Emulated RTT, ms.
    pub rtt_ms: f64,
    /// Transport label, with ` xN` when a QUIC fetch used N > 1 connections.
    pub proto: String,
    /// Connections the fetch used.
    pub connections: u16,
    /// Goodput, Gbit/s.
    pub goodput_gbps: f64,
    /// Goodput over link rate.
    pub link_fraction: f64,
    /// Client CPU seconds per GB received.
    pub client_cpu_s_per_gb: f64,
    /// Server CPU seconds per GB sent.
    pub server_cpu_s_per_gb: f64,
    /// Delay-bridge CPU seconds per GB fetched (both directions; netns without netem only).
    pub bridge_cpu_s_per_gb: Option<f64>,
    /// The client's raw report.
    pub fetch: FetchReport,
}

/// Runs `kvfetcher-bench delay-bridge`.
pub fn run_bridge(a: BridgeArgs) -> anyhow::Result<()> {
    bridge::run(
        &a.a,
        &a.b,
        Duration::from_micros(a.delay_us),
        Duration::from_micros(a.window_us),
        a.loss_ppm,
        a.report.as_deref(),
    )
}

fn parse_proto(label: &str) -> anyhow::Result<(Proto, Congestion, String)> {
    let mut base = label;
    let mut extra = String::new();
    if let Some(b) = base.strip_suffix("-ct") {
        base = b;
        extra.push_str(" --current-thread");
    }
    if let Some(b) = base.strip_suffix("-defaults") {
        base = b;
        extra.push_str(" --quinn-defaults");
    }
    if let Some((b, n)) = base.rsplit_once("-ack") {
        let n: u32 = n
            .parse()
            .with_context(|| format!("bad ack count in {label:?}"))?;
        base = b;
        extra.push_str(&format!(" --ack-every {n}"));
    }
    let (p, c) = match base {
        "quic-cubic" => (Proto::Quic, Congestion::Cubic),
        "quic-bbr" => (Proto::Quic, Congestion::Bbr),
        "quic-newreno" => (Proto::Quic, Congestion::NewReno),
        "tcp" => (Proto::Tcp, Congestion::Cubic),
        other => bail!("unknown transport {other:?} (quic-cubic, quic-bbr, quic-newreno, tcp)"),
    };
    Ok((p, c, extra))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `kvfetcher-bench net`: every transport at every rate, one table (and JSON).
pub fn run_net(args: NetArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.kv.is_file(),
        "{} not found (give --kv)",
        args.kv.display()
    );
    let work_dir = std::env::temp_dir().join(format!("kvf-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;
    let result = run_net_in(&args, &work_dir);
    let _ = std::fs::remove_dir_all(&work_dir);
    result
}

fn run_net_in(args: &NetArgs, work: &std::path::Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("own executable")?;
    let certs = work.join("certs");
    kvfetcher::transport::write_dev_pki(&certs)?;
    let kv = std::fs::canonicalize(&args.kv)?;
    let mut results = Vec::new();
    println!(
        "{:>9} {:>6} {:<16} {:>10} {:>7} {:>13} {:>13} {:>13} {:>8} {:>7}",
        "link",
        "rtt",
        "transport",
        "goodput",
        "of link",
        "client s/GB",
        "server s/GB",
        "bridge s/GB",
        "rtt seen",
        "lost"
    );
    for (ri, &rate) in args.rates.iter().enumerate() {
        for (pi, label) in args.protos.iter().enumerate() {
            let (proto, cc, extra) = parse_proto(label)?;
            let connections = match proto {
                Proto::Quic => args.connections,
                Proto::Tcp => 1,
            };
            let shown = if connections > 1 {
                format!("{label} x{connections}")
            } else {
                label.clone()
            };
            let tag = format!("{ri}-{pi}");
            let ready = work.join(format!("ready-{tag}"));
            let srv_report = work.join(format!("serve-{tag}.json"));
            let cli_report = work.join(format!("fetch-{tag}.json"));
            let bridge_report = work.join(format!("bridge-{tag}.json"));
            let port = 4433 + (ri * 10 + pi) as u16;
            let proto_arg = match proto {
                Proto::Quic => "quic",
                Proto::Tcp => "tcp",
            };
            let cc_arg = match cc {
                Congestion::Cubic => "cubic",
                Congestion::Bbr => "bbr",
                Congestion::NewReno => "new-reno",
            };
            let host = match args.emulation {
                Emulation::Netns => "10.77.0.1",
                Emulation::Loopback => "127.0.0.1",
            };
            let q = |p: &std::path::Path| shell_quote(&p.display().to_string());
            let mut serve = format!(
                "{} net-serve --proto {proto_arg} --congestion {cc_arg} --listen {host}:{port} --certs {} --kv {} --set-mb {} --ready {} --report {}{extra}",
                q(&exe), q(&certs), q(&kv), args.set_mb, q(&ready), q(&srv_report)
            );
            let fetch = format!(
                "{} net-fetch --proto {proto_arg} --congestion {cc_arg} --server {host}:{port} --certs {} --streams {} --connections {connections} --ready {} --report {}{extra}",
                q(&exe), q(&certs), args.streams, q(&ready), q(&cli_report)
            );
            let status = match args.emulation {
                Emulation::Netns => {
                    let mut cmd = Command::new("bash");
                    cmd.arg(&args.script)
                        .args(["--rate", &format!("{}mbit", (rate * 1000.0).round() as u64)])
                        .args([
                            "--rtt",
                            &format!("{}us", (args.rtt_ms * 1000.0).round() as u64),
                        ])
                        .args([
                            "--delay-bridge",
                            &format!(
                                "{} delay-bridge --report {}{}",
                                q(&exe),
                                q(&bridge_report),
                                args.bridge_window_us
                                    .map_or(String::new(), |w| format!(" --window-us {w}"))
                            ),
                        ])
                        .args(["--server", &serve, "--client", &fetch]);
                    if let Some(l) = args.loss {
                        cmd.args(["--loss", &format!("{l}%")]);
                    }
                    cmd.status().context("run the netns script")?
                }
                Emulation::Loopback => {
                    serve.push_str(&format!(" --max-rate {}", (rate * 1e9 / 8.0) as u64));
                    let mut server = Command::new("bash")
                        .args(["-c", &format!("exec {serve}")])
                        .spawn()?;
                    let st = Command::new("bash").args(["-c", &fetch]).status()?;
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(server.id() as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    )?;
                    server.wait()?;
                    st
                }
            };
            if !status.success() {
                bail!("{shown} at {rate} Gbit/s failed ({status})");
            }
            let fetch: FetchReport = serde_json::from_slice(&std::fs::read(&cli_report)?)?;
            let serve: ServeReport = serde_json::from_slice(&std::fs::read(&srv_report)?)?;
            let gb = fetch.bytes as f64 / 1e9;
            // Only present when the script used the delay bridge (no netem).
            let bridge_cpu = std::fs::read(&bridge_report)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("cpu_s").and_then(|c| c.as_f64()));
            let goodput = fetch.bytes as f64 * 8.0 / fetch.seconds / 1e9;
            let r = NetResult {
                rate_gbps: rate,
                rtt_ms: args.rtt_ms,
                proto: shown.clone(),
                connections,
                goodput_gbps: goodput,
                link_fraction: goodput / rate,
                client_cpu_s_per_gb: fetch.cpu_s / gb,
                server_cpu_s_per_gb: serve.cpu_s / gb,
                bridge_cpu_s_per_gb: bridge_cpu.map(|c| c / gb),
                fetch,
            };
            println!(
                "{:>6} Gb {:>4}ms {:<16} {:>6.3} Gb {:>6.1}% {:>13.3} {:>13.3} {:>13} {:>8} {:>7}",
                rate,
                args.rtt_ms,
                shown,
                r.goodput_gbps,
                r.link_fraction * 100.0,
                r.client_cpu_s_per_gb,
                r.server_cpu_s_per_gb,
                r.bridge_cpu_s_per_gb
                    .map_or("-".into(), |v| format!("{v:.3}")),
                r.fetch.rtt_ms.map_or("-".into(), |v| format!("{v:.2}ms")),
                r.fetch.lost_packets.map_or("-".into(), |v| v.to_string()),
            );
            results.push(r);
        }
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}

//! Prometheus metrics: counters, gauges and histograms kept in atomics, rendered in the text
//! exposition format, and served by a minimal HTTP endpoint on a loopback address.
//!
//! This is not a general metrics library: it holds exactly the daemon's metrics, so the rest of
//! the code updates named fields and never looks a metric up by string.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds (seconds) of the latency histograms' buckets: 1 ms to 30 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (queue depths, busy sessions).
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds `n` (negative to subtract).
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the value.
    pub fn set(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Adds one now and subtracts it when the guard drops, so early returns cannot leak.
    pub fn track(&self) -> GaugeGuard<'_> {
        self.track_n(1)
    }

    /// Adds `n` now and subtracts it when the guard drops.
    pub fn track_n(&self, n: i64) -> GaugeGuard<'_> {
        self.add(n);
        GaugeGuard(self, n)
    }
}

/// Holds one unit of a [`Gauge`] until dropped.
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a Gauge, i64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.add(-self.1);
    }
}

/// A latency histogram over [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (b, le) in self.buckets.iter().zip(LATENCY_BUCKETS) {
            if secs <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, le) in self.buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Every metric the daemon exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Whole-fetch latency.
    pub fetch_seconds: Histogram,
    /// Latency from fetch start until the first layer is ready.
    pub first_layer_seconds: Histogram,
    /// Whole-save latency (copy, quantize, encode, upload).
    pub save_seconds: Histogram,
    /// Lookups answered.
    pub lookups: Counter,
    /// Requests that failed.
    pub errors: Counter,
    /// Stored objects found damaged or not the chunk asked for (by fetches).
    pub corrupt_objects: Counter,
    /// Compressed bytes received from stores.
    pub bytes_in: Counter,
    /// Compressed bytes uploaded to stores.
    pub bytes_out: Counter,
    /// Bytes of KV written into clients' buffers by fetches.
    pub bytes_restored: Counter,
    /// Sections decoded and restored by fetches (any route).
    pub sections_restored: Counter,
    /// Bytes of KV that clients handed over for saving.
    pub bytes_saved_raw: Counter,
    /// Fetches in progress.
    pub fetches_active: Gauge,
    /// Sections a fetch is waiting for, receiving or decoding (fetch queue depth).
    pub sections_in_flight: Gauge,
    /// Chunks waiting for or in the save encoder pool (save queue depth).
    pub save_queue: Gauge,
    /// Decoder sessions decoding right now.
    pub decoders_busy: Gauge,
    /// Bytes of GPU fetch buffers alive (allocated and not yet freed), all devices.
    pub gpu_buffer_bytes: Gauge,
    /// Sections restored into GPU buffers, per route.
    pub gpu_sections: GpuSectionCounters,
    /// Local connections refused or cut off by the server's limits, per reason.
    pub local_refusals: LocalRefusalCounters,
    /// Replies queued for local clients and not yet written to their sockets, all connections.
    pub local_queued_replies: Gauge,
    /// Failed `accept` calls of the local socket (out of fds or memory, mostly).
    pub local_accept_errors: Counter,
}

/// Local connections the server refused or closed because of a limit (see `server`), by reason.
#[derive(Debug, Default)]
pub struct LocalRefusalCounters {
    /// The client did not read its replies: its queue of unsent replies reached its bound.
    pub queue_full: Counter,
    /// The client had too many requests in progress at once.
    pub too_many_requests: Counter,
    /// No handshake within the handshake timeout.
    pub handshake_timeout: Counter,
    /// A pending handshake was dropped to make room for a newer one (handshake cap).
    pub handshake_evicted: Counter,
    /// Connected clients at the daemon's limit: answered `busy`.
    pub max_clients: Counter,
    /// Connected clients of this uid at their limit: answered `busy`.
    pub max_clients_per_uid: Counter,
    /// No request and nothing in progress for the idle timeout.
    pub idle: Counter,
    /// Fetches refused because the daemon holds `max_fetches` (the connection stays).
    pub max_fetches: Counter,
}

impl LocalRefusalCounters {
    /// Every counter with its `reason` label.
    fn labelled(&self) -> [(&'static str, &Counter); 8] {
        [
            ("queue_full", &self.queue_full),
            ("too_many_requests", &self.too_many_requests),
            ("handshake_timeout", &self.handshake_timeout),
            ("handshake_evicted", &self.handshake_evicted),
            ("max_clients", &self.max_clients),
            ("max_clients_per_uid", &self.max_clients_per_uid),
            ("idle", &self.idle),
            ("max_fetches", &self.max_fetches),
        ]
    }
}

/// Sections restored into GPU memory, by the route they took (see `gpu::section_restore`).
#[derive(Debug, Default)]
pub struct GpuSectionCounters {
    /// Packed payload unpacked and dequantized by one kernel (no decoder).
    pub packed: Counter,
    /// HEVC decoded by NVDEC into device surfaces, restored from there.
    pub nvdec: Counter,
    /// Decoded on the CPU, codes uploaded, dequantized by the kernel.
    pub cpu_decode: Counter,
    /// Transform-coded: rANS-decoded and inverse-transformed by the kernels.
    pub rans: Counter,
    /// Decoded and restored on the CPU, the placed bytes copied to the device (exact mode,
    /// dtype conversions the kernel cannot match bit for bit).
    pub cpu_restore: Counter,
}

impl Metrics {
    /// A fresh set of zeroed metrics.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// The metrics in Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.fetch_seconds.render(
            &mut out,
            "kvfetcher_fetch_duration_seconds",
            "Fetch latency.",
        );
        self.first_layer_seconds.render(
            &mut out,
            "kvfetcher_fetch_first_layer_seconds",
            "Time from fetch start to the first ready layer.",
        );
        self.save_seconds
            .render(&mut out, "kvfetcher_save_duration_seconds", "Save latency.");
        let counters = [
            (
                "kvfetcher_lookups_total",
                "Lookups answered.",
                &self.lookups,
            ),
            ("kvfetcher_errors_total", "Failed requests.", &self.errors),
            (
                "kvfetcher_corrupt_objects_total",
                "Stored objects found damaged or not the chunk asked for.",
                &self.corrupt_objects,
            ),
            (
                "kvfetcher_bytes_in_total",
                "Compressed bytes received from stores.",
                &self.bytes_in,
            ),
            (
                "kvfetcher_bytes_out_total",
                "Compressed bytes uploaded to stores.",
                &self.bytes_out,
            ),
            (
                "kvfetcher_bytes_restored_total",
                "KV bytes written into client buffers.",
                &self.bytes_restored,
            ),
            (
                "kvfetcher_sections_restored_total",
                "Sections decoded and restored by fetches.",
                &self.sections_restored,
            ),
            (
                "kvfetcher_local_accept_errors_total",
                "Failed accepts of the local socket (out of fds or memory).",
                &self.local_accept_errors,
            ),
            (
                "kvfetcher_bytes_saved_raw_total",
                "KV bytes handed over by clients for saving.",
                &self.bytes_saved_raw,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        let gauges = [
            (
                "kvfetcher_fetches_active",
                "Fetches in progress.",
                &self.fetches_active,
            ),
            (
                "kvfetcher_fetch_queue_depth",
                "Sections waited for, in transfer or being restored.",
                &self.sections_in_flight,
            ),
            (
                "kvfetcher_save_queue_depth",
                "Chunks queued for encoding.",
                &self.save_queue,
            ),
            (
                "kvfetcher_decoder_sessions_busy",
                "Decoder sessions busy.",
                &self.decoders_busy,
            ),
            (
                "kvfetcher_gpu_buffer_bytes",
                "Bytes of GPU fetch buffers alive.",
                &self.gpu_buffer_bytes,
            ),
            (
                "kvfetcher_local_queued_replies",
                "Replies queued for local clients, not yet written.",
                &self.local_queued_replies,
            ),
        ];
        for (name, help, g) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                g.get()
            );
        }
        let name = "kvfetcher_gpu_sections_total";
        let _ = writeln!(
            out,
            "# HELP {name} Sections restored into GPU memory, per route.\n# TYPE {name} counter"
        );
        let g = &self.gpu_sections;
        for (route, c) in [
            ("packed", &g.packed),
            ("nvdec", &g.nvdec),
            ("cpu-decode", &g.cpu_decode),
            ("rans", &g.rans),
            ("cpu-restore", &g.cpu_restore),
        ] {
            let _ = writeln!(out, "{name}{{route=\"{route}\"}} {}", c.get());
        }
        let name = "kvfetcher_local_refusals_total";
        let _ = writeln!(
            out,
            "# HELP {name} Local connections refused or closed by a limit, per reason.\n# TYPE {name} counter"
        );
        for (reason, c) in self.local_refusals.labelled() {
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {}", c.get());
        }
        let name = "kvfetcher_compression_ratio";
        let _ = writeln!(
            out,
            "# HELP {name} KV bytes restored per compressed byte received.\n# TYPE {name} gauge\n{name} {}",
            self.compression_ratio()
        );
        out
    }

    /// KV bytes restored per compressed byte received so far (0 before the first fetch).
    pub fn compression_ratio(&self) -> f64 {
        match self.bytes_in.get() {
            0 => 0.0,
            n => self.bytes_restored.get() as f64 / n as f64,
        }
    }
}

/// Serves `GET /metrics` (any path, in fact) on `listener` until `shutdown` resolves.
///
/// One request per connection; the body is [`Metrics::render`]. Errors on one connection are
/// logged and do not stop the endpoint.
pub(crate) async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head; a slow or silent client gets two seconds.
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while n < buf.len() {
                    match stream.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let body = metrics.render();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if let Err(e) = async {
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(body.as_bytes()).await?;
                stream.shutdown().await
            }
            .await
            {
                tracing::debug!(%peer, error = %e, "metrics response failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.fetch_seconds.observe(Duration::from_millis(3));
        m.fetch_seconds.observe(Duration::from_millis(700));
        let text = m.render();
        assert!(text.contains("kvfetcher_fetch_duration_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("kvfetcher_fetch_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("kvfetcher_fetch_duration_seconds_bucket{le=\"1\"} 2"));
        assert!(text.contains("kvfetcher_fetch_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("kvfetcher_fetch_duration_seconds_count 2"));
        assert!(text.contains("kvfetcher_fetch_duration_seconds_sum 0.703"));
    }

    #[test]
    fn gauge_guard_releases_and_ratio_follows_bytes() {
        let m = Metrics::default();
        {
            let _g = m.decoders_busy.track();
            assert_eq!(m.decoders_busy.get(), 1);
        }
        assert_eq!(m.decoders_busy.get(), 0);
        assert_eq!(m.compression_ratio(), 0.0);
        m.bytes_in.add(100);
        m.bytes_restored.add(250);
        assert!(m.render().contains("kvfetcher_compression_ratio 2.5"));
        m.gpu_sections.nvdec.add(3);
        m.gpu_buffer_bytes.add(4096);
        let text = m.render();
        assert!(text.contains("kvfetcher_gpu_sections_total{route=\"nvdec\"} 3"));
        assert!(text.contains("kvfetcher_gpu_sections_total{route=\"cpu-decode\"} 0"));
        assert!(text.contains("kvfetcher_gpu_buffer_bytes 4096"));
        m.local_refusals.queue_full.add(2);
        let text = m.render();
        assert!(text.contains("kvfetcher_local_refusals_total{reason=\"queue_full\"} 2"));
        assert!(text.contains("kvfetcher_local_refusals_total{reason=\"idle\"} 0"));
        m.corrupt_objects.add(1);
        assert!(m.render().contains("kvfetcher_corrupt_objects_total 1"));
    }

    #[tokio::test]
    async fn endpoint_answers_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::new();
        m.lookups.add(7);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics(listener, m, async {
            let _ = rx.await;
        }));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(resp.contains("kvfetcher_lookups_total 7"));
        tx.send(()).unwrap();
        server.await.unwrap();
    }
}

//! Which decoder restores a section into device memory: the GPU kernels, NVDEC or the CPU
//! (sans-IO: the caller reports arrivals and restores, with their times, and asks for choices).
//!
//! The fetch's engine co-runs with it on the same GPU, so SMs are the scarce resource: under
//! `auto`, a section goes to a decoder that uses no SMs (NVDEC, then the CPU) when that decoder
//! is idle and fast enough to keep up with the link for this section's ratio; else to the
//! fastest. "Fast enough" compares the decoder's measured KV output rate on one decode worker
//! with what the link delivers (its measured rate times the section's ratio of KV bytes to wire
//! bytes), with a margin: one worker, not all of them, because the last section's restore is
//! added to time to first token, so a decoder must restore a section in less time than the
//! link takes to deliver it.
//! Rates start from conservative priors and follow measurements (the first one replaces the
//! prior). A backlog of received sections waiting for a worker means decoding is the
//! bottleneck, and then the fastest decoder is chosen whatever the link.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvfetcher_codec::VariantKind;
use serde::Deserialize;

/// A decoder a section can be restored by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decoder {
    /// The GPU kernels: rANS decode and inverse transform, or unpacking (uses SMs).
    Gpu,
    /// NVDEC decodes an HEVC section; a small kernel reads the codes out (no SMs for decoding).
    Nvdec,
    /// The CPU decodes; the GPU at most dequantizes (the cheapest kernel), or the CPU restores
    /// and the bytes are copied.
    Cpu,
}

impl Decoder {
    /// The name used in configuration, metrics and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            Decoder::Gpu => "gpu",
            Decoder::Nvdec => "nvdec",
            Decoder::Cpu => "cpu",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether this decoder leaves the SMs to the engine.
    fn sm_free(self) -> bool {
        self != Decoder::Gpu
    }
}

/// How the fetch picks a section's decoder (`[fetch] restore_route`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutePolicy {
    /// An SM-free decoder when it is idle and keeps up with the link, else the fastest.
    #[default]
    Auto,
    /// The decoder with the shortest expected restore time.
    Fastest,
    /// The GPU kernels wherever the section allows them, else as `auto`.
    Gpu,
    /// NVDEC for HEVC sections, else as `auto`.
    Nvdec,
    /// The CPU for every section.
    Cpu,
}

impl RoutePolicy {
    /// Parses a configuration or command-line name.
    pub fn parse(s: &str) -> Result<RoutePolicy, String> {
        match s {
            "auto" => Ok(RoutePolicy::Auto),
            "fastest" => Ok(RoutePolicy::Fastest),
            "gpu" => Ok(RoutePolicy::Gpu),
            "nvdec" => Ok(RoutePolicy::Nvdec),
            "cpu" => Ok(RoutePolicy::Cpu),
            _ => Err(format!(
                "restore route must be auto, fastest, gpu, nvdec or cpu, not {s:?}"
            )),
        }
    }

    /// The policy's name.
    pub fn name(self) -> &'static str {
        match self {
            RoutePolicy::Auto => "auto",
            RoutePolicy::Fastest => "fastest",
            RoutePolicy::Gpu => "gpu",
            RoutePolicy::Nvdec => "nvdec",
            RoutePolicy::Cpu => "cpu",
        }
    }
}

/// One section to route: the decoders that can restore it and its sizes.
#[derive(Debug, Clone, Copy)]
pub struct SectionCost {
    /// The chunk's variant.
    pub variant: VariantKind,
    /// Decoders able to restore it, at most one of each.
    pub candidates: Candidates,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Bytes of KV it restores.
    pub kv_bytes: u64,
}

/// A set of decoders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Candidates(u8);

impl Candidates {
    /// The set of `ds`.
    pub fn of(ds: &[Decoder]) -> Candidates {
        Candidates(ds.iter().fold(0, |m, d| m | 1 << d.index()))
    }

    /// Whether `d` is in the set.
    pub fn contains(self, d: Decoder) -> bool {
        self.0 & 1 << d.index() != 0
    }

    fn iter(self) -> impl Iterator<Item = Decoder> {
        [Decoder::Gpu, Decoder::Nvdec, Decoder::Cpu]
            .into_iter()
            .filter(move |&d| self.contains(d))
    }
}

/// Why a decoder was chosen (logged at debug level, counted by the benchmark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The only decoder that can restore the section.
    Only,
    /// The policy names it.
    Forced,
    /// SM-free, idle, and fast enough for the link.
    KeepsUp,
    /// The shortest expected restore time.
    Fastest,
}

/// A routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// The decoder.
    pub decoder: Decoder,
    /// Why.
    pub reason: Reason,
}

/// How much faster than the link's delivery an SM-free decoder must be to be chosen.
const MARGIN: f64 = 1.5;
/// Weight of a new measurement in a decoder's rate.
const EWMA: f64 = 0.25;
/// Link busy time kept in the link's rate estimate; older time decays away.
const LINK_WINDOW: Duration = Duration::from_secs(2);
const VARIANTS: usize = 4;
const DECODERS: usize = 3;

fn variant_index(v: VariantKind) -> usize {
    match v {
        VariantKind::Packed => 0,
        VariantKind::Zstd => 1,
        VariantKind::Hevc => 2,
        VariantKind::Rans => 3,
    }
}

/// KV bytes restored per second on one decode worker, before any measurement. Deliberately
/// low for the SM-free decoders, so an unmeasured one is not trusted with a fast link; the
/// first measurement replaces the prior.
fn prior(d: Decoder, v: VariantKind) -> f64 {
    match (d, v) {
        (Decoder::Gpu, _) => 8e9,
        (Decoder::Nvdec, _) => 1e9,
        (Decoder::Cpu, VariantKind::Packed) => 1e9,
        (Decoder::Cpu, VariantKind::Zstd) => 5e8,
        // Entropy decode, inverse transform and RoPE on one core (about 60 MB/s on H200 hosts).
        (Decoder::Cpu, VariantKind::Rans) => 5e7,
        (Decoder::Cpu, _) => 1.5e8,
    }
}

/// The router's measurements and load, shared by all fetches of a daemon.
#[derive(Debug)]
struct State {
    /// Per decoder and variant: (KV bytes per second per worker, measured at least once).
    rates: [[(f64, bool); VARIANTS]; DECODERS],
    /// Sections each decoder is restoring now.
    busy: [usize; DECODERS],
    /// Sections received and waiting for a decode worker.
    backlog: usize,
    link: LinkMeter,
}

/// The link's delivery rate: wire bytes over the time at least one request was outstanding
/// (so idle time between fetches, or waiting on back-pressure, does not count).
#[derive(Debug, Default)]
struct LinkMeter {
    outstanding: usize,
    busy_since: Option<Instant>,
    /// Busy time and bytes received in it, decayed beyond [`LINK_WINDOW`].
    busy: Duration,
    bytes: f64,
}

impl LinkMeter {
    fn begin(&mut self, now: Instant) {
        if self.outstanding == 0 {
            self.busy_since = Some(now);
        }
        self.outstanding += 1;
    }

    fn end(&mut self, bytes: u64, now: Instant) {
        self.bytes += bytes as f64;
        self.outstanding = self.outstanding.saturating_sub(1);
        self.close_busy(now);
        if self.outstanding > 0 {
            self.busy_since = Some(now);
        }
        while self.busy > LINK_WINDOW {
            // Keep the recent half: halve both, so the rate is unchanged but new arrivals weigh more.
            self.busy /= 2;
            self.bytes /= 2.0;
        }
    }

    fn close_busy(&mut self, now: Instant) {
        if let Some(since) = self.busy_since.take() {
            self.busy += now.saturating_duration_since(since);
        }
    }

    /// Bytes per second, once enough has been seen.
    fn rate(&self) -> Option<f64> {
        let secs = self.busy.as_secs_f64();
        (secs >= 1e-3 && self.bytes > 0.0).then(|| self.bytes / secs)
    }
}

/// Picks each section's decoder; see the module docs.
#[derive(Debug)]
pub struct Router {
    policy: RoutePolicy,
    /// Decode workers (the lanes the CPU and GPU routes run on).
    workers: usize,
    state: Mutex<State>,
}

impl Router {
    /// A router for `policy` over `workers` decode workers.
    pub fn new(policy: RoutePolicy, workers: usize) -> Router {
        let mut rates = [[(0.0, false); VARIANTS]; DECODERS];
        for d in [Decoder::Gpu, Decoder::Nvdec, Decoder::Cpu] {
            for v in [
                VariantKind::Packed,
                VariantKind::Zstd,
                VariantKind::Hevc,
                VariantKind::Rans,
            ] {
                rates[d.index()][variant_index(v)] = (prior(d, v), false);
            }
        }
        Router {
            policy,
            workers: workers.max(1),
            state: Mutex::new(State {
                rates,
                busy: [0; DECODERS],
                backlog: 0,
                link: LinkMeter::default(),
            }),
        }
    }

    /// The policy.
    pub fn policy(&self) -> RoutePolicy {
        self.policy
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A section was requested from the store at `now`.
    pub fn link_begin(&self, now: Instant) {
        self.state().link.begin(now);
    }

    /// A requested section of `bytes` arrived at `now` (or its request failed: `bytes` 0).
    pub fn link_end(&self, bytes: u64, now: Instant) {
        self.state().link.end(bytes, now);
    }

    /// The link's measured delivery rate in bytes per second, if known.
    pub fn link_rate(&self) -> Option<f64> {
        self.state().link.rate()
    }

    /// A received section joined the decode queue.
    pub fn queued(&self) {
        self.state().backlog += 1;
    }

    /// A decode worker took a queued section.
    pub fn dequeued(&self) {
        let mut s = self.state();
        s.backlog = s.backlog.saturating_sub(1);
    }

    /// Chooses the decoder for `section`, with `nvdec_sessions` NVDEC sessions on the device,
    /// and counts it busy until [`Router::done`].
    pub fn choose(&self, section: &SectionCost, nvdec_sessions: usize) -> Option<Choice> {
        let mut s = self.state();
        let choice = self.pick(&s, section, nvdec_sessions)?;
        s.busy[choice.decoder.index()] += 1;
        Some(choice)
    }

    /// A section routed to `chosen` finished on `used` (the decoder that did the work: NVDEC
    /// may fall back to the CPU), restoring `kv_bytes` in `took` (`None`: it failed).
    pub fn done(
        &self,
        chosen: Decoder,
        used: Decoder,
        variant: VariantKind,
        kv_bytes: u64,
        took: Option<Duration>,
    ) {
        let mut s = self.state();
        s.busy[chosen.index()] = s.busy[chosen.index()].saturating_sub(1);
        let Some(took) = took else { return };
        let secs = took.as_secs_f64();
        if secs <= 0.0 || kv_bytes == 0 {
            return;
        }
        let r = &mut s.rates[used.index()][variant_index(variant)];
        let measured = kv_bytes as f64 / secs;
        *r = match r.1 {
            false => (measured, true),
            true => (r.0 + EWMA * (measured - r.0), true),
        };
    }

    /// The measured (or prior) KV bytes per second of one worker on `d` for `v`.
    pub fn rate(&self, d: Decoder, v: VariantKind) -> f64 {
        self.state().rates[d.index()][variant_index(v)].0
    }

    fn pick(&self, s: &State, c: &SectionCost, nvdec_sessions: usize) -> Option<Choice> {
        let mut all = c.candidates.iter();
        let first = all.next()?;
        if all.next().is_none() {
            return Some(Choice {
                decoder: first,
                reason: Reason::Only,
            });
        }
        let forced = match self.policy {
            RoutePolicy::Gpu => Some(Decoder::Gpu),
            RoutePolicy::Nvdec => Some(Decoder::Nvdec),
            RoutePolicy::Cpu => Some(Decoder::Cpu),
            RoutePolicy::Auto | RoutePolicy::Fastest => None,
        };
        if let Some(d) = forced.filter(|&d| c.candidates.contains(d)) {
            return Some(Choice {
                decoder: d,
                reason: Reason::Forced,
            });
        }
        let lanes = |d: Decoder| match d {
            Decoder::Nvdec => nvdec_sessions.clamp(1, self.workers),
            Decoder::Gpu | Decoder::Cpu => self.workers,
        };
        let rate = |d: Decoder| s.rates[d.index()][variant_index(c.variant)].0;
        if self.policy != RoutePolicy::Fastest && s.backlog <= self.workers {
            if let Some(link) = s.link.rate() {
                let ratio = c.kv_bytes as f64 / c.wire_bytes.max(1) as f64;
                let demand = link * ratio * MARGIN;
                // NVDEC before the CPU: it leaves the host's cores to the engine too.
                for d in [Decoder::Nvdec, Decoder::Cpu] {
                    let idle = s.busy[d.index()] < lanes(d);
                    if c.candidates.contains(d) && d.sm_free() && idle && rate(d) >= demand {
                        return Some(Choice {
                            decoder: d,
                            reason: Reason::KeepsUp,
                        });
                    }
                }
            }
        }
        c.candidates
            .iter()
            .max_by(|&a, &b| rate(a).total_cmp(&rate(b)))
            .map(|decoder| Choice {
                decoder,
                reason: Reason::Fastest,
            })
    }
}

/// One request's use of the link: begun when the request is sent, ended when its bytes have
/// arrived; dropped unended (a failed or cancelled request), it ends with no bytes.
#[derive(Debug)]
pub(crate) struct LinkUse {
    router: Arc<Router>,
    ended: bool,
}

impl LinkUse {
    /// A request sent now.
    pub(crate) fn begin(router: &Arc<Router>) -> LinkUse {
        router.link_begin(Instant::now());
        LinkUse {
            router: router.clone(),
            ended: false,
        }
    }

    /// Its `bytes` have arrived.
    pub(crate) fn end(mut self, bytes: u64) {
        self.ended = true;
        self.router.link_end(bytes, Instant::now());
    }
}

impl Drop for LinkUse {
    fn drop(&mut self) {
        if !self.ended {
            self.router.link_end(0, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rans(wire: u64, kv: u64) -> SectionCost {
        SectionCost {
            variant: VariantKind::Rans,
            candidates: Candidates::of(&[Decoder::Gpu, Decoder::Cpu]),
            wire_bytes: wire,
            kv_bytes: kv,
        }
    }

    /// Feeds the link `bytes` over `ms` milliseconds of busy time.
    fn link(r: &Router, bytes: u64, ms: u64) {
        let t0 = Instant::now();
        r.link_begin(t0);
        r.link_end(bytes, t0 + Duration::from_millis(ms));
    }

    #[test]
    fn a_single_candidate_is_taken_whatever_the_policy() {
        let r = Router::new(RoutePolicy::Gpu, 4);
        let c = SectionCost {
            variant: VariantKind::Zstd,
            candidates: Candidates::of(&[Decoder::Cpu]),
            wire_bytes: 1,
            kv_bytes: 4,
        };
        let got = r.choose(&c, 0).unwrap();
        assert_eq!((got.decoder, got.reason), (Decoder::Cpu, Reason::Only));
        assert!(r
            .choose(
                &SectionCost {
                    candidates: Candidates::default(),
                    ..c
                },
                0
            )
            .is_none());
    }

    #[test]
    fn without_a_link_measurement_auto_takes_the_fastest() {
        let r = Router::new(RoutePolicy::Auto, 4);
        let got = r.choose(&rans(1 << 20, 4 << 20), 0).unwrap();
        assert_eq!((got.decoder, got.reason), (Decoder::Gpu, Reason::Fastest));
    }

    #[test]
    fn a_slow_link_leaves_the_sms_to_the_engine() {
        let r = Router::new(RoutePolicy::Auto, 4);
        // 5 MB/s of wire, 4x ratio: 20 MB/s of KV, 30 with the margin; the CPU prior is
        // 50 MB/s per worker.
        link(&r, 5_000_000, 1000);
        assert!((r.link_rate().unwrap() - 5e6).abs() < 1e5);
        let got = r.choose(&rans(1 << 20, 4 << 20), 0).unwrap();
        assert_eq!((got.decoder, got.reason), (Decoder::Cpu, Reason::KeepsUp));
    }

    #[test]
    fn a_fast_link_takes_the_gpu() {
        let r = Router::new(RoutePolicy::Auto, 4);
        // 100 MB/s of wire x 4 = 400 MB/s of KV: one CPU worker at 50 MB/s cannot keep up,
        // and neither could all four together.
        link(&r, 10_000_000, 100);
        let got = r.choose(&rans(1 << 20, 4 << 20), 0).unwrap();
        assert_eq!((got.decoder, got.reason), (Decoder::Gpu, Reason::Fastest));
    }

    #[test]
    fn measurements_replace_the_prior_and_change_the_choice() {
        let r = Router::new(RoutePolicy::Auto, 4);
        link(&r, 100_000_000, 100);
        // 1 GB/s of wire x 4 x 1.5: 6 GB/s of KV demanded.
        assert_eq!(
            r.choose(&rans(1 << 20, 4 << 20), 0).unwrap().decoder,
            Decoder::Gpu
        );
        r.done(Decoder::Gpu, Decoder::Gpu, VariantKind::Rans, 0, None);
        // The CPU turns out to restore 8 GB/s per worker: it keeps up.
        r.done(
            Decoder::Cpu,
            Decoder::Cpu,
            VariantKind::Rans,
            8_000_000_000,
            Some(Duration::from_secs(1)),
        );
        assert_eq!(r.rate(Decoder::Cpu, VariantKind::Rans), 8e9);
        assert_eq!(
            r.choose(&rans(1 << 20, 4 << 20), 0).unwrap().decoder,
            Decoder::Cpu
        );
        // Later measurements move the rate by a quarter of the difference.
        r.done(
            Decoder::Cpu,
            Decoder::Cpu,
            VariantKind::Rans,
            4_000_000_000,
            Some(Duration::from_secs(1)),
        );
        assert_eq!(r.rate(Decoder::Cpu, VariantKind::Rans), 7e9);
        // Below the demand again: the GPU.
        for _ in 0..8 {
            r.done(
                Decoder::Cpu,
                Decoder::Cpu,
                VariantKind::Rans,
                1_000_000_000,
                Some(Duration::from_secs(1)),
            );
        }
        assert!(r.rate(Decoder::Cpu, VariantKind::Rans) < 6e9);
        assert_eq!(
            r.choose(&rans(1 << 20, 4 << 20), 0).unwrap().decoder,
            Decoder::Gpu
        );
        // Other variants keep their priors.
        assert_eq!(r.rate(Decoder::Cpu, VariantKind::Hevc), 1.5e8);
    }

    #[test]
    fn busy_decoders_and_a_backlog_are_not_idle() {
        let r = Router::new(RoutePolicy::Auto, 2);
        link(&r, 5_000_000, 1000);
        let c = rans(1 << 20, 4 << 20);
        // Two CPU lanes: the third section finds both busy and goes to the GPU.
        assert_eq!(r.choose(&c, 0).unwrap().decoder, Decoder::Cpu);
        assert_eq!(r.choose(&c, 0).unwrap().decoder, Decoder::Cpu);
        assert_eq!(r.choose(&c, 0).unwrap().decoder, Decoder::Gpu);
        r.done(Decoder::Cpu, Decoder::Cpu, VariantKind::Rans, 0, None);
        assert_eq!(r.choose(&c, 0).unwrap().decoder, Decoder::Cpu);
        // Sections waiting for a worker: decoding is the bottleneck, the fastest goes.
        for d in [Decoder::Cpu, Decoder::Cpu, Decoder::Gpu] {
            r.done(d, d, VariantKind::Rans, 0, None);
        }
        for _ in 0..3 {
            r.queued();
        }
        assert_eq!(r.choose(&c, 0).unwrap().reason, Reason::Fastest);
        r.dequeued();
        assert_eq!(r.choose(&c, 0).unwrap().reason, Reason::KeepsUp);
    }

    #[test]
    fn hevc_prefers_an_idle_nvdec_to_the_cpu() {
        let r = Router::new(RoutePolicy::Auto, 8);
        link(&r, 10_000_000, 1000);
        let c = SectionCost {
            variant: VariantKind::Hevc,
            candidates: Candidates::of(&[Decoder::Nvdec, Decoder::Cpu]),
            wire_bytes: 1 << 20,
            kv_bytes: 2 << 20,
        };
        // One session: the second section finds NVDEC busy and goes to the CPU.
        assert_eq!(r.choose(&c, 1).unwrap().decoder, Decoder::Nvdec);
        let second = r.choose(&c, 1).unwrap();
        assert_eq!(
            (second.decoder, second.reason),
            (Decoder::Cpu, Reason::KeepsUp)
        );
    }

    #[test]
    fn forced_and_fastest_policies() {
        let c = rans(1 << 20, 4 << 20);
        let cpu = Router::new(RoutePolicy::Cpu, 4);
        let got = cpu.choose(&c, 0).unwrap();
        assert_eq!((got.decoder, got.reason), (Decoder::Cpu, Reason::Forced));
        // NVDEC cannot decode rans: the policy falls back to auto's choice.
        let nvdec = Router::new(RoutePolicy::Nvdec, 4);
        assert_eq!(nvdec.choose(&c, 2).unwrap().reason, Reason::Fastest);
        let fastest = Router::new(RoutePolicy::Fastest, 4);
        link(&fastest, 1_000, 1000);
        assert_eq!(fastest.choose(&c, 0).unwrap().decoder, Decoder::Gpu);
    }

    #[test]
    fn link_time_counts_only_while_requests_are_outstanding() {
        let mut m = LinkMeter::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        m.begin(ms(0));
        m.begin(ms(0));
        m.end(5_000_000, ms(50));
        m.end(5_000_000, ms(100));
        // An idle second between fetches does not count.
        m.begin(ms(1100));
        m.end(10_000_000, ms(1200));
        let rate = m.rate().unwrap();
        assert!((rate - 1e8).abs() < 1e6, "{rate}");
        // Past the window, old time decays without changing the rate.
        m.begin(ms(2000));
        m.end(300_000_000, ms(5000));
        assert!(m.busy <= LINK_WINDOW, "{:?}", m.busy);
        assert!((m.rate().unwrap() - 320e6 / 3.2).abs() < 1e6);
    }

    #[test]
    fn policies_parse_by_name() {
        for p in [
            RoutePolicy::Auto,
            RoutePolicy::Fastest,
            RoutePolicy::Gpu,
            RoutePolicy::Nvdec,
            RoutePolicy::Cpu,
        ] {
            assert_eq!(RoutePolicy::parse(p.name()), Ok(p));
        }
        assert!(RoutePolicy::parse("fpga").unwrap_err().contains("auto"));
    }
}

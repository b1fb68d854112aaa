//! Throttling of failed client authentication, per source address (issue 18 item 5): a wrong
//! bearer token, or a client certificate the store refuses, counts as a failure of the address
//! it came from. After [`AuthThrottleConfig::free_failures`] failures an address is blocked for
//! a backoff that doubles with each further failure, up to
//! [`AuthThrottleConfig::max_backoff`]; while blocked, its authentication attempts are refused
//! without being checked and its new connections are refused, so guessing a token costs time
//! whatever the number of connections and streams. Failures are forgotten
//! [`AuthThrottleConfig::forget_after`] after the last one; a success does not clear them (a
//! client sharing the attacker's address would otherwise reset its count).
//!
//! Addresses are IPv4 addresses, and IPv6 addresses by their /64 prefix (one host usually owns
//! a whole /64). The table holds at most [`AuthThrottleConfig::max_sources`] addresses: when
//! full, the entry failed longest ago gives way, so a flood of addresses bounds the memory.
//!
//! Sans I/O: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How failed authentication is throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthThrottleConfig {
    /// Failures of an address allowed before it is blocked.
    pub free_failures: u32,
    /// Block after the first failure beyond the free ones; doubles with each further failure.
    pub base_backoff: Duration,
    /// Longest block.
    pub max_backoff: Duration,
    /// An address without failures for this long is forgotten (its count starts again).
    pub forget_after: Duration,
    /// Addresses remembered at most.
    pub max_sources: usize,
}

impl Default for AuthThrottleConfig {
    fn default() -> Self {
        AuthThrottleConfig {
            free_failures: 5,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            forget_after: Duration::from_secs(600),
            max_sources: 4096,
        }
    }
}

/// What the table keys an address by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4([u8; 4]),
    /// The /64 prefix.
    V6([u8; 8]),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    Source::V6(prefix)
                }
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_failure: Instant,
    blocked_until: Option<Instant>,
}

/// Failures by source address; see the module doc.
#[derive(Debug)]
pub struct AuthThrottle {
    config: AuthThrottleConfig,
    entries: HashMap<Source, Entry>,
}

impl AuthThrottle {
    /// An empty table.
    pub fn new(config: AuthThrottleConfig) -> AuthThrottle {
        AuthThrottle {
            config,
            entries: HashMap::new(),
        }
    }

    /// `Err(how long)` while `ip` is blocked at `now`, else `Ok`.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        match self
            .entries
            .get(&Source::of(ip))
            .and_then(|e| e.blocked_until)
        {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Records a failure of `ip` at `now`; returns the block it now gets, if any.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let source = Source::of(ip);
        let c = self.config;
        if !self.entries.contains_key(&source) {
            self.make_room(now);
        }
        let e = self.entries.entry(source).or_insert(Entry {
            failures: 0,
            last_failure: now,
            blocked_until: None,
        });
        if now.saturating_duration_since(e.last_failure) >= c.forget_after {
            e.failures = 0;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_failure = now;
        let beyond = e.failures.checked_sub(c.free_failures.saturating_add(1))?;
        let backoff = c
            .base_backoff
            .checked_mul(1u32.checked_shl(beyond).unwrap_or(u32::MAX))
            .unwrap_or(c.max_backoff)
            .min(c.max_backoff);
        e.blocked_until = Some(now + backoff);
        Some(backoff)
    }

    /// Addresses remembered now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no address is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Frees a place for a new address: drops forgotten entries, then, when still full, the
    /// one that failed longest ago.
    fn make_room(&mut self, now: Instant) {
        if self.entries.len() < self.config.max_sources {
            return;
        }
        let forget = self.config.forget_after;
        self.entries.retain(|_, e| {
            now.saturating_duration_since(e.last_failure) < forget
                || e.blocked_until.is_some_and(|u| u > now)
        });
        while self.entries.len() >= self.config.max_sources.max(1) {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_failure)
                .map(|(s, _)| *s)
            else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn config() -> AuthThrottleConfig {
        AuthThrottleConfig {
            free_failures: 3,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            forget_after: Duration::from_secs(60),
            max_sources: 64,
        }
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn free_failures_then_a_doubling_bounded_block() {
        let mut t = AuthThrottle::new(config());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(t.failed(A, t0), None);
            assert_eq!(t.check(A, t0), Ok(()));
        }
        assert_eq!(t.failed(A, t0), Some(Duration::from_millis(100)));
        assert_eq!(t.check(A, t0), Err(Duration::from_millis(100)));
        assert_eq!(t.check(B, t0), Ok(()), "other addresses are not blocked");
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(t.check(A, t1), Ok(()), "the block ends");
        let blocks: Vec<_> = (0..6).filter_map(|_| t.failed(A, t1)).collect();
        let ms: Vec<u128> = blocks.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [200, 400, 800, 1000, 1000, 1000]);
        for _ in 0..100 {
            t.failed(A, t1);
        }
        assert_eq!(t.check(A, t1), Err(Duration::from_millis(1000)));
    }

    #[test]
    fn old_failures_are_forgotten() {
        let mut t = AuthThrottle::new(config());
        let t0 = Instant::now();
        for _ in 0..3 {
            t.failed(A, t0);
        }
        assert_eq!(t.failed(A, t0 + Duration::from_secs(61)), None);
    }

    #[test]
    fn ipv6_counts_by_slash_64_and_mapped_v4_as_v4() {
        let mut t = AuthThrottle::new(config());
        let t0 = Instant::now();
        for i in 0..4u16 {
            t.failed(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i)),
                t0,
            );
        }
        let same_64 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 9, 9, 9, 9));
        let other_64 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        assert!(t.check(same_64, t0).is_err());
        assert!(t.check(other_64, t0).is_ok());
        for _ in 0..4 {
            t.failed(A, t0);
        }
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert!(t.check(mapped, t0).is_err());
    }

    #[test]
    fn the_table_stays_bounded_under_a_flood_of_addresses() {
        let mut t = AuthThrottle::new(config());
        let t0 = Instant::now();
        for _ in 0..4 {
            t.failed(A, t0);
        }
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i));
            t.failed(ip, t0 + Duration::from_micros(u64::from(i) + 1));
            assert!(t.len() <= 64);
        }
        assert_eq!(t.len(), 64);
        // The oldest entries made room: the flood's latest addresses are remembered.
        let last = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + 9_999));
        for _ in 0..3 {
            t.failed(last, t0 + Duration::from_secs(1));
        }
        assert!(t.check(last, t0 + Duration::from_secs(1)).is_err());
    }
}

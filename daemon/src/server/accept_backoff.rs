//! What the accept loop does when `accept` fails: out of fds or memory, wait before trying
//! again, longer each time up to a cap, and log once per burst. No I/O, no clock.
//!
//! A listener whose backlog holds a connection stays readable, so retrying at once spins on a
//! core and floods the log while the process is out of fds; the clients already connected
//! free theirs only if the daemon keeps serving them. Other accept errors (a connection
//! aborted before it was accepted) concern one connection and are not waited on.

use std::io;
use std::time::Duration;

/// The first wait after a resource error: short, as one closed fd is enough to go on.
pub(crate) const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest wait: a burst of connections waits at most this long after fds are free.
pub(crate) const MAX_PAUSE: Duration = Duration::from_secs(1);

/// What the accept loop does after a failed `accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pause {
    /// Wait this long before accepting again (zero: go on at once).
    pub(crate) wait: Duration,
    /// This failure starts a burst: log it (the rest of the burst is counted, not logged).
    pub(crate) log: bool,
}

/// The state of the accept loop's backoff: feed every accept result in.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    /// Resource errors in the current burst.
    failures: u64,
    next: Duration,
}

/// Whether `e` means the process or the system is out of fds or memory.
pub(crate) fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

impl AcceptBackoff {
    /// An accept failed with `e`.
    pub(crate) fn handle_error(&mut self, e: &io::Error) -> Pause {
        if !is_resource_error(e) {
            return Pause {
                wait: Duration::ZERO,
                log: false,
            };
        }
        self.failures += 1;
        let wait = if self.failures == 1 {
            FIRST_PAUSE
        } else {
            (self.next * 2).min(MAX_PAUSE)
        };
        self.next = wait;
        Pause {
            wait,
            log: self.failures == 1,
        }
    }

    /// An accept succeeded: the number of failures of the burst it ends, if one did.
    pub(crate) fn handle_success(&mut self) -> Option<u64> {
        let burst = std::mem::take(&mut self.failures);
        self.next = Duration::ZERO;
        (burst > 0).then_some(burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_back_off_exponentially_to_a_cap_and_log_once() {
        let mut b = AcceptBackoff::default();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<Pause> = (0..12).map(|_| b.handle_error(&emfile)).collect();
        assert_eq!(waits[0].wait, FIRST_PAUSE);
        assert_eq!(waits[1].wait, FIRST_PAUSE * 2);
        assert_eq!(waits[2].wait, FIRST_PAUSE * 4);
        assert_eq!(waits[11].wait, MAX_PAUSE);
        assert!(waits.windows(2).all(|w| w[0].wait <= w[1].wait));
        assert_eq!(waits.iter().filter(|p| p.log).count(), 1);
        assert_eq!(b.handle_success(), Some(12));
        assert_eq!(b.handle_success(), None);
        // A new burst starts short and is logged again.
        let enfile = io::Error::from_raw_os_error(libc::ENFILE);
        assert_eq!(
            b.handle_error(&enfile),
            Pause {
                wait: FIRST_PAUSE,
                log: true
            }
        );
        // A connection aborted before accept is not waited on.
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(b.handle_error(&aborted).wait, Duration::ZERO);
    }
}

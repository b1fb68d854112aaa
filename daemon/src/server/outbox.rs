//! One connection's queue of messages to send, and the signal that cuts the connection off.
//!
//! The queue is bounded: a client that sends requests and never reads its replies would
//! otherwise grow the daemon's memory without limit (measured: 254 MB to 2.7 GB from a Stats
//! flood). A reply that finds the queue full does not wait (the fetch pipeline and the read
//! loop must never block on a client): it cuts the connection off with [`CloseReason`], and
//! the connection's read loop closes it. This module does no I/O.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use kvfetcher_protocol::{ErrorCode, Message};
use tokio::sync::{mpsc, watch};

use super::ServeError;
use crate::metrics::Metrics;

/// Why the server cut a connection off (rather than the client leaving).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client does not read: its queue of unsent replies reached its bound.
    QueueFull,
    /// The client had more requests in progress than its bound.
    TooManyRequests,
    /// No request and nothing in progress for the idle timeout.
    Idle,
}

impl CloseReason {
    /// A short description for the log.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            CloseReason::QueueFull => "client does not read its replies (reply queue full)",
            CloseReason::TooManyRequests => "too many requests in progress",
            CloseReason::Idle => "idle timeout",
        }
    }

    /// Whether the client may still read: then it is told why before the connection closes
    /// (a client whose queue is full would not read the message).
    pub(crate) fn tells_client(self) -> bool {
        self != CloseReason::QueueFull
    }

    /// Counts this cut-off in `m`.
    pub(crate) fn count(self, m: &Metrics) {
        let c = &m.local_refusals;
        match self {
            CloseReason::QueueFull => c.queue_full.add(1),
            CloseReason::TooManyRequests => c.too_many_requests.add(1),
            CloseReason::Idle => c.idle.add(1),
        }
    }
}

/// The signal that cuts a connection off; the first reason given wins.
#[derive(Debug)]
pub(crate) struct Closer(watch::Sender<Option<CloseReason>>);

impl Closer {
    pub(crate) fn new() -> Arc<Closer> {
        Arc::new(Closer(watch::channel(None).0))
    }

    /// Asks for the connection to close (a second call keeps the first reason).
    pub(crate) fn close(&self, reason: CloseReason) {
        self.0.send_if_modified(|r| {
            let first = r.is_none();
            if first {
                *r = Some(reason);
            }
            first
        });
    }

    /// Resolves with the reason once [`Closer::close`] was called.
    pub(crate) async fn closed(&self) -> CloseReason {
        let mut rx = self.0.subscribe();
        let reason = match rx.wait_for(Option::is_some).await {
            // `wait_for` returned: the value is `Some`.
            Ok(r) => *r,
            // The sender lives in `self`: it cannot be gone while we borrow it.
            Err(_) => None,
        };
        match reason {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }
}

/// A queued message; keeps the daemon-wide gauge of queued replies up until written or dropped.
#[derive(Debug)]
pub(crate) struct Queued {
    /// The message.
    pub(crate) msg: Message,
    /// Its fds, sent with its first byte.
    pub(crate) fds: Vec<OwnedFd>,
    _counted: Counted,
}

#[derive(Debug)]
struct Counted(Arc<Metrics>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.local_queued_replies.add(-1);
    }
}

/// The sending side of one connection's bounded queue; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Queued>,
    closer: Arc<Closer>,
    metrics: Arc<Metrics>,
    /// The client's hello flags: which error codes it parses.
    peer_flags: u16,
}

impl Outbox {
    /// A queue holding at most `bound` messages (at least one) for a client whose hello
    /// carried `peer_flags`, and its receiving end.
    pub(crate) fn new(
        bound: usize,
        closer: Arc<Closer>,
        metrics: Arc<Metrics>,
        peer_flags: u16,
    ) -> (Outbox, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(bound.max(1));
        let out = Outbox {
            tx,
            closer,
            metrics,
            peer_flags,
        };
        (out, rx)
    }

    /// Queues `msg` without waiting, its error code one the client parses
    /// ([`Message::for_peer`]). A full queue cuts the connection off
    /// ([`CloseReason::QueueFull`]); a gone client drops it. Either way its fds are closed.
    pub(crate) fn send(&self, msg: Message, fds: Vec<OwnedFd>) {
        self.metrics.local_queued_replies.add(1);
        let q = Queued {
            msg: msg.for_peer(self.peer_flags),
            fds,
            _counted: Counted(self.metrics.clone()),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(q) {
            self.closer.close(CloseReason::QueueFull);
        }
    }

    /// Queues an `Error` message.
    pub(crate) fn error(&self, req: Option<u64>, code: ErrorCode, message: impl Into<String>) {
        self.send(
            Message::Error(kvfetcher_protocol::Error {
                req,
                code,
                message: message.into(),
            }),
            vec![],
        );
    }

    /// Queues the `Error` answering request `req` with `e`.
    pub(crate) fn serve_error(&self, req: u64, e: &ServeError) {
        self.error(Some(req), e.code(), e.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfetcher_protocol::{Released, Stats};

    fn stats(req: u64) -> Message {
        Message::Stats(Stats { req })
    }

    #[tokio::test]
    async fn a_full_queue_cuts_the_connection_and_counts_nothing_it_dropped() {
        let m = Metrics::new();
        let closer = Closer::new();
        let (out, mut rx) = Outbox::new(2, closer.clone(), m.clone(), 0);
        out.send(stats(1), vec![]);
        out.send(stats(2), vec![]);
        assert_eq!(m.local_queued_replies.get(), 2);
        assert!(closer.0.borrow().is_none());
        out.send(stats(3), vec![]);
        assert_eq!(closer.closed().await, CloseReason::QueueFull);
        // The refused message is not counted as queued.
        assert_eq!(m.local_queued_replies.get(), 2);
        let q = rx.recv().await.unwrap();
        assert_eq!(q.msg, stats(1));
        drop(q);
        assert_eq!(m.local_queued_replies.get(), 1);
        drop(rx);
        assert_eq!(m.local_queued_replies.get(), 0);
        // After the receiver is gone, sends are dropped quietly.
        out.send(
            Message::Released(Released {
                req: 4,
                fetch_id: 1,
            }),
            vec![],
        );
        assert_eq!(m.local_queued_replies.get(), 0);
    }

    #[tokio::test]
    async fn the_first_reason_wins() {
        let c = Closer::new();
        c.close(CloseReason::TooManyRequests);
        c.close(CloseReason::QueueFull);
        assert_eq!(c.closed().await, CloseReason::TooManyRequests);
    }
}

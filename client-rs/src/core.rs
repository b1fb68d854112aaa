//! Sans-IO bookkeeping shared by the blocking and the async client: request ids, answers waiting
//! to be taken, and the readiness of every live fetch.
//!
//! Feed every received message to [`ClientCore::handle_message`]; then ask
//! [`ClientCore::take_reply`] for an answer or [`ClientCore::layer_status`] for a fetch.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;

use crate::protocol::{ErrorCode, FetchDone, Message};

/// Where one layer of a fetch stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LayerStatus {
    /// Restored: its bytes may be read.
    Ready,
    /// Not yet.
    Pending,
    /// The fetch failed (or was released).
    Failed(ErrorCode, String),
}

#[derive(Debug)]
enum FetchState {
    Running,
    Done(FetchDone),
    Failed(ErrorCode, String),
}

#[derive(Debug)]
struct FetchProgress {
    ready: Vec<bool>,
    state: FetchState,
}

/// The client's protocol state, without I/O.
#[derive(Debug, Default)]
pub(crate) struct ClientCore {
    next_req: u64,
    waiting: HashSet<u64>,
    replies: HashMap<u64, (Message, Vec<OwnedFd>)>,
    fetches: HashMap<u64, FetchProgress>,
    fatal: Option<(ErrorCode, String)>,
}

impl ClientCore {
    /// A fresh request id whose answer will be kept for [`ClientCore::take_reply`].
    pub(crate) fn new_request(&mut self) -> u64 {
        self.next_req += 1;
        self.waiting.insert(self.next_req);
        self.next_req
    }

    /// A fresh request id whose answer will be dropped (fire and forget).
    pub(crate) fn new_ignored_request(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    /// The error the daemon announced before closing the connection, if any.
    pub(crate) fn fatal(&self) -> Option<&(ErrorCode, String)> {
        self.fatal.as_ref()
    }

    /// Files one received message.
    pub(crate) fn handle_message(&mut self, msg: Message, fds: Vec<OwnedFd>) {
        match &msg {
            Message::FetchBuffer(b) => {
                self.fetches
                    .entry(b.fetch_id)
                    .or_insert_with(|| FetchProgress {
                        ready: vec![false; b.shape.num_layers as usize],
                        state: FetchState::Running,
                    });
            }
            Message::LayersReady(r) => {
                if let Some(p) = self.fetches.get_mut(&r.fetch_id) {
                    let end = (r.end as usize).min(p.ready.len());
                    for x in p.ready.iter_mut().take(end).skip(r.start as usize) {
                        *x = true;
                    }
                }
                return;
            }
            Message::FetchDone(d) => {
                if let Some(p) = self.fetches.get_mut(&d.fetch_id) {
                    p.ready.iter_mut().for_each(|x| *x = true);
                    p.state = FetchState::Done(d.clone());
                    return;
                }
            }
            Message::FetchFailed(f) => {
                if let Some(p) = self.fetches.get_mut(&f.fetch_id) {
                    p.state = FetchState::Failed(f.code, f.message.clone());
                    return;
                }
            }
            Message::Error(e) if e.req.is_none() => {
                self.fatal = Some((e.code, e.message.clone()));
                return;
            }
            _ => {}
        }
        if let Some(req) = msg.req() {
            if self.waiting.contains(&req) {
                self.replies.insert(req, (msg, fds));
            }
        }
    }

    /// Takes the answer to `req` if it arrived.
    pub(crate) fn take_reply(&mut self, req: u64) -> Option<(Message, Vec<OwnedFd>)> {
        let r = self.replies.remove(&req)?;
        self.waiting.remove(&req);
        Some(r)
    }

    /// Stops waiting for `req` (its answer will be dropped).
    pub(crate) fn abandon(&mut self, req: u64) {
        self.waiting.remove(&req);
        self.replies.remove(&req);
    }

    /// Where `layer` of fetch `fetch_id` stands.
    pub(crate) fn layer_status(&self, fetch_id: u64, layer: u32) -> LayerStatus {
        match self.fetches.get(&fetch_id) {
            None => LayerStatus::Failed(ErrorCode::UnknownHandle, "fetch released".into()),
            Some(p) => match &p.state {
                FetchState::Failed(c, m) => LayerStatus::Failed(*c, m.clone()),
                _ if p.ready.get(layer as usize).copied().unwrap_or(false) => LayerStatus::Ready,
                _ => LayerStatus::Pending,
            },
        }
    }

    /// The final report of a fetch, once done.
    pub(crate) fn fetch_done(&self, fetch_id: u64) -> Option<&FetchDone> {
        match self.fetches.get(&fetch_id).map(|p| &p.state) {
            Some(FetchState::Done(d)) => Some(d),
            _ => None,
        }
    }

    /// Forgets a fetch (released by the client).
    pub(crate) fn forget_fetch(&mut self, fetch_id: u64) {
        self.fetches.remove(&fetch_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        BufferMemory, DType, FetchBuffer, KvShape, LayersReady, LookupReply, TargetLayout,
        TokenOrder,
    };

    #[test]
    fn readiness_and_replies_are_routed() {
        let mut c = ClientCore::default();
        let req = c.new_request();
        let ignored = c.new_ignored_request();
        c.handle_message(
            Message::LookupReply(LookupReply {
                req: ignored,
                tokens: 1,
            }),
            vec![],
        );
        assert!(c.take_reply(ignored).is_none());
        c.handle_message(
            Message::FetchBuffer(FetchBuffer {
                req,
                fetch_id: 9,
                shape: KvShape {
                    num_layers: 4,
                    tokens: 2,
                    kv_heads: 1,
                    head_dim: 2,
                },
                layout: TargetLayout::host(DType::F16, TokenOrder::Nhd),
                len: 64,
                memory: BufferMemory::Host,
            }),
            vec![],
        );
        assert!(matches!(
            c.take_reply(req),
            Some((Message::FetchBuffer(_), _))
        ));
        assert_eq!(c.layer_status(9, 1), LayerStatus::Pending);
        c.handle_message(
            Message::LayersReady(LayersReady {
                fetch_id: 9,
                start: 0,
                end: 2,
            }),
            vec![],
        );
        assert_eq!(c.layer_status(9, 1), LayerStatus::Ready);
        assert_eq!(c.layer_status(9, 2), LayerStatus::Pending);
        c.handle_message(
            Message::FetchFailed(crate::protocol::FetchFailed {
                req,
                fetch_id: 9,
                code: ErrorCode::Unavailable,
                message: "down".into(),
            }),
            vec![],
        );
        assert!(matches!(
            c.layer_status(9, 2),
            LayerStatus::Failed(ErrorCode::Unavailable, _)
        ));
        c.forget_fetch(9);
        assert!(matches!(
            c.layer_status(9, 0),
            LayerStatus::Failed(ErrorCode::UnknownHandle, _)
        ));
    }
}

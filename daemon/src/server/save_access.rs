//! Who may save KV, and who may replace chunks already stored: allow-lists of uids and gids
//! (`[save]` in the config) checked against a local client's SO_PEERCRED credentials.
//!
//! Stored chunks are write-once (issue 18 item 5a): a save of a stored prefix leaves the
//! stored chunks as they are. Only a client that asks for replace (`Save.replace`) and whose
//! uid or primary gid is listed may overwrite them.

use kvfetcher_protocol::PeerCred;

/// The allow-lists of `[save]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaveAccess {
    /// Uids that may save; with `save_gids` both empty, every client may save.
    pub save_uids: Vec<u32>,
    /// Primary gids that may save.
    pub save_gids: Vec<u32>,
    /// Uids that may replace stored chunks; with `replace_gids` both empty, nobody may.
    pub replace_uids: Vec<u32>,
    /// Primary gids that may replace stored chunks.
    pub replace_gids: Vec<u32>,
}

impl SaveAccess {
    /// Why `peer` may not make a save (with `replace` as asked), or `None` when it may.
    pub fn refusal(&self, peer: &PeerCred, replace: bool) -> Option<String> {
        let open = self.save_uids.is_empty() && self.save_gids.is_empty();
        if !open && !self.save_uids.contains(&peer.uid) && !self.save_gids.contains(&peer.gid) {
            return Some(format!(
                "uid {} gid {} may not save (see [save] save_uids, save_gids)",
                peer.uid, peer.gid
            ));
        }
        if replace
            && !self.replace_uids.contains(&peer.uid)
            && !self.replace_gids.contains(&peer.gid)
        {
            return Some(format!(
                "uid {} gid {} may not replace stored chunks (see [save] replace_uids, \
                 replace_gids); save without replace keeps the stored chunks",
                peer.uid, peer.gid
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> PeerCred {
        PeerCred {
            pid: None,
            uid,
            gid,
        }
    }

    #[test]
    fn everyone_saves_and_nobody_replaces_by_default() {
        let a = SaveAccess::default();
        assert_eq!(a.refusal(&peer(1000, 1000), false), None);
        assert!(a.refusal(&peer(0, 0), true).unwrap().contains("replace"));
    }

    #[test]
    fn lists_allow_by_uid_or_gid() {
        let a = SaveAccess {
            save_uids: vec![1000],
            save_gids: vec![50],
            replace_uids: vec![1000],
            replace_gids: vec![60],
        };
        assert_eq!(a.refusal(&peer(1000, 1), true), None);
        assert_eq!(a.refusal(&peer(7, 50), false), None);
        assert!(a.refusal(&peer(7, 50), true).is_some());
        assert!(a
            .refusal(&peer(7, 7), false)
            .unwrap()
            .contains("may not save"));
        let a = SaveAccess {
            replace_gids: vec![60],
            ..SaveAccess::default()
        };
        assert_eq!(a.refusal(&peer(7, 60), true), None);
    }
}

//! The daemon's open-file limit: raised from the soft to the hard limit at start.
//!
//! Every client connection, fetch buffer (memfd), store connection (UDP socket) and mapped
//! object holds an fd, and distributions start services with a soft limit of 1024: a node's
//! engines reach it long before the daemon's own caps. The hard limit is what the operator
//! allows (`LimitNOFILE=` in packaging/kvfetcher.service); raising the soft one needs no
//! privilege.

use std::io;

/// The open-file limits before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit found.
    pub before: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

fn get() -> io::Result<libc::rlimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_nofile() -> io::Result<NofileLimit> {
    let r = get()?;
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; the call only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let now = get()?;
    Ok(NofileLimit {
        before: r.rlim_cur as u64,
        soft: now.rlim_cur as u64,
        hard: now.rlim_max as u64,
    })
}

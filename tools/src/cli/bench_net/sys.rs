//! Raw system calls of the network benchmark, and nothing else: process CPU time
//! (`getrusage`), the thread's timer slack, and Linux packet sockets with batched receive and
//! send (`recvmmsg`/`sendmmsg`) for the delay bridge.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// `PACKET_VNET_HDR` from `<linux/if_packet.h>`: frames carry a `virtio_net_hdr` so GSO
/// super-frames and pending checksums pass through unchanged.
const PACKET_VNET_HDR: libc::c_int = 15;
/// `PACKET_IGNORE_OUTGOING` from `<linux/if_packet.h>`: do not see our own transmissions.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// Socket buffer asked for (with `SO_*BUFFORCE`, as root): room for a 25 Gbit/s x 10 ms burst.
const SOCKET_BUFFER: libc::c_int = 64 << 20;
/// Most frames one `recvmmsg`/`sendmmsg` call moves.
pub(super) const BATCH: usize = 64;

/// User plus system CPU seconds this process has used so far.
pub(super) fn cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` points to writable memory of the right size; RUSAGE_SELF is valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: getrusage succeeded and filled the struct (it was zeroed besides).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Asks the kernel to fire this thread's timers within `ns` nanoseconds of their deadline
/// (the default slack is 50 us, a large error on a 1 ms delay line). Best effort.
pub(super) fn set_timer_slack(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory of ours.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn set_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the pointer and length describe one live c_int; fd is an open socket.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc).map(|_| ())
}

/// A raw `AF_PACKET` socket bound to one interface, with virtio-net headers.
#[derive(Debug)]
pub(super) struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens a socket that receives every frame arriving on `ifname` and sends frames out of it.
    pub(super) fn bind(ifname: &str) -> io::Result<PacketSocket> {
        let name = std::ffi::CString::new(ifname)
            .map_err(|_| io::Error::other("interface name has a nul byte"))?;
        // SAFETY: `name` is a valid C string for the duration of the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked before use.
        let raw = check(unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto))
        })?;
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_int(&fd, libc::SOL_PACKET, PACKET_VNET_HDR, 1)?;
        set_int(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
        // Best effort: without root the normal limits apply.
        let _ = set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, SOCKET_BUFFER);
        let _ = set_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, SOCKET_BUFFER);
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as libc::c_int;
        // SAFETY: `addr` is a valid sockaddr_ll and the length matches it.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(rc)?;
        Ok(PacketSocket { fd })
    }

    /// Waits until a frame can be received or `timeout` (None: forever) has passed; returns
    /// whether one can. `ppoll` takes a nanosecond timeout (plain `poll` only milliseconds).
    pub(super) fn wait_readable(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `pfd` is one valid pollfd; `ts_ptr` is null or points to a live timespec; a
        // null signal mask leaves the thread's mask unchanged.
        let rc = unsafe { libc::ppoll(&mut pfd, 1, ts_ptr, std::ptr::null()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(rc > 0)
    }

    /// Receives up to `bufs.len()` waiting frames without blocking, each into its own buffer,
    /// with one system call; their lengths go to `lens`. Returns how many (0: none waiting).
    pub(super) fn recv_batch(&self, bufs: &mut [Vec<u8>], lens: &mut [usize]) -> io::Result<usize> {
        let n = bufs.len().min(lens.len()).min(BATCH);
        // SAFETY: iovec and mmsghdr are plain data; all-zero is a valid (empty) value.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            iov[i].iov_base = bufs[i].as_mut_ptr().cast();
            iov[i].iov_len = bufs[i].len();
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `n` headers each point to one iovec describing a distinct live,
        // writable buffer; `iov`, `msgs` and `bufs` outlive the call; no timeout pointer.
        let rc = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT as _,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let got = rc as usize;
        for i in 0..got {
            lens[i] = msgs[i].msg_len as usize;
        }
        Ok(got)
    }

    /// Sends `frames` (at most [`BATCH`]) in order with as few system calls as possible. A
    /// frame the kernel refuses (a full egress queue: `ENOBUFS`) is dropped, as a router drops
    /// it; returns how many were dropped. Other errors are returned.
    pub(super) fn send_batch(&self, frames: &[&[u8]]) -> io::Result<usize> {
        let n = frames.len().min(BATCH);
        // SAFETY: iovec and mmsghdr are plain data; all-zero is a valid (empty) value.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            // sendmmsg only reads through iov_base; the cast to *mut is what the type requires.
            iov[i].iov_base = frames[i].as_ptr() as *mut libc::c_void;
            iov[i].iov_len = frames[i].len();
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut done = 0;
        let mut dropped = 0;
        while done < n {
            // SAFETY: headers `done..n` each point to one iovec describing a live, readable
            // frame; `iov`, `msgs` and `frames` outlive the call.
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if rc > 0 {
                done += rc as usize;
                continue;
            }
            if rc == 0 {
                // Nothing sent and no error: count the head frame as dropped so the loop ends.
                done += 1;
                dropped += 1;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EMSGSIZE) => {
                    done += 1;
                    dropped += 1;
                }
                _ => return Err(e),
            }
        }
        Ok(dropped)
    }
}

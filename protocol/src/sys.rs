//! The raw system calls of the transport: `sendmsg`/`recvmsg` with SCM_RIGHTS fds, and memfds
//! (create, seal, inspect). Nothing else in the crate calls these directly.

use std::ffi::CStr;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::MAX_PENDING_FDS;

/// One `sendmsg`: `bytes` with `fds` attached. Returns how many bytes the kernel took; the fds
/// went with the first of them. Never raises SIGPIPE.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)
}

/// One `recvmsg` into `buf`; received fds (close-on-exec) are appended to `fds`. Returns the
/// number of bytes read, 0 at end of stream. Truncated fd lists are an error (the fds that did
/// arrive are closed).
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    recv_with_fds_flags(sock, buf, fds, MsgFlags::empty())
}

/// [`recv_with_fds`] that never waits (`MSG_DONTWAIT`, even on a blocking socket): nothing to
/// read is `WouldBlock`.
pub(crate) fn recv_with_fds_nowait(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    recv_with_fds_flags(sock, buf, fds, MsgFlags::MSG_DONTWAIT)
}

fn recv_with_fds_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: MsgFlags,
) -> io::Result<usize> {
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_PENDING_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    )
    .map_err(io::Error::from)?;
    let n = msg.bytes;
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for r in raw {
                    // SAFETY: the kernel has just installed `r` in our fd table for this
                    // message; nothing else knows it, so we are its sole owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                }
            }
        }
    }
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many fds in one message",
        ));
    }
    Ok(n)
}

/// A new memfd of `len` bytes (sealable, close-on-exec), named for debugging.
pub(crate) fn memfd_create_sized(name: &CStr, len: u64) -> io::Result<std::fs::File> {
    let fd = memfd_create(
        name,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let f = std::fs::File::from(fd);
    f.set_len(len)?;
    Ok(f)
}

/// Seals a memfd against any further change of size or content (and further seals).
pub(crate) fn seal_readonly(fd: BorrowedFd<'_>) -> io::Result<()> {
    let seals = SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SEAL;
    fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
    Ok(())
}

/// Whether `fd` is a memfd sealed so that neither its size nor its content can change.
pub(crate) fn is_sealed_readonly(fd: BorrowedFd<'_>) -> bool {
    match fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS) {
        Ok(bits) => {
            let s = SealFlag::from_bits_truncate(bits);
            s.contains(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW)
        }
        Err(_) => false,
    }
}

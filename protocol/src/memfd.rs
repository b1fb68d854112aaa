//! Memfds: the host memory that carries KV between the daemon and its clients. The daemon
//! creates one per fetch and shares it; a client creates one to hand KV over for a save.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use crate::sys;

/// Creates a memfd of `len` bytes (zero-filled, close-on-exec, sealable) named `name` (visible
/// in /proc/PID/fd for debugging; a NUL in it is replaced).
pub fn create(name: &str, len: u64) -> io::Result<File> {
    let name = CString::new(name.replace('\0', "_"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    sys::memfd_create_sized(&name, len)
}

/// Seals `file` (a memfd) so that nobody can change its size or content any more.
pub fn seal_readonly(file: &File) -> io::Result<()> {
    sys::seal_readonly(file.as_fd())
}

/// Whether `file` is a memfd sealed against writes, shrinking and growing: its content can then
/// be mapped and read without a copy.
pub fn is_sealed_readonly(file: &File) -> bool {
    sys::is_sealed_readonly(file.as_fd())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn sealing_makes_a_memfd_immutable() {
        let mut f = super::create("t", 0).unwrap();
        f.write_all(b"hello").unwrap();
        assert!(!super::is_sealed_readonly(&f));
        super::seal_readonly(&f).unwrap();
        assert!(super::is_sealed_readonly(&f));
        assert!(f.write_all(b"x").is_err());
        assert!(f.set_len(1).is_err());
        let plain = tempfile::tempfile().unwrap();
        assert!(!super::is_sealed_readonly(&plain));
    }
}

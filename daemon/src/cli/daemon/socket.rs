//! The daemon's Unix socket, owned by one daemon at a time.
//!
//! A lock file beside the socket (`<socket>.lock`) is `flock`ed for the daemon's lifetime; the
//! kernel releases it when the daemon dies, however it dies. A second daemon on the same path
//! refuses to start instead of unlinking the first one's socket and binding its own (the first
//! would go on serving its clients, unreachable to new ones). A socket file left by a dead
//! daemon is replaced; so is one nobody answers on. Something that answers on the path without
//! holding the lock (a daemon from before the lock file) is refused too.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;

/// The lock held for the daemon's lifetime; dropping it releases the path.
#[derive(Debug)]
pub struct SocketLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl SocketLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file of socket `path`: the same name with `.lock` appended.
fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes the lock of socket `path`, or says which process holds it.
fn lock(path: &Path) -> anyhow::Result<SocketLock> {
    let lock_path = lock_path(path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(f) => f,
        Err((mut f, Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            anyhow::bail!(
                "another kvfetcher daemon (pid {}) serves {} (it holds {})",
                pid.trim(),
                path.display(),
                lock_path.display()
            );
        }
        Err((_, e)) => {
            return Err(e).with_context(|| format!("locking {}", lock_path.display()));
        }
    };
    // The holder's pid, for the message above; the lock, not the content, is what counts.
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(SocketLock {
        _file: file,
        path: lock_path,
    })
}

/// Takes the socket path's lock, replaces a stale socket file (never any other kind of file),
/// binds the socket and sets its mode.
pub(crate) fn bind_socket(path: &Path, mode: u32) -> anyhow::Result<(UnixListener, SocketLock)> {
    let lock = lock(path)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            meta.file_type().is_socket(),
            "{} exists and is not a socket",
            path.display()
        );
        anyhow::ensure!(
            std::os::unix::net::UnixStream::connect(path).is_err(),
            "a process without the lock file answers on {}: is a daemon of an older version \
             running?",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    Ok((listener, lock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_daemon_on_a_live_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvf.sock");
        let (first, lock) = bind_socket(&path, 0o660).unwrap();
        assert_eq!(lock.path(), dir.path().join("kvf.sock.lock"));
        let err = bind_socket(&path, 0o660).unwrap_err().to_string();
        assert!(err.contains("another kvfetcher daemon"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        // The first daemon's socket is untouched and still answers.
        let _c = tokio::net::UnixStream::connect(&path).await.unwrap();
        first.accept().await.unwrap();
        // Once the first daemon is gone, the path is free again (its socket file is stale).
        drop(first);
        drop(lock);
        let (_again, _lock) = bind_socket(&path, 0o660).unwrap();
    }

    #[tokio::test]
    async fn a_stale_socket_from_a_dead_daemon_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvf.sock");
        // A dead daemon: its socket file and its (unlocked) lock file remain.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        std::fs::write(lock_path(&path), "12345").unwrap();
        assert!(path.exists());
        let (listener, _lock) = bind_socket(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _c = tokio::net::UnixStream::connect(&path).await.unwrap();
        listener.accept().await.unwrap();
    }

    #[tokio::test]
    async fn a_live_socket_without_the_lock_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvf.sock");
        let _older = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = bind_socket(&path, 0o660).unwrap_err().to_string();
        assert!(err.contains("answers on"), "{err}");
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
    }

    #[tokio::test]
    async fn other_files_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kvf.sock");
        std::fs::write(&path, "data").unwrap();
        let err = bind_socket(&path, 0o660).unwrap_err().to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    }
}

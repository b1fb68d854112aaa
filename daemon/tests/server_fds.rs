//! Out of fds: the local server backs off while `accept` fails with EMFILE and serves the
//! waiting client once fds are free; the daemon's start raises the soft limit to the hard one.
//!
//! Alone in its test binary (its own process): it lowers the process's RLIMIT_NOFILE.

mod server_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfetcher::gpu::{GpuDevices, GpuOptions};
use kvfetcher::server::ServeOptions;
use kvfetcher::Metrics;
use kvfetcher_protocol::{encode_hello, parse_hello, HELLO_LEN, HELLO_OK, PROTOCOL_VERSION};
use server_support::*;

fn set_soft_nofile(n: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    r.rlim_cur = n as libc::rlim_t;
    // SAFETY: `r` is a valid rlimit; the call only reads it.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0);
}

#[test]
fn accept_backs_off_on_emfile_and_serves_once_fds_are_free() {
    let metrics = Metrics::new();
    let gpus = Arc::new(GpuDevices::new(GpuOptions::default(), metrics.clone()));
    let srv = TestServer::start_gpus(MemBackend::new(None), ServeOptions::default(), gpus);
    let low = open_fds() as u64 + 16;
    set_soft_nofile(low);
    // Take every fd left, then give one back for the client's socket.
    let mut hog = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hog.push(f);
        assert!(hog.len() < 64, "the lowered limit is not enforced");
    }
    hog.pop();
    let mut c = UnixStream::connect(&srv.path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&encode_hello(PROTOCOL_VERSION)).unwrap();
    // The daemon cannot accept it: EMFILE.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics.local_accept_errors.get() == 0 {
        assert!(Instant::now() < deadline, "accept never failed");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(hog);
    // Once fds are free the daemon accepts and answers (after at most one backoff pause).
    let mut r = [0u8; HELLO_LEN];
    c.read_exact(&mut r).unwrap();
    assert_eq!(parse_hello(&r).unwrap(), (PROTOCOL_VERSION, HELLO_OK));
    assert!(metrics
        .render()
        .contains("kvfetcher_local_accept_errors_total"));

    // What the daemon does at start: back to the hard limit.
    let l = kvfetcher::raise_nofile().unwrap();
    assert_eq!(l.before, low);
    assert_eq!(l.soft, l.hard);
}

//! Fuzzes the local protocol's decoding (`kvfetcher_protocol`): the hello, and a byte
//! stream cut into arbitrary reads, each arriving with some fds (as `recvmsg` delivers them), fed
//! to a `FrameDecoder`.
//!
//! Input: byte 0 picks the decoder's frame limit; then records of `[ctl, len, len bytes]`, where
//! `ctl & 3` fds arrive with the record's bytes (real fds: duplicates of /dev/null, closed when
//! dropped). Nothing may panic; every message comes with exactly its `fd_count` fds; a message
//! that decodes re-encodes to one frame that decodes to the same message.

#![no_main]

use std::os::fd::OwnedFd;

use kvfetcher_protocol::{encode_message, parse_hello, FrameDecoder, HELLO_LEN};
use libfuzzer_sys::fuzz_target;

fn null_fds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .filter_map(|_| std::fs::File::open("/dev/null").ok().map(OwnedFd::from))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if let Some(hello) = data.get(..HELLO_LEN) {
        let _ = parse_hello(hello.try_into().expect("HELLO_LEN bytes"));
    }
    let Some((&limit, mut rest)) = data.split_first() else {
        return;
    };
    // Small limits reach the too-large path; the largest covers every real message.
    let max_frame = 16 + usize::from(limit) * 256;
    let mut decoder = FrameDecoder::new(max_frame);
    while let [ctl, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        decoder.handle_bytes(&tail[..n]);
        rest = &tail[n..];
        if decoder.handle_fds(null_fds(usize::from(ctl & 3))).is_err() {
            return;
        }
        loop {
            match decoder.poll_message() {
                Ok(Some((msg, fds))) => {
                    assert_eq!(fds.len(), msg.fd_count());
                    let Ok(frame) = encode_message(&msg, max_frame) else {
                        continue;
                    };
                    let mut again = FrameDecoder::new(max_frame);
                    again.handle_bytes(&frame);
                    again
                        .handle_fds(null_fds(msg.fd_count()))
                        .expect("a message's own fds are within the limit");
                    let (back, back_fds) = again
                        .poll_message()
                        .expect("an encoded message decodes")
                        .expect("an encoded message is whole");
                    assert_eq!(back, msg);
                    assert_eq!(back_fds.len(), msg.fd_count());
                    assert_eq!(again.buffered(), 0);
                }
                Ok(None) => break,
                // The stream is out of sync: the daemon drops such a connection.
                Err(_) => return,
            }
        }
    }
});

//! Fuzzes the store's wire protocol decoders (`daemon/src/transport/wire.rs`): request frames as
//! the server reads them, and response frames of every op (the `GetSections` span lists that a
//! section stream is cut by included) as the client reads them.
//!
//! The module is sans I/O and needs only `kvfetcher-codec`, so it is compiled here by path
//! rather than through the daemon crate, whose QUIC, TLS and S3 stack would make every fuzz
//! build many minutes longer. Decoding may not panic; what decodes must re-encode to a frame
//! that decodes to the same value, and may not claim more bytes than it was given.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, missing_docs, unreachable_pub)]
#[path = "../../daemon/src/transport/wire.rs"]
mod wire;

use wire::{frame_len, Op, Request, Response, FRAME_HEADER_LEN};

const OPS: [Op; 9] = [
    Op::Auth,
    Op::Put,
    Op::Get,
    Op::GetSections,
    Op::ExistsPrefix,
    Op::List,
    Op::Delete,
    Op::Stats,
    Op::GetSectionsOnly,
];

fuzz_target!(|data: &[u8]| {
    if let Ok(header) =
        <&[u8; FRAME_HEADER_LEN]>::try_from(data.get(..FRAME_HEADER_LEN).unwrap_or(&[]))
    {
        if let Ok(total) = frame_len(header) {
            assert!(total >= FRAME_HEADER_LEN);
        }
    }
    if let Ok(Some((req, used))) = Request::decode(data) {
        assert!(used <= data.len());
        let again = req.encode();
        let (back, n) = Request::decode(&again)
            .expect("an encoded request decodes")
            .expect("an encoded request is whole");
        assert_eq!(back, req);
        assert_eq!(n, again.len());
    }
    for op in OPS {
        if let Ok(Some((resp, used))) = Response::decode(op, data) {
            assert!(used <= data.len());
            let again = resp.encode();
            let (back, _) = Response::decode(op, &again)
                .expect("an encoded response decodes")
                .expect("an encoded response is whole");
            // Error messages are cut to a length limit when encoded; everything else is exact.
            if !matches!(resp, Response::Error { .. }) {
                assert_eq!(back, resp);
            }
        }
    }
});

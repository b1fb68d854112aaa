//! Bit-exact round trips of the hevc variant (x265 -> libde265) on real KV, every layout and
//! bit width, and errors for corrupt sections.

mod hevc_common;

use hevc_common::{byte_planes, codelm, decoder, encoder, quantized};
use kvfetcher_codec::{
    CodePlane, CodecError, HevcParams, LayoutSpec, SectionDecoder, SectionEncoder,
};

const LAYOUTS: [&str; 5] = ["rows", "rows420", "frames", "frames420", "frames:8"];

fn round_trip(layout: &str, plane: &CodePlane) -> Option<usize> {
    let enc = encoder(layout)?;
    let dec = decoder()?;
    let section = enc
        .encode(plane)
        .unwrap_or_else(|e| panic!("{layout} {:?}: {e}", plane.shape));
    let back = dec
        .decode(plane.shape, &section.params, &section.payload)
        .unwrap_or_else(|e| panic!("{layout} {:?}: {e}", plane.shape));
    assert!(
        back == *plane,
        "{layout} {:?} is not bit-exact",
        plane.shape
    );
    Some(section.payload.len())
}

#[test]
fn every_layout_and_bit_width_is_bit_exact() {
    let cache = codelm();
    for layout in LAYOUTS {
        for bits in [2, 4, 6, 8, 10, 12] {
            // Odd token counts exercise padding and partial tiles.
            let plane = quantized(&cache, 3..5, 100..161, bits);
            if round_trip(layout, &plane).is_none() {
                return;
            }
        }
        let bytes = byte_planes(&cache, 6..7, 0..40);
        round_trip(layout, &bytes);
    }
}

/// A section cut into streams of at most N frames records one stream per cut, each a whole
/// Annex-B stream, and decodes to the same codes.
#[test]
fn sections_cut_into_streams_round_trip() {
    let cache = codelm();
    let Some(dec) = decoder() else { return };
    let plane = quantized(&cache, 0..2, 0..200, 8);
    for layout in ["frames:16", "rows"] {
        let one = encoder(layout).unwrap().encode(&plane).expect("one stream");
        let frames = HevcParams::from_bytes(&one.params).unwrap().geometry.frames;
        for per in [1, 2, 5] {
            let enc = encoder(layout).unwrap().with_stream_frames(Some(per));
            let s = enc.encode(&plane).expect("encodes");
            let p = HevcParams::from_bytes(&s.params).expect("params");
            let want: Vec<usize> = (0..frames)
                .step_by(per)
                .map(|f| per.min(frames - f))
                .collect();
            let got: Vec<usize> = p.streams.iter().map(|s| s.frames).collect();
            assert_eq!(got, want, "{layout}, {per} frames per stream");
            for stream in p.split(&s.payload).unwrap() {
                // Every stream opens with its own parameter sets (a VPS NAL unit).
                assert_eq!(&stream[..5], &[0, 0, 0, 1, 0x40], "{layout}: stream start");
            }
            let back = dec
                .decode(plane.shape, &s.params, &s.payload)
                .expect("decodes");
            assert!(back == plane, "{layout}, {per} frames per stream");
        }
        let none = encoder(layout).unwrap().with_stream_frames(Some(0));
        assert_eq!(
            none.encode(&plane).unwrap().payload,
            one.payload,
            "0: one stream"
        );
    }
}

#[test]
fn default_and_rows_layouts_beat_packed_codes_at_four_bits() {
    let cache = codelm();
    let plane = quantized(&cache, 0..2, 0..256, 4);
    let packed = plane.shape.packed_bytes();
    for layout in ["frames", "rows"] {
        let Some(bytes) = round_trip(layout, &plane) else {
            return;
        };
        let ratio = packed as f64 / bytes as f64;
        println!("{layout}, 4 bits: {bytes} bytes, packed {packed} ({ratio:.3}x)");
        assert!(
            bytes < packed,
            "{layout}: hevc {bytes} bytes >= packed {packed}"
        );
    }
}

#[test]
fn tiny_and_large_shapes_round_trip() {
    let cache = codelm();
    // One token of one tensor: a whole 144x144 frame of padding around it.
    let one = quantized(&cache, 0..1, 5..6, 4);
    let one = CodePlane {
        shape: kvfetcher_codec::PlaneShape {
            tensors: 1,
            ..one.shape
        },
        codes: one.codes[..one.shape.cols].to_vec(),
    };
    for layout in LAYOUTS {
        round_trip(layout, &one);
    }
}

#[test]
fn corrupt_sections_are_errors() {
    let cache = codelm();
    let (Some(enc), Some(dec)) = (encoder("rows"), decoder()) else {
        return;
    };
    let plane = quantized(&cache, 0..1, 0..64, 4);
    let s = enc.encode(&plane).expect("encodes");
    let corrupt = |r: Result<CodePlane, CodecError>| matches!(r, Err(CodecError::Corrupt { .. }));
    // Truncated payload (the stream table no longer adds up) and a truncated stream.
    assert!(corrupt(dec.decode(
        plane.shape,
        &s.params,
        &s.payload[..s.payload.len() - 9]
    )));
    let mut p = HevcParams::from_bytes(&s.params).unwrap();
    let cut = s.payload.len() * 2 / 3;
    p.streams[0].bytes = cut;
    assert!(corrupt(dec.decode(
        plane.shape,
        &p.to_bytes().unwrap(),
        &s.payload[..cut]
    )));
    // Flipped bytes in the middle of the stream: libde265 errors, or the checksum catches it.
    for at in [
        s.payload.len() / 3,
        s.payload.len() / 2,
        s.payload.len() - 5,
    ] {
        let mut bad = s.payload.clone();
        bad[at] ^= 0x5a;
        assert!(
            corrupt(dec.decode(plane.shape, &s.params, &bad)),
            "flip at {at} decoded"
        );
    }
    // Garbage, wrong shape, garbage parameters.
    assert!(corrupt(dec.decode(
        plane.shape,
        &s.params,
        &vec![0x17; s.payload.len()]
    )));
    let other = kvfetcher_codec::PlaneShape {
        rows: 63,
        ..plane.shape
    };
    assert!(corrupt(dec.decode(other, &s.params, &s.payload)));
    assert!(corrupt(dec.decode(
        plane.shape,
        &s.params[..10],
        &s.payload
    )));
    // The decoder still works after all that.
    assert_eq!(
        dec.decode(plane.shape, &s.params, &s.payload).unwrap(),
        plane
    );
}

#[test]
fn bad_codes_and_layouts_are_rejected() {
    let Some(enc) = encoder("rows") else { return };
    let shape = kvfetcher_codec::PlaneShape {
        bits: 4,
        tensors: 1,
        rows: 2,
        cols: 2,
    };
    let r = enc.encode(&CodePlane {
        shape,
        codes: vec![1, 2, 3, 16],
    });
    assert!(matches!(r, Err(CodecError::InvalidCodes(_))));
    let wide = kvfetcher_codec::PlaneShape { bits: 14, ..shape };
    let r = enc.encode(&CodePlane {
        shape: wide,
        codes: vec![1, 2, 3, 4],
    });
    assert!(matches!(r, Err(CodecError::Unsupported { .. })));
    assert!(matches!(
        kvfetcher_codec::HevcEncoder::new(Some("diagonal")),
        Err(CodecError::Unsupported { .. })
    ));
    assert_eq!(LayoutSpec::default().to_string(), "frames");
}

#[test]
fn one_decoder_serves_concurrent_callers() {
    let cache = codelm();
    let (Some(enc), Some(dec)) = (encoder("rows"), decoder()) else {
        return;
    };
    let planes: Vec<CodePlane> = (0..3)
        .map(|i| quantized(&cache, i..i + 1, 0..48, 6))
        .collect();
    let sections: Vec<_> = planes
        .iter()
        .map(|p| enc.encode(p).expect("encodes"))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for (p, sec) in planes.iter().zip(&sections) {
                    let back = dec
                        .decode(p.shape, &sec.params, &sec.payload)
                        .expect("decodes");
                    assert!(back == *p);
                }
            });
        }
    });
}

//! The extracted streams are plain HEVC that NVDEC takes: ffprobe reads each one back with a
//! pixel format NVDEC decodes and the geometry's frame size.

mod hevc_common;

use std::process::Command;

use hevc_common::{codelm, encoder, quantized};
use kvfetcher_codec::{extract_streams, Chroma, HevcGeometry, HevcParams, SectionEncoder};
use kvfetcher_testkit::{skip, Missing};

/// Pixel formats NVDEC outputs for HEVC (4:2:0 and 4:4:4 at 8, 10 and 12 bits).
const NVDEC_FORMATS: [&str; 6] = [
    "yuv420p",
    "yuv444p",
    "yuv420p10le",
    "yuv444p10le",
    "yuv420p12le",
    "yuv444p12le",
];

fn ffprobe_available() -> bool {
    let ok = Command::new("ffprobe")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip(Missing::Tool, "ffprobe is not installed");
    }
    ok
}

fn field<'a>(json: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    &json["streams"][0][name]
}

fn probe(path: &std::path::Path, g: &HevcGeometry) {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_streams", "-of", "json"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ffprobe json");
    assert_eq!(field(&json, "codec_name"), "hevc", "{json}");
    let pix = field(&json, "pix_fmt").as_str().unwrap_or_default();
    assert!(
        NVDEC_FORMATS.contains(&pix),
        "pix_fmt {pix} is not one NVDEC decodes"
    );
    let want_pix = match (g.chroma, g.bit_depth) {
        (Chroma::Yuv420, 8) => "yuv420p",
        (Chroma::Yuv444, 8) => "yuv444p",
        (Chroma::Yuv420, 10) => "yuv420p10le",
        (Chroma::Yuv444, 10) => "yuv444p10le",
        (Chroma::Yuv420, _) => "yuv420p12le",
        (Chroma::Yuv444, _) => "yuv444p12le",
    };
    assert_eq!(pix, want_pix);
    let (w, h) = (
        field(&json, "width").as_u64().unwrap(),
        field(&json, "height").as_u64().unwrap(),
    );
    assert_eq!((w as usize, h as usize), (g.width, g.height));
    for side in [w, h] {
        assert!(
            (144..=8192).contains(&side),
            "{w}x{h} outside NVDEC's range"
        );
        if g.chroma == Chroma::Yuv420 {
            assert_eq!(side % 2, 0, "odd side {side} in 4:2:0");
        }
    }
}

#[test]
fn extracted_streams_are_hevc_that_nvdec_takes() {
    if !ffprobe_available() {
        return;
    }
    let cache = codelm();
    let dir = tempfile::tempdir().expect("temp dir");
    for layout in ["rows", "rows420", "frames", "frames420"] {
        let Some(enc) = encoder(layout) else { return };
        for bits in [4, 10, 12] {
            let plane = quantized(&cache, 2..4, 0..50, bits);
            let s = enc.encode(&plane).expect("encodes");
            let g = HevcParams::from_bytes(&s.params).expect("params").geometry;
            let streams = extract_streams(&s.params, &s.payload).expect("streams");
            assert!(!streams.is_empty());
            assert_eq!(streams.concat(), s.payload);
            for (i, stream) in streams.iter().enumerate() {
                let path = dir.path().join(format!("{layout}-{bits}-{i}.hevc"));
                std::fs::write(&path, stream).expect("writes");
                probe(&path, &g);
            }
        }
    }
}

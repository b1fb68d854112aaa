//! The codec command-line tools through the real binary: `encode`, `decode` and `inspect` on
//! real KV (codelm-kv-a).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kvfetcher_codec::{dequantize, quantize, Grouping, HevcDecoder, HevcEncoder};
use kvfetcher_kv::{DTypeExt, KvCache, KvFile, LayerKv, Tensor};
use kvfetcher_testkit::{data_file, skip, Missing};

const CHUNK: usize = 64;
const TOKENS: usize = 3 * CHUNK;

fn kvf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvfetcher"))
        .args(args)
        .output()
        .expect("run kvfetcher")
}

/// Runs and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = kvf(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs and expects a clean failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = kvf(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The first TOKENS tokens of codelm-kv-a, written to `dir`.
fn small_input(dir: &Path) -> (PathBuf, KvCache) {
    let src = data_file("codelm-kv-a.safetensors");
    let file = KvFile::read(&src).unwrap();
    let cache = file.cache.slice_tokens(0, TOKENS).unwrap();
    let path = dir.join("in.safetensors");
    KvFile {
        cache: cache.clone(),
        metadata: file.metadata,
    }
    .write(&path)
    .unwrap();
    (path, cache)
}

/// What quantizing each CHUNK-token chunk per channel at `bits(layer)` and dequantizing gives.
fn direct(cache: &KvCache, bits: impl Fn(usize) -> u8) -> Vec<LayerKv> {
    let ch = cache.kv_heads() * cache.head_dim();
    let dtype = cache.dtype();
    let one = |t: &Tensor, b: u8| {
        let mut bytes = Vec::new();
        for start in (0..cache.tokens()).step_by(CHUNK) {
            let part = t.slice_tokens(start, start + CHUNK).unwrap().to_f32();
            let (mut codes, mut back, mut enc) = (Vec::new(), Vec::new(), Vec::new());
            let p = quantize(&part, CHUNK, ch, b, Grouping::PerChannel, &mut codes).unwrap();
            dequantize(&codes, CHUNK, ch, Grouping::PerChannel, &p, &mut back).unwrap();
            dtype.encode_f32(&back, &mut enc);
            bytes.extend(enc);
        }
        Tensor::new(dtype, t.shape(), bytes).unwrap()
    };
    cache
        .layers()
        .iter()
        .enumerate()
        .map(|(i, l)| LayerKv {
            key: one(&l.key, bits(i)),
            value: one(&l.value, bits(i)),
        })
        .collect()
}

fn encode(input: &Path, out: &Path, extra: &[&str]) -> Vec<PathBuf> {
    let printed = ok(&[
        &["encode", "--input", s(input), "--out", s(out)][..],
        &["--chunk-tokens", "64"],
        extra,
    ]
    .concat());
    assert!(printed.contains("3 chunks"), "{printed}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3);
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(printed.contains(name), "{name} not printed: {printed}");
        assert_eq!(name.len(), 64);
    }
    files
}

fn decode(dir: &Path, out: &Path) -> KvCache {
    let printed = ok(&["decode", "--input", s(dir), "--out", s(out)]);
    assert!(printed.contains("3 chunks"), "{printed}");
    let file = KvFile::read(out).unwrap();
    assert_eq!(file.cache.token_ids(), None);
    file.cache
}

fn hevc_available() -> bool {
    match (HevcEncoder::new(None), HevcDecoder::new()) {
        (Ok(_), Ok(_)) => true,
        (e, d) => {
            skip(
                Missing::Tool,
                format!("hevc: {:?} / {:?}", e.err(), d.err()),
            );
            false
        }
    }
}

#[test]
fn packed_and_zstd_round_trips_equal_direct_quantization() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, cache) = small_input(tmp.path());
    let out = tmp.path().join("out.safetensors");
    let packed = tmp.path().join("packed");
    encode(&input, &packed, &["--variant", "packed", "--bits", "4"]);
    assert_eq!(decode(&packed, &out).layers(), direct(&cache, |_| 4));

    let zstd = tmp.path().join("zstd");
    let files = encode(
        &input,
        &zstd,
        &[
            "--bits",
            "6",
            "--layer-bits",
            "0=3,7=8",
            "--layers-per-section",
            "4",
        ],
    );
    let want = direct(&cache, |l| match l {
        0 => 3,
        7 => 8,
        _ => 6,
    });
    assert_eq!(decode(&zstd, &out).layers(), want);

    // inspect: header fields, the sections split where bits change, checksums.
    let info = ok(&["inspect", s(&files[0])]);
    for want in [
        "variant     zstd",
        "shape       8 layers x 2 kv heads x 128 head_dim, F16",
        "sections    4",
        "checksums   header and every section verified",
        "vs the 16-bit KV (524288 bytes)",
    ] {
        assert!(info.contains(want), "missing {want:?} in {info}");
    }
    assert!(info.contains(" 0..1    3 "), "{info}");
    assert!(info.contains(" 1..5    6 "), "{info}");
    assert!(info.contains(" 5..7    6 "), "{info}");
    assert!(info.contains(" 7..8    8 "), "{info}");
}

#[test]
fn exact_mode_gives_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, cache) = small_input(tmp.path());
    for variant in ["zstd", "packed"] {
        let dir = tmp.path().join(variant);
        let out = tmp.path().join(format!("{variant}.safetensors"));
        encode(&input, &dir, &["--exact", "--variant", variant]);
        assert_eq!(decode(&dir, &out).layers(), cache.layers(), "{variant}");
    }
}

#[test]
fn hevc_round_trip_and_streams_read_by_ffprobe() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, cache) = small_input(tmp.path());
    if !hevc_available() {
        return;
    }
    let dir = tmp.path().join("hevc");
    let args = ["--variant", "hevc", "--layout", "rows", "--bits", "4"];
    let files = encode(
        &input,
        &dir,
        &[&args[..], &["--preset", "ultrafast"]].concat(),
    );
    let out = tmp.path().join("out.safetensors");
    assert_eq!(decode(&dir, &out).layers(), direct(&cache, |_| 4));

    let streams = tmp.path().join("streams");
    let info = ok(&["inspect", s(&files[1]), "--extract-streams", s(&streams)]);
    assert!(info.contains("variant     hevc"), "{info}");
    assert!(info.contains(" (64)\nshape "), "{info}");
    let written: Vec<PathBuf> = std::fs::read_dir(&streams)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(written.len(), 8, "one stream per one-layer section");
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "stream=codec_name"])
        .args(["-of", "csv=p=0"])
        .arg(&written[0])
        .output();
    match probe {
        Ok(o) => {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "hevc");
        }
        Err(e) => skip(Missing::Tool, format!("ffprobe: {e}")),
    }
    // Sections cut into one-frame streams: several streams per section, same KV back.
    let cut = tmp.path().join("cut");
    let args = ["--variant", "hevc", "--layout", "frames:16", "--bits", "4"];
    let files = encode(
        &input,
        &cut,
        &[
            &args[..],
            &["--preset", "ultrafast", "--stream-frames", "1"],
        ]
        .concat(),
    );
    assert_eq!(decode(&cut, &out).layers(), direct(&cache, |_| 4));
    let info = ok(&["inspect", s(&files[0])]);
    assert!(info.contains("4 frames, 4 stream(s)"), "{info}");

    // A non-hevc chunk has no streams to extract.
    let zdir = tmp.path().join("z");
    let zfiles = encode(&input, &zdir, &["--bits", "4"]);
    let err = fails(&["inspect", s(&zfiles[0]), "--extract-streams", s(&streams)]);
    assert!(err.contains("holds no HEVC streams"), "{err}");
}

#[test]
fn bad_inputs_fail_with_clear_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let missing = t.join("missing.safetensors");
    let err = fails(&["encode", "--input", s(&missing), "--out", s(&t.join("o"))]);
    assert!(err.contains("missing.safetensors"), "{err}");
    let err = fails(&[
        "decode",
        "--input",
        s(&t.join("nodir")),
        "--out",
        s(&missing),
    ]);
    assert!(err.contains("nodir"), "{err}");
    let err = fails(&["inspect", s(&missing)]);
    assert!(err.contains("missing.safetensors"), "{err}");

    let (input, _) = small_input(t);
    let o = t.join("o");
    let encode_fails = |extra: &[&str]| {
        let args = ["encode", "--input", s(&input), "--out", s(&o)];
        fails(&[&args[..], extra].concat())
    };
    let err = encode_fails(&["--bits", "1"]);
    assert!(err.contains("1 bits is outside"), "{err}");
    let err = encode_fails(&["--stream-frames", "2"]);
    assert!(err.contains("apply to the hevc variant only"), "{err}");
    let out = t.join("out.safetensors");

    // A flipped payload byte: decode and inspect name the file and the checksum.
    let dir = t.join("corrupt");
    let files = encode(&input, &dir, &["--bits", "4"]);
    let mut bytes = std::fs::read(&files[1]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&files[1], &bytes).unwrap();
    let err = fails(&["decode", "--input", s(&dir), "--out", s(&out)]);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains(s(&files[1])), "{err}");
    let err = fails(&["inspect", s(&files[1])]);
    assert!(err.contains("checksum mismatch"), "{err}");
    // Truncated, and not a chunk at all.
    std::fs::write(&files[1], &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&["decode", "--input", s(&dir), "--out", s(&out)]);
    assert!(err.contains("not a valid chunk object"), "{err}");
    std::fs::write(&files[1], b"hello").unwrap();
    let err = fails(&["inspect", s(&files[1])]);
    assert!(err.contains("bad magic"), "{err}");

    // A missing middle chunk is a gap.
    let dir = t.join("gap");
    let files = encode(&input, &dir, &["--bits", "4"]);
    let middle = files
        .iter()
        .find(|f| ok(&["inspect", s(f)]).contains("tokens      64..128"))
        .unwrap();
    std::fs::remove_file(middle).unwrap();
    let err = fails(&["decode", "--input", s(&dir), "--out", s(&out)]);
    assert!(
        err.contains("gap in the chunks: tokens 64..128 missing"),
        "{err}"
    );

    // Chunks of another model in the same directory.
    let other = t.join("other");
    let theirs = encode(&input, &other, &["--bits", "4", "--model-id", "other"]);
    std::fs::copy(&theirs[0], dir.join("x")).unwrap();
    let err = fails(&["decode", "--input", s(&dir), "--out", s(&out)]);
    assert!(err.contains("mixed models"), "{err}");
    let empty = t.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = fails(&["decode", "--input", s(&empty), "--out", s(&out)]);
    assert!(err.contains("holds no chunk objects"), "{err}");
}

/// A profile for codelm fitted on tokens the test does not encode, with sensitivities set.
fn write_profile(dir: &Path) -> PathBuf {
    use kvfetcher_codec::{calibrate, BasisKind, Calibration, ModelFingerprint, Rope, RopeStyle};
    let cal = KvFile::read(&data_file("codelm-kv-a.safetensors"))
        .unwrap()
        .cache
        .slice_tokens(512, 1024)
        .unwrap();
    let cfg = Calibration {
        rope: Rope {
            style: RopeStyle::Halves,
            dims: cal.head_dim() as u16,
            base: 10000.0,
            freq_scale: 1.0,
        },
        sinks: 4,
        basis: BasisKind::Pca,
    };
    let mut p = calibrate(ModelFingerprint::of_bytes(b"codelm"), &[cal], &cfg).unwrap();
    for l in &mut p.layers {
        l.key.sensitivity = 0.01;
        l.value.sensitivity = 0.05;
    }
    let path = dir.join("codelm.kvfp");
    std::fs::write(&path, p.to_bytes()).unwrap();
    path
}

#[test]
fn transform_coding_needs_and_names_its_profile() {
    let dir = tempfile::tempdir().unwrap();
    let (input, cache) = small_input(dir.path());
    let profile = write_profile(dir.path());
    let chunks = dir.path().join("chunks");
    let files = encode(
        &input,
        &chunks,
        &["--profile", s(&profile), "--target-kl", "0.01"],
    );
    let shown: Vec<String> = files.iter().map(|f| ok(&["inspect", s(f)])).collect();
    assert!(
        shown.iter().all(|t| t.contains("transform-coded")),
        "{shown:?}"
    );
    // The chunk holding tokens 0..64 keeps the 4 sinks; the others none.
    let first = shown
        .iter()
        .find(|t| t.contains("tokens      0..64"))
        .unwrap();
    assert!(first.contains("sinks       4"), "{first}");
    let err = fails(&[
        "decode",
        "--input",
        s(&chunks),
        "--out",
        s(&dir.path().join("x")),
    ]);
    assert!(err.contains("profile"), "{err}");
    let out = dir.path().join("out.safetensors");
    let printed = ok(&[
        "decode",
        "--input",
        s(&chunks),
        "--out",
        s(&out),
        "--profile",
        s(&profile),
    ]);
    assert!(printed.contains("3 chunks"), "{printed}");
    let back = KvFile::read(&out).unwrap().cache;
    assert_eq!(back.tokens(), cache.tokens());
    // Sinks are exact; the rest is close.
    let row = cache.kv_heads() * cache.head_dim() * 2;
    assert_eq!(
        back.layers()[0].value.data()[..4 * row],
        cache.layers()[0].value.data()[..4 * row]
    );
    // Bad profile files and impossible combinations fail cleanly.
    let junk = dir.path().join("junk.kvfp");
    std::fs::write(&junk, b"KVFP not really").unwrap();
    let out2 = dir.path().join("c2");
    let err = fails(&[
        "encode",
        "--input",
        s(&input),
        "--out",
        s(&out2),
        "--profile",
        s(&junk),
    ]);
    assert!(err.contains("not a usable codec profile"), "{err}");
    // Usage errors (clap's exit status 2).
    let usage = |args: &[&str]| {
        let out = kvf(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = usage(&[
        "encode",
        "--input",
        s(&input),
        "--out",
        s(&out2),
        "--profile",
        s(&profile),
        "--exact",
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = usage(&[
        "encode",
        "--input",
        s(&input),
        "--out",
        s(&out2),
        "--target-kl",
        "0.01",
    ]);
    assert!(err.contains("--profile"), "{err}");
}

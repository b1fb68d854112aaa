//! `kvfetcher-bench codec` and `kvfetcher-bench fidelity` through the real binary, on real KV
//! (codelm-kv-a) and a real toy model (stories260K).

use std::path::{Path, PathBuf};
use std::process::Command;

use kvfetcher_kv::KvFile;
use kvfetcher_testkit::data_file;

/// Runs `kvfetcher-bench` and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kvfetcher-bench"))
        .args(args)
        .output()
        .expect("run kvfetcher-bench");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The first 192 tokens of codelm-kv-a, written to `dir`.
fn small_input(dir: &Path) -> PathBuf {
    let mut file = KvFile::read(&data_file("codelm-kv-a.safetensors")).unwrap();
    file.cache = file.cache.slice_tokens(0, 192).unwrap();
    let path = dir.join("in.safetensors");
    file.write(&path).unwrap();
    path
}

#[test]
fn bench_codec_json_lists_every_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let input = small_input(tmp.path());
    let json = ok(&[
        "codec",
        "--input",
        s(&input),
        "--tokens",
        "64",
        "--chunk-tokens",
        "32",
        "--variants",
        "packed,zstd",
        "--bits",
        "4,exact",
        "--json",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 5, "{json}");
    for r in &rows {
        for field in [
            "variant",
            "layout",
            "bits",
            "ratio_vs_16bit",
            "ratio_vs_packed",
            "encode_mbps",
            "decode_mbps",
            "max_abs_err",
            "rel_l2_err",
        ] {
            assert!(r.get(field).is_some(), "no {field} in {r}");
        }
        assert!(r["encode_mbps"].as_f64().unwrap() > 0.0);
    }
    let packed4 = &rows[0];
    assert_eq!(
        (packed4["variant"].as_str(), packed4["bits"].as_u64()),
        (Some("packed"), Some(4))
    );
    assert_eq!(packed4["ratio_vs_packed"].as_f64(), Some(1.0));
    let r16 = packed4["ratio_vs_16bit"].as_f64().unwrap();
    // Headers (per-channel parameters of 32-token chunks) are about half of each object.
    assert!(r16 > 2.0 && r16 < 4.0, "4-bit packed with headers: {r16}");
    let err = packed4["rel_l2_err"].as_f64().unwrap();
    assert!(err > 0.01 && err < 0.2, "4-bit error {err}");
    for exact in &rows[2..] {
        assert_eq!(exact["bits"].as_u64(), Some(16));
        assert_eq!(exact["max_abs_err"].as_f64(), Some(0.0), "{exact}");
    }
    assert_eq!(rows[4]["variant"].as_str(), Some("zstd-raw"));
}

#[test]
fn bench_fidelity_exact_agrees_and_quantized_drifts() {
    let model = data_file("stories260K.bin");
    let json = ok(&[
        "fidelity",
        "--model",
        s(&model),
        "--tokens",
        "48",
        "--chunk-tokens",
        "16",
        "--bits",
        "2,exact",
        "--json",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 2, "{json}");
    let (two, exact) = (&rows[0], &rows[1]);
    assert_eq!(exact["top1_agreement"].as_f64(), Some(1.0));
    assert_eq!(exact["mean_kl"].as_f64(), Some(0.0));
    assert_eq!(two["positions"].as_u64(), Some(48));
    assert!(two["mean_kl"].as_f64().unwrap() > 0.0, "{two}");
    assert!(two["rel_l2_err"].as_f64().unwrap() > 0.05, "{two}");
}

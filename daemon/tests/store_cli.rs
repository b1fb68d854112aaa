//! The `kvfetcher store`, `put` and `get` subcommands end to end: the same bytes come back.

mod store_util;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use store_util::real_objects;

#[test]
fn put_then_get_returns_the_same_bytes() {
    let Some(objects) = real_objects() else {
        return;
    };
    let exe = env!("CARGO_BIN_EXE_kvfetcher");
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    assert!(Command::new(exe)
        .args(["store", "--dev-cert"])
        .arg(&certs)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());
    let mut store = Command::new(exe)
        .args(["store", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--cert-dir")
        .arg(&certs)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(store.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let remote = format!("localhost:{port}");
    let files: Vec<_> = objects
        .iter()
        .enumerate()
        .map(|(i, (_, b))| {
            let p = dir.path().join(format!("chunk{i}.kvc"));
            std::fs::write(&p, b).unwrap();
            p
        })
        .collect();
    let out = Command::new(exe)
        .args(["put", "--store", &remote, "--ca"])
        .arg(&certs)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches(" stored ")
            .count(),
        objects.len()
    );
    let (key, bytes) = &objects[2];
    let back = dir.path().join("back.kvc");
    let out = Command::new(exe)
        .args(["get", "--store", &remote, "--ca"])
        .arg(&certs)
        .arg(key.to_hex())
        .arg("--out")
        .arg(&back)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&back).unwrap(), *bytes);
    // An unknown key is an error exit, and no output file is left behind.
    let missing = dir.path().join("missing.kvc");
    let out = Command::new(exe)
        .args(["get", "--store", &remote, "--ca"])
        .arg(&certs)
        .arg("ab".repeat(32))
        .arg("--out")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!missing.exists());
    store.kill().unwrap();
    store.wait().unwrap();
}

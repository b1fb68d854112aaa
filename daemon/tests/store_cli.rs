//! The `kvfetcher store`, `put` and `get` subcommands end to end: the same bytes come back, and
//! the store requires client authentication unless started with `--insecure-open-writes`.

mod store_util;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use store_util::real_objects;

const EXE: &str = env!("CARGO_BIN_EXE_kvfetcher");

/// Writes dev certificates into `dir/certs` and returns that directory.
fn dev_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    assert!(Command::new(EXE)
        .args(["store", "--dev-cert"])
        .arg(&certs)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());
    certs
}

/// A directory that trusts the dev CA but holds no client certificate.
fn trust_only(dir: &Path, certs: &Path) -> PathBuf {
    let d = dir.join("trust-only");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(certs.join("ca.pem"), d.join("ca.pem")).unwrap();
    d
}

/// Starts `kvfetcher store` on a free loopback port with `extra` arguments; returns it (its
/// stderr piped) and `localhost:PORT` once it listens.
fn start_store(dir: &Path, certs: &Path, extra: &[&std::ffi::OsStr]) -> (Child, String) {
    let mut store = Command::new(EXE)
        .args(["store", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--cert-dir")
        .arg(certs)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(store.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening on "), "{line:?}");
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    (store, format!("localhost:{port}"))
}

/// Stops the store and returns what it wrote to stderr.
fn stop(mut store: Child) -> String {
    store.kill().unwrap();
    store.wait().unwrap();
    let mut err = String::new();
    store
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

/// Writes the objects as files into `dir`.
fn object_files(dir: &Path, objects: &[(kvfetcher_codec::ChunkKey, Vec<u8>)]) -> Vec<PathBuf> {
    objects
        .iter()
        .enumerate()
        .map(|(i, (_, b))| {
            let p = dir.join(format!("chunk{i}.kvc"));
            std::fs::write(&p, b).unwrap();
            p
        })
        .collect()
}

/// Runs `kvfetcher put` of `files` with `--ca ca` and `extra` arguments.
fn put(remote: &str, ca: &Path, files: &[PathBuf], extra: &[&std::ffi::OsStr]) -> Output {
    Command::new(EXE)
        .args(["put", "--store", remote, "--ca"])
        .arg(ca)
        .args(extra)
        .args(files)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn put_then_get_returns_the_same_bytes() {
    let objects = real_objects();
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path());
    // Mutual TLS: `--ca certs` presents the dev client certificate.
    let ca = certs.join("ca.pem");
    let (store, remote) = start_store(dir.path(), &certs, &["--client-ca".as_ref(), ca.as_ref()]);
    let files = object_files(dir.path(), &objects);
    let out = put(&remote, &certs, &files, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).matches(" stored ").count(), objects.len());
    let (key, bytes) = &objects[2];
    let back = dir.path().join("back.kvc");
    let out = Command::new(EXE)
        .args(["get", "--store", &remote, "--ca"])
        .arg(&certs)
        .arg(key.to_hex())
        .arg("--out")
        .arg(&back)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&back).unwrap(), *bytes);
    // An unknown key is an error exit, and no output file is left behind.
    let missing = dir.path().join("missing.kvc");
    let out = Command::new(EXE)
        .args(["get", "--store", &remote, "--ca"])
        .arg(&certs)
        .arg("ab".repeat(32))
        .arg("--out")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
    assert!(!missing.exists());
    // A client without a certificate is refused.
    let out = put(&remote, &trust_only(dir.path(), &certs), &files[..1], &[]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    stop(store);
}

/// Neither `--client-ca` nor `--token-file`: the store refuses to start and says what to give.
#[test]
fn a_store_without_client_authentication_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path());
    let out = Command::new(EXE)
        .args(["store", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--cert-dir")
        .arg(&certs)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    for part in [
        "requires client authentication",
        "--client-ca",
        "--token-file",
        "--insecure-open-writes",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    assert!(text(&out.stdout).is_empty(), "it never listened");
    // `insecure_open_writes = false` in a config file is the same refusal.
    let config = dir.path().join("store.toml");
    std::fs::write(&config, "insecure_open_writes = false\n").unwrap();
    let out = Command::new(EXE)
        .args(["store", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--cert-dir")
        .arg(&certs)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--insecure-open-writes"));
}

/// `--insecure-open-writes` (or `insecure_open_writes = true`): the store starts, warns, and
/// takes puts from a client without a certificate or token.
#[test]
fn insecure_open_writes_start_with_a_warning() {
    let objects = real_objects();
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path());
    let files = object_files(dir.path(), &objects[..1]);
    let anyone = trust_only(dir.path(), &certs);
    let (store, remote) = start_store(dir.path(), &certs, &["--insecure-open-writes".as_ref()]);
    let out = put(&remote, &anyone, &files, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = stop(store);
    assert!(
        err.contains("WARN") && err.contains("no client authentication"),
        "no startup warning in: {err}"
    );
    let config = dir.path().join("store.toml");
    std::fs::write(&config, "insecure_open_writes = true\n").unwrap();
    let (store, _) = start_store(dir.path(), &certs, &["--config".as_ref(), config.as_ref()]);
    assert!(stop(store).contains("no client authentication"));
}

/// `--token-file`: a put without the token is refused, one with it is stored.
#[test]
fn a_token_store_refuses_puts_without_the_token() {
    let objects = real_objects();
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path());
    let token = dir.path().join("token");
    std::fs::write(&token, "a-long-random-token\n").unwrap();
    let files = object_files(dir.path(), &objects[..1]);
    let anyone = trust_only(dir.path(), &certs);
    let (store, remote) = start_store(
        dir.path(),
        &certs,
        &["--token-file".as_ref(), token.as_ref()],
    );
    let out = put(&remote, &anyone, &files, &[]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("authenticate"),
        "{}",
        text(&out.stderr)
    );
    let out = put(
        &remote,
        &anyone,
        &files,
        &["--token-file".as_ref(), token.as_ref()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = stop(store);
    assert!(!err.contains("no client authentication"), "{err}");
}

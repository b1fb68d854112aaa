//! The import rules of docs/ARCHITECTURE.md, checked: which workspace crate may depend on which
//! (from `cargo metadata`), which crates stay free of network and async I/O, and which daemon
//! modules may import which (from the sources). A change that breaks a rule fails here with the
//! rule's reason; change the rule (and the map) deliberately, not the code around it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Each workspace crate's normal (non-dev, non-build) dependencies, by package name.
fn workspace_deps() -> Vec<(String, BTreeSet<String>)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(repo_root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().expect("name").to_string())
                .collect();
            (p["name"].as_str().expect("name").to_string(), deps)
        })
        .collect()
}

/// Which workspace crates each crate may use (normal dependencies). Every workspace crate
/// must be listed, so a new crate forces a decision here and in docs/ARCHITECTURE.md.
const ALLOWED: &[(&str, &[&str])] = &[
    ("kvfetcher-types", &[]),
    ("kvfetcher-kv", &["kvfetcher-types"]),
    ("kvfetcher-codec", &["kvfetcher-kv"]),
    ("kvfetcher-protocol", &["kvfetcher-types"]),
    ("kvfetcher-cuda-sys", &[]),
    (
        "kvfetcher",
        &[
            "kvfetcher-kv",
            "kvfetcher-codec",
            "kvfetcher-protocol",
            "kvfetcher-cuda-sys",
        ],
    ),
    (
        "kvfetcher-client",
        &["kvfetcher-protocol", "kvfetcher-cuda-sys"],
    ),
    ("kvfetcher-c", &["kvfetcher-client"]),
    (
        "kvfetcher-tools",
        &[
            "kvfetcher",
            "kvfetcher-kv",
            "kvfetcher-codec",
            "kvfetcher-protocol",
            "kvfetcher-client",
            "kvfetcher-cuda-sys",
        ],
    ),
    ("kvfetcher-testkit", &[]),
    ("kvfetcher-tests", &[]),
];

/// Crates that hold no network or async I/O: the shared types, the KV model, the codec and
/// the protocol's sans-IO core are testable and fuzzable without sockets.
const NO_NETWORK: &[&str] = &["kvfetcher-types", "kvfetcher-kv", "kvfetcher-codec"];
const NETWORK_CRATES: &[&str] = &["tokio", "quinn", "rustls", "object_store", "nix"];

#[test]
fn crates_depend_only_on_what_the_map_allows() {
    let deps = workspace_deps();
    let members: BTreeSet<&str> = deps.iter().map(|(n, _)| n.as_str()).collect();
    for (name, used) in &deps {
        let allowed = ALLOWED
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is not in ALLOWED: add it and to ARCHITECTURE.md"))
            .1;
        for d in used.iter().filter(|d| members.contains(d.as_str())) {
            assert!(
                allowed.contains(&d.as_str()),
                "{name} depends on {d}, which docs/ARCHITECTURE.md does not allow"
            );
        }
    }
    // The rules that matter most, stated on their own.
    let of = |n: &str| &deps.iter().find(|(p, _)| p == n).expect(n).1;
    assert!(
        !of("kvfetcher").contains("kvfetcher-client"),
        "the daemon speaks the protocol crate, never the client crate"
    );
    assert!(
        !of("kvfetcher-client").contains("kvfetcher"),
        "clients never link the daemon"
    );
    assert!(
        of("kvfetcher-types").iter().all(|d| d == "serde"),
        "the shared types crate depends on serde only: every crate, clients included, uses it"
    );
}

/// The Rust files under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn cuda_ffi_lives_only_in_cuda_sys() {
    // The client and the daemon get every driver entry point from the shared raw crate: they
    // load no library themselves, so there is one table of CUDA signatures to keep right.
    let deps = workspace_deps();
    let of = |n: &str| &deps.iter().find(|(p, _)| p == n).expect(n).1;
    for side in ["kvfetcher", "kvfetcher-client"] {
        assert!(
            of(side).contains("kvfetcher-cuda-sys") && !of(side).contains("libloading"),
            "{side} must load CUDA through kvfetcher-cuda-sys, not libloading of its own"
        );
    }
    assert!(
        of("kvfetcher-cuda-sys")
            .iter()
            .all(|d| !d.starts_with("kvfetcher")),
        "the raw bindings depend on no workspace crate"
    );
    // No other source names the NVIDIA libraries' symbols or declares foreign functions.
    let root = repo_root();
    for krate in [
        "types",
        "kv",
        "codec",
        "protocol",
        "daemon",
        "client-rs",
        "client-c",
        "tools",
        "testkit",
        "tests",
        "python",
    ] {
        let src = root.join(krate);
        for file in rust_files(&src).into_iter().filter(|f| {
            !f.components().any(|c| c.as_os_str() == "target") && !f.ends_with("architecture.rs")
        }) {
            let text = std::fs::read_to_string(&file).expect("read source");
            assert!(
                !text.contains("extern \"C\" {"),
                "{} declares foreign functions: FFI goes through run-time loading",
                file.display()
            );
            if text.contains("libloading::") || text.contains("Library::new") {
                for lib in ["libcuda", "libnvcuvid"] {
                    assert!(
                        !text.contains(lib),
                        "{} loads {lib} itself: CUDA and NVDEC FFI live in cuda-sys/ only",
                        file.display()
                    );
                }
            }
        }
    }
}

#[test]
fn kv_and_codec_stay_free_of_io_crates() {
    for (name, used) in workspace_deps() {
        if NO_NETWORK.contains(&name.as_str()) {
            for d in NETWORK_CRATES {
                assert!(!used.contains(*d), "{name} must stay I/O-free but uses {d}");
            }
        }
    }
}

/// `use crate::<module>` paths in the Rust files under `dir`.
fn crate_imports(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).expect("read source");
                for (i, _) in text.match_indices("crate::") {
                    let module: String = text[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    found.push((p.clone(), module));
                }
            }
        }
    }
    found
}

#[test]
fn daemon_modules_import_only_downward() {
    let src = repo_root().join("daemon/src");
    // (module, modules of the daemon it must not import, why)
    let rules: &[(&str, &[&str], &str)] = &[
        (
            "store",
            &["pipeline", "server", "gpu", "cli"],
            "the store is a second service: it knows objects, not fetches or engines",
        ),
        (
            "transport",
            &["pipeline", "server", "gpu", "cli"],
            "the QUIC transport moves objects for the pipeline and the store alike",
        ),
        (
            "gpu",
            &["pipeline", "server", "store", "transport", "cli"],
            "the GPU layer decodes and restores; it never learns where bytes came from",
        ),
        (
            "pipeline",
            &["cli", "server"],
            "the fetch and save pipelines are a library, the CLI only starts them; they report \
             typed errors and events, and the server maps them to protocol messages",
        ),
        (
            "server",
            &["cli", "store", "gpu"],
            "the Unix-socket server talks to engines, to stores only through the pipeline, and \
             to GPUs only through the fetch buffers",
        ),
        (
            "buffers",
            &["server", "pipeline", "store", "transport", "cli"],
            "fetch buffers are memory: they write no messages and know no fetch",
        ),
    ];
    for (module, forbidden, why) in rules {
        for (file, used) in crate_imports(&src.join(module)) {
            assert!(
                !forbidden.contains(&used.as_str()),
                "{} imports crate::{used}: {why}",
                file.display()
            );
        }
    }
}

#[test]
fn the_python_package_links_only_the_client() {
    // python/ is its own cargo project (maturin), outside the workspace's metadata.
    let manifest =
        std::fs::read_to_string(repo_root().join("python/Cargo.toml")).expect("python/Cargo.toml");
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .expect("a [dependencies] table")
        .split("\n[")
        .next()
        .unwrap_or_default();
    assert!(deps.contains("path = \"../client-rs\""), "{deps}");
    for forbidden in ["../daemon", "../codec", "../kv\"", "../tools"] {
        assert!(
            !deps.contains(forbidden),
            "the Python package links {forbidden}: clients stay free of the daemon and the codec"
        );
    }
}

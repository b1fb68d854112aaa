//! The committed `include/kvfetcher.h` must be exactly what cbindgen generates from this crate
//! (with the pinned version named in `client-c/cbindgen.toml`).

use kvfetcher_testkit::{skip, Missing};
use std::path::Path;
use std::process::Command;

/// The cbindgen version the committed header was generated with.
const PINNED: &str = "0.29.4";

#[test]
fn committed_header_matches_a_fresh_generation() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let version = match Command::new("cbindgen").arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            skip(
                Missing::Tool,
                format!("cbindgen not installed (cargo install cbindgen --version {PINNED})"),
            );
            return;
        }
    };
    if version != format!("cbindgen {PINNED}") {
        skip(
            Missing::Tool,
            format!("{version} installed, the header is pinned to cbindgen {PINNED}"),
        );
        return;
    }
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new("cbindgen")
        .arg("--config")
        .arg(crate_dir.join("cbindgen.toml"))
        .args(["--crate", "kvfetcher-c", "--quiet", "--output"])
        .arg(out.path())
        .arg(crate_dir)
        .status()
        .unwrap();
    assert!(status.success(), "cbindgen failed");
    let fresh = std::fs::read_to_string(out.path()).unwrap();
    let committed = std::fs::read_to_string(crate_dir.join("../include/kvfetcher.h")).unwrap();
    assert!(
        fresh == committed,
        "include/kvfetcher.h is stale: regenerate it with\n  cbindgen --config client-c/cbindgen.toml \
         --crate kvfetcher-c --output include/kvfetcher.h client-c"
    );
}

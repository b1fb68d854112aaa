//! How KVFetcher's tests skip. A test whose prerequisite is missing prints `skipped: <why>` and
//! passes on a dev box; where the prerequisite is promised, the same skip is a failure:
//!
//! - a GPU (driver, device, NVDEC) under `KVF_REQUIRE_GPU=1`, which `scripts/gpu-check.sh` sets
//!   on the GPU host;
//! - a tool or library that `make test` installs (x265, libde265, ffprobe, cbindgen, a C
//!   compiler, systemd-analyze) under `CI=true` or `KVF_REQUIRE_TOOLS=1`.
//!
//! A skip for an optional setting (an S3 endpoint, a directory a script passes) stays a skip
//! everywhere: print it plainly.

use std::fmt::Display;

/// What a skipped test lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// An NVIDIA driver, device or decoder.
    Gpu,
    /// A tool or library `make test` installs.
    Tool,
}

impl Missing {
    /// Whether this run promises the prerequisite, so that lacking it is a failure.
    pub fn is_promised(self) -> bool {
        let set = |name: &str, value: &str| std::env::var(name).is_ok_and(|v| v == value);
        match self {
            Missing::Gpu => set("KVF_REQUIRE_GPU", "1"),
            Missing::Tool => set("CI", "true") || set("KVF_REQUIRE_TOOLS", "1"),
        }
    }
}

/// Records that a test skips (or part of it) because `what` is missing, and why; panics where
/// the prerequisite is promised (see the crate doc). The caller returns after it.
#[track_caller]
pub fn skip(what: Missing, why: impl Display) {
    if what.is_promised() {
        panic!("not skipped here ({what:?} is required in this run): {why}");
    }
    println!("skipped: {why}");
}

/// The test data file `name` of the repository's `data/` folder, found when the test runs, not
/// where it was built: in `KVF_DATA_DIR` if set; else in the `data/` folder of the nearest
/// ancestor of the test binary that has one (a checkout's `target/<profile>/deps/`, or a folder
/// of test binaries carried into a checkout on another host); else of the current directory;
/// else of the checkout this crate was built in. Test data is part of the checkout, so a
/// missing file fails the test rather than skipping it.
#[track_caller]
pub fn data_file(name: &str) -> std::path::PathBuf {
    let tried = data_dirs();
    match tried.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
        Some(path) => path,
        None => panic!(
            "{name} is missing: the test data lives in data/ (looked in {})",
            tried
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Where [`data_file`] looks, in order.
fn data_dirs() -> Vec<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("KVF_DATA_DIR") {
        dirs.push(dir.into());
    }
    let mut ancestors_of = |start: Option<PathBuf>| {
        for a in start.iter().flat_map(|s| s.ancestors()) {
            let d = a.join("data");
            if d.is_dir() {
                dirs.push(d);
                return;
            }
        }
    };
    ancestors_of(
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf)),
    );
    ancestors_of(std::env::current_dir().ok());
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data"));
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_found_from_the_test_binary_at_run_time() {
        // The checkout's data/, found by walking up from this binary (target/.../deps/).
        let exe = std::env::current_exe().unwrap();
        let dirs = data_dirs();
        let found = dirs.iter().find(|d| exe.starts_with(d.parent().unwrap()));
        assert!(
            found.is_some(),
            "no data/ above {}: {dirs:?}",
            exe.display()
        );
        let readme = data_file("README.md");
        assert!(
            readme.is_file() && readme.ends_with("data/README.md"),
            "{}",
            readme.display()
        );
    }

    #[test]
    #[should_panic(expected = "is missing")]
    fn a_missing_file_fails() {
        data_file("no-such-file.bin");
    }
}

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

/// The test data file `name` of the repository's `data/` folder. Test data is part of the
/// checkout, so a missing file fails the test rather than skipping it.
#[track_caller]
pub fn data_file(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: the test data lives in data/",
        path.display()
    );
    path
}

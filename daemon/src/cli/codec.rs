//! `kvfetcher encode`, `decode` and `inspect`: chunk object files from and to KV safetensors
//! files, and a readable description of one object.
//!
//! Files on disk, nothing else: no store, no network, no GPU (the `hevc` variant uses x265 and
//! libde265 when they load). One submodule per subcommand; shared helpers here.

mod decode;
mod encode;
mod inspect;

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use kvfetcher_codec::CodecProfile;
use kvfetcher_kv::KvCache;

pub(crate) use decode::{run_decode, DecodeArgs};
pub use encode::registry_for;
pub(crate) use encode::{run_encode, EncodeArgs};
pub use encode::{GroupingArg, VariantArg};
pub(crate) use inspect::{run_inspect, InspectArgs};

/// A progress bar of `len` steps on stderr, hidden when stderr is not a terminal (so logs and
/// tests see no control characters).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta})")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

/// A spinner on stderr for work without steps to count (hidden when stderr is not a terminal).
pub(crate) fn spinner(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// Reads and checks a codec profile file (`kvfetcher-bench profile` writes them).
pub(crate) fn load_profile(path: &std::path::Path) -> anyhow::Result<std::sync::Arc<CodecProfile>> {
    use anyhow::Context;
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let profile = CodecProfile::from_bytes(&bytes)
        .with_context(|| format!("{}: not a usable codec profile", path.display()))?;
    Ok(std::sync::Arc::new(profile))
}

/// Bytes of `cache` as 16-bit values (the size ratios of the codec's reports are against it,
/// whatever the file's dtype).
pub fn bytes_16bit(cache: &KvCache) -> u64 {
    (cache.num_layers() * 2 * cache.tokens() * cache.kv_heads() * cache.head_dim() * 2) as u64
}

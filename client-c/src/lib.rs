//! C ABI over `kvfetcher-client` (see `include/kvfetcher.h`, generated from this crate by
//! cbindgen): opaque `kvf_client` / `kvf_fetch` handles, `kvf_error` codes, and a panic
//! boundary around every exported function.
//!
//! - `types`: the C-visible error enum, layout and shape structs.
//! - `boundary`: panic guard, last-error detail, pointer checks (all raw dereferences).
//! - `api`: the exported functions.

mod api;
mod boundary;
mod types;

pub use api::*;
pub use types::*;

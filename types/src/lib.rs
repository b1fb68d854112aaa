//! Types every KVFetcher crate speaks, defined once: the element type of KV tensors
//! ([`DType`]), which the I/O-free `kv` crate, the chunk format, the local protocol and the
//! clients all name.
//!
//! It depends on nothing but serde, so the clients (Rust, C, Python) use it without pulling in
//! `kv` and `kv` uses it without pulling in the protocol.

mod dtype;

pub use dtype::DType;

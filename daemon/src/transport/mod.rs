//! The store's network side as a client sees it: the wire protocol (sans I/O), TLS
//! configuration, QUIC tuning, chunk-object checks and the QUIC client.
//!
//! The server half lives in `crate::store`; both use the same [`wire`] module, public whole so
//! that tests and the fuzzer can speak the protocol raw.

mod client;
mod object;
mod tls;
mod tuning;
pub mod wire;

pub use client::{ClientOptions, SectionStream, Sections, StoreClient, StoreClientError};
pub(crate) use client::{DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEP_ALIVE};
pub use object::{
    is_profile_object, verify_object, verify_profile_object, verify_stored, ObjectError,
    ObjectInfo, SectionCheck,
};
pub use tls::{
    files as cert_files, generate_dev_pki, load_certs, load_key, write_dev_pki, DevPki,
    ServerTrust, TlsClientConfig, TlsError, TlsServerConfig, DEFAULT_SERVER_NAME,
};
pub(crate) use tuning::{quic_endpoint, transport_config};
pub use tuning::{Congestion, TransportTuning};

//! The store's network side as a client sees it: the wire protocol (sans I/O), TLS
//! configuration, QUIC tuning, chunk-object checks and the QUIC client.
//!
//! The server half lives in `crate::store`; both use the same [`wire`] module.

mod client;
mod object;
mod tls;
mod tuning;
pub mod wire;

pub use client::{
    ClientOptions, SectionStream, Sections, StoreClient, StoreClientError, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KEEP_ALIVE,
};
pub use object::{verify_object, ObjectError, ObjectInfo, SectionCheck};
pub use tls::{
    files as cert_files, generate_dev_pki, load_certs, load_key, write_dev_pki, DevPki,
    ServerTrust, TlsClientConfig, TlsError, TlsServerConfig, ALPN, DEFAULT_SERVER_NAME,
};
pub use tuning::{
    bind_udp, quic_endpoint, transport_config, Congestion, TransportTuning, CONNECTION_WINDOW,
    MTU_UPPER_BOUND, SEND_WINDOW, STREAM_WINDOW, UDP_SOCKET_BUFFER,
};

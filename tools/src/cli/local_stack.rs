//! An embedded store (and optionally daemon) on loopback in a temp dir, with dev certificates:
//! what `kvfetcher-bench demo` and `kvfetcher-bench fetch` run against. Clients authenticate with
//! the dev client certificate (mutual TLS), as a store requires.
//!
//! Everything stops when the [`LocalStore`] (or the caller's shutdown sender) drops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

use kvfetcher::pipeline::StoreTarget;
use kvfetcher::store::{LocalDir, ServerOptions, StoreServer};
use kvfetcher::transport::{
    cert_files, load_certs, write_dev_pki, ClientOptions, TlsClientConfig, TlsServerConfig,
};

/// A running in-process store.
#[derive(Debug)]
pub(crate) struct LocalStore {
    /// Its UDP address.
    pub(crate) addr: SocketAddr,
    /// The directory with its dev CA and certificates.
    pub(crate) certs: PathBuf,
    stop: watch::Sender<bool>,
}

impl LocalStore {
    /// Writes dev certificates under `dir` (once) and starts a store on 127.0.0.1 with data in
    /// `dir/data-<n>`, sending at most `max_rate` bytes per second when set.
    pub(crate) fn start(
        dir: &Path,
        name: &str,
        max_rate: Option<u64>,
    ) -> anyhow::Result<LocalStore> {
        let certs = dir.join("certs");
        if !certs.join("ca.pem").exists() {
            write_dev_pki(&certs).context("writing dev certificates")?;
        }
        let mut tls = TlsServerConfig::from_dir(&certs)?;
        tls.client_ca = Some(load_certs(&certs.join(cert_files::CA))?);
        let backend = Arc::new(LocalDir::open(&dir.join(format!("data-{name}")))?);
        let opts = ServerOptions {
            max_rate,
            ..ServerOptions::default()
        };
        let server = StoreServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &tls, backend, opts)?;
        let addr = server.local_addr();
        let (stop, mut rx) = watch::channel(false);
        tokio::spawn(server.run(async move {
            let _ = rx.changed().await;
        }));
        Ok(LocalStore { addr, certs, stop })
    }

    /// How a pipeline reaches this store.
    pub(crate) fn target(&self) -> anyhow::Result<StoreTarget> {
        Ok(StoreTarget {
            addr: self.addr,
            tls: TlsClientConfig::from_path(&self.certs)?,
            options: ClientOptions::default(),
        })
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

//! TLS for the store's QUIC connections: loading PEM files, dev certificates, server and client
//! rustls configurations (TLS 1.3, ring), CA or certificate pinning, and mutual TLS.
//!
//! There is no "skip verification" mode: a client trusts either a CA or one exact pinned
//! certificate. This module builds configurations; it opens no sockets.

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// ALPN protocol identifier of the store protocol, version 1.
pub(crate) const ALPN: &[u8] = b"kvfetcher-store/1";
/// Server name clients check by default; dev certificates carry it with 127.0.0.1 and ::1.
pub const DEFAULT_SERVER_NAME: &str = "localhost";

/// File names inside a certificate directory, as `--dev-cert` writes them.
pub mod files {
    /// The CA certificate that signed the server and client certificates.
    pub const CA: &str = "ca.pem";
    /// The server certificate chain.
    pub const CERT: &str = "cert.pem";
    /// The server private key.
    pub const KEY: &str = "key.pem";
    /// A client certificate for mutual TLS.
    pub const CLIENT_CERT: &str = "client-cert.pem";
    /// The client certificate's private key.
    pub const CLIENT_KEY: &str = "client-key.pem";
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds no certificate or no private key.
    #[error("{0}: no usable pem item")]
    Empty(PathBuf),
    /// A certificate directory holds neither `ca.pem` nor `cert.pem`.
    #[error("{0}: neither ca.pem nor cert.pem found")]
    NoTrust(PathBuf),
    /// rustls refused the configuration (bad key, bad certificate).
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The rustls configuration is not usable for QUIC.
    #[error("quic tls: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
    /// Writing generated files failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = fs::File::open(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty(path.into()));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = fs::File::open(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty(path.into()))
}

/// The server's identity and, for mutual TLS, the CA its clients' certificates must chain to.
#[derive(Debug)]
pub struct TlsServerConfig {
    /// The server certificate chain, leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The server private key.
    pub key: PrivateKeyDer<'static>,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<Vec<CertificateDer<'static>>>,
}

impl TlsServerConfig {
    /// Loads `cert.pem` and `key.pem` from `dir`, without client authentication.
    pub fn from_dir(dir: &Path) -> Result<TlsServerConfig, TlsError> {
        Self::from_files(&dir.join(files::CERT), &dir.join(files::KEY), None)
    }

    /// Loads a certificate chain, a key and optionally a client CA for mutual TLS.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<TlsServerConfig, TlsError> {
        Ok(TlsServerConfig {
            cert_chain: load_certs(cert)?,
            key: load_key(key)?,
            client_ca: client_ca.map(load_certs).transpose()?,
        })
    }

    /// Builds the quinn server crypto configuration.
    pub fn quic(&self) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(cas) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in cas {
                    roots.add(ca.clone())?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder.with_single_cert(self.cert_chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.max_early_data_size = 0;
        Ok(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(
            cfg,
        )?))
    }
}

/// How a client decides that the server is the right one.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// The server's chain must lead to one of these CA certificates, for the server name.
    Ca(Vec<CertificateDer<'static>>),
    /// The server's leaf certificate must be exactly one of these.
    Pinned(Vec<CertificateDer<'static>>),
}

/// Everything a client needs to reach a store: trust, optional client identity and token.
#[derive(Debug)]
pub struct TlsClientConfig {
    /// How the server is verified.
    pub trust: ServerTrust,
    /// A client certificate chain and key for mutual TLS.
    pub client_identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    /// The name checked against the server certificate ([`DEFAULT_SERVER_NAME`] by default).
    pub server_name: String,
    /// A bearer token sent once per connection when the store requires one.
    pub token: Option<Vec<u8>>,
}

impl Clone for TlsClientConfig {
    fn clone(&self) -> Self {
        TlsClientConfig {
            trust: self.trust.clone(),
            client_identity: self
                .client_identity
                .as_ref()
                .map(|(c, k)| (c.clone(), k.clone_key())),
            server_name: self.server_name.clone(),
            token: self.token.clone(),
        }
    }
}

impl TlsClientConfig {
    /// Trust from a directory or a file: a directory with `ca.pem` trusts that CA, else its
    /// `cert.pem` is pinned; a file is read as a CA bundle. A directory's `client-cert.pem` and
    /// `client-key.pem`, when both present, become the client identity for mutual TLS.
    pub fn from_path(path: &Path) -> Result<TlsClientConfig, TlsError> {
        let mut client_identity = None;
        let trust = if path.is_dir() {
            let (cc, ck) = (path.join(files::CLIENT_CERT), path.join(files::CLIENT_KEY));
            if cc.is_file() && ck.is_file() {
                client_identity = Some((load_certs(&cc)?, load_key(&ck)?));
            }
            if path.join(files::CA).is_file() {
                ServerTrust::Ca(load_certs(&path.join(files::CA))?)
            } else if path.join(files::CERT).is_file() {
                ServerTrust::Pinned(load_certs(&path.join(files::CERT))?)
            } else {
                return Err(TlsError::NoTrust(path.into()));
            }
        } else {
            ServerTrust::Ca(load_certs(path)?)
        };
        Ok(TlsClientConfig {
            trust,
            client_identity,
            server_name: DEFAULT_SERVER_NAME.into(),
            token: None,
        })
    }

    /// Builds the quinn client crypto configuration.
    pub fn quic(&self) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, TlsError> {
        ServerName::try_from(self.server_name.as_str())
            .map_err(|_| TlsError::ServerName(self.server_name.clone()))?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match &self.trust {
            ServerTrust::Ca(cas) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in cas {
                    roots.add(ca.clone())?;
                }
                builder.with_root_certificates(roots)
            }
            ServerTrust::Pinned(certs) => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                        pinned: certs.clone(),
                        provider: provider(),
                    }))
            }
        };
        let mut cfg = match &self.client_identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder.with_client_auth_cert(chain.clone(), key.clone_key())?,
        };
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(
            cfg,
        )?))
    }
}

/// Accepts exactly the pinned leaf certificates, and checks handshake signatures with them.
#[derive(Debug)]
struct PinnedVerifier {
    pinned: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// PEM text of a freshly generated development PKI.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The CA certificate.
    pub ca_pem: String,
    /// The server certificate (for `localhost`, `127.0.0.1`, `::1`).
    pub cert_pem: String,
    /// The server key.
    pub key_pem: String,
    /// A client certificate signed by the same CA.
    pub client_cert_pem: String,
    /// The client key.
    pub client_key_pem: String,
}

/// Generates a CA, a loopback server certificate and a client certificate, for dev and tests.
pub fn generate_dev_pki() -> Result<DevPki, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kvfetcher dev ca");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;

    let leaf = |names: Vec<String>,
                cn: &str,
                eku: ExtendedKeyUsagePurpose|
     -> Result<(String, String), TlsError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let names = vec![
        DEFAULT_SERVER_NAME.to_string(),
        "127.0.0.1".into(),
        "::1".into(),
    ];
    let (cert_pem, key_pem) = leaf(
        names,
        "kvfetcher store",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert_pem, client_key_pem) = leaf(
        vec!["kvfetcher-client".into()],
        "kvfetcher client",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    Ok(DevPki {
        ca_pem: ca.pem(),
        cert_pem,
        key_pem,
        client_cert_pem,
        client_key_pem,
    })
}

/// Generates a dev PKI and writes it into `dir` (created if needed); keys get mode 0600.
pub fn write_dev_pki(dir: &Path) -> Result<DevPki, TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let pki = generate_dev_pki()?;
    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.into(),
        source,
    })?;
    let items = [
        (files::CA, &pki.ca_pem, 0o644),
        (files::CERT, &pki.cert_pem, 0o644),
        (files::KEY, &pki.key_pem, 0o600),
        (files::CLIENT_CERT, &pki.client_cert_pem, 0o644),
        (files::CLIENT_KEY, &pki.client_key_pem, 0o600),
    ];
    for (name, text, mode) in items {
        let path = dir.join(name);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let _ = fs::remove_file(&path);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        };
        write().map_err(|source| TlsError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(pki)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pki_loads_into_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        write_dev_pki(dir.path()).unwrap();
        let server = TlsServerConfig::from_dir(dir.path()).unwrap();
        server.quic().unwrap();
        let client = TlsClientConfig::from_path(dir.path()).unwrap();
        assert!(matches!(client.trust, ServerTrust::Ca(_)));
        assert!(client.client_identity.is_some());
        client.quic().unwrap();
        // Without ca.pem, the server certificate is pinned.
        fs::remove_file(dir.path().join(files::CA)).unwrap();
        let pinned = TlsClientConfig::from_path(dir.path()).unwrap();
        assert!(matches!(pinned.trust, ServerTrust::Pinned(_)));
    }

    #[test]
    fn missing_or_empty_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            TlsClientConfig::from_path(dir.path()),
            Err(TlsError::NoTrust(_))
        ));
        fs::write(dir.path().join("cert.pem"), "not pem").unwrap();
        assert!(matches!(
            TlsServerConfig::from_dir(dir.path()),
            Err(TlsError::Empty(_))
        ));
    }
}

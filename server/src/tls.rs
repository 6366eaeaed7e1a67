//! TLS for a node's TCP listeners (and for its own clients): rustls
//! configurations built from PEM files, re-read when the files change, with
//! optional client certificates checked against a CA and a list of allowed
//! identities.
//!
//! - **Server side** ([`TlsSource`]): a listener's certificate chain, key,
//!   optional client CA (mutual TLS) and allowed client names. TLS 1.2 and
//!   1.3 only. The files are checked every reload interval; when any
//!   changed, a new configuration is built and used for every later
//!   handshake (established connections keep theirs). A file that fails to
//!   parse keeps the previous configuration and is reported in the log and
//!   in a counter: a rotation half-written never takes a listener down
//!   (`crate::reload`, shared with the cluster's and clients' TLS and with
//!   token files).
//! - **Allowed clients**: with a client CA, a client must present a
//!   certificate issued by it; with allowed names too, its subject's common
//!   name or one of its subject alternative names (DNS, e-mail, URI, IP)
//!   must be on the list. A refused client gets a TLS alert during the
//!   handshake (`bad certificate` or `access denied`), never a hang.
//! - **Client side** ([`client_config`]): a CA to verify the server and an
//!   optional certificate and key to present.
//!
//! Invariant: a configuration in use was built completely from one reading
//! of the files; nothing here reads a file during a handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tracing::warn;

use crate::reload::Reloading;

pub use crate::config::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {message}")]
    File { what: &'static str, path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(what: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::File { what, path: path.to_path_buf(), message: message.to_string() }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain (at least one certificate).
pub fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(what, path, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_error("TLS key", path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| file_error("TLS key", path, format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")))
}

fn roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in read_certs(what, path)? {
        store.add(cert).map_err(|e| file_error(what, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}

/// The names a certificate identifies its holder by: the subject's common
/// names and its subject alternative names (DNS, e-mail, URI, IP).
pub fn identities(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    let mut names: Vec<String> =
        parsed.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_string)).collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => names.push(s.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()).to_string()),
                    16 => {
                        names.push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()).to_string())
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(names)
}

/// Verifies client certificates with the CA, then checks the holder's
/// identity against the allowed names.
#[derive(Debug)]
struct AllowedClients {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for AllowedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty() {
            return Ok(ClientCertVerified::assertion());
        }
        let names = identities(end_entity)
            .map_err(|e| rustls::Error::General(format!("cannot read the client certificate's names: {e}")))?;
        if names.iter().any(|n| self.allowed.contains(n)) {
            Ok(ClientCertVerified::assertion())
        } else {
            warn!(presented = ?names, "TLS: a client certificate from the trusted CA names no allowed client");
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Builds a server configuration from `files`, offering `alpn`.
pub fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
    let certs = read_certs("TLS certificate", &files.cert)?;
    let key = read_key(&files.key)?;
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots("client CA", ca)?), provider)
                .build()
                .map_err(|e| file_error("client CA", ca, e))?;
            builder
                .with_client_cert_verifier(Arc::new(AllowedClients { inner, allowed: files.allowed_clients.clone() }))
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| file_error("TLS certificate", &files.cert, format!("does not go with its key: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Builds a client configuration: servers verified against `ca`, and
/// `identity` (certificate chain, key) presented when given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots("CA", ca)?);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs("client certificate", cert)?, read_key(key)?)
            .map_err(|e| file_error("client certificate", cert, format!("does not go with its key: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

impl TlsFiles {
    fn paths(&self) -> Vec<PathBuf> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()].into_iter().flatten().cloned().collect()
    }
}

/// A listener's TLS configuration, kept current with its files (the launcher
/// runs its reloader).
pub type TlsSource = Reloading<rustls::ServerConfig>;

/// Reads a listener's files, offering `alpn`; an error here stops the node
/// from starting.
pub fn listener_source(files: TlsFiles, alpn: &'static [&'static [u8]]) -> Result<Arc<TlsSource>, TlsError> {
    let what = format!("TLS of {}", files.cert.display());
    Reloading::load(what, files.paths(), move || server_config(&files, alpn))
}

/// Verifies a peer node's server certificate: issued by the cluster CA
/// (its name is not checked against the dialled address: nodes are
/// dialled by address, and the cluster CA is the cluster's own), and, when
/// `allowed` is set, naming an allowed peer.
#[derive(Debug)]
struct ClusterPeer {
    roots: Arc<RootCertStore>,
    allowed: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for ClusterPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if !self.allowed.is_empty() {
            let names = identities(end_entity)
                .map_err(|e| rustls::Error::General(format!("cannot read the peer certificate's names: {e}")))?;
            if !names.iter().any(|n| self.allowed.contains(n)) {
                warn!(presented = ?names, "TLS: a peer certificate from the cluster CA names no allowed peer");
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ));
            }
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Mutual TLS between the nodes of a cluster, from `files` (`client_ca`:
/// the cluster CA, required; `allowed_clients`: the peers let in, by
/// name; empty: any certificate of the cluster CA). TLS 1.3 (QUIC).
pub fn cluster_tls(files: &TlsFiles) -> Result<armada_net::quic::ClusterTls, TlsError> {
    let ca = files.client_ca.as_ref().ok_or_else(|| TlsError::Config("the cluster CA is missing".into()))?;
    let certs = read_certs("node certificate", &files.cert)?;
    let key = read_key(&files.key)?;
    let roots = Arc::new(roots("cluster CA", ca)?);
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| file_error("cluster CA", ca, e))?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AllowedClients { inner, allowed: files.allowed_clients.clone() }))
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| file_error("node certificate", &files.cert, format!("does not go with its key: {e}")))?;
    let verifier = ClusterPeer { roots, allowed: files.allowed_clients.clone(), provider: provider.clone() };
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(certs, key)
        .map_err(|e| file_error("node certificate", &files.cert, format!("does not go with its key: {e}")))?;
    Ok(armada_net::quic::ClusterTls { server, client })
}

/// The cluster's mutual TLS, kept current with its files: the launcher's
/// reloader hands each new one to the QUIC transport.
pub fn cluster_source(files: TlsFiles) -> Result<Arc<Reloading<armada_net::quic::ClusterTls>>, TlsError> {
    let what = format!("cluster TLS of {}", files.cert.display());
    Reloading::load(what, files.paths(), move || cluster_tls(&files))
}

/// A client's TLS files: the CA that verifies servers, and optionally a
/// certificate and key to present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A client's TLS configuration, kept current with its files (checked
/// whenever a connection is made: `reload_if_changed` before `get`).
pub type ClientTlsSource = Reloading<rustls::ClientConfig>;

/// Reads a client's files, offering `alpn`; an error here stops the start.
pub fn client_source(files: ClientTlsFiles, alpn: &'static [&'static [u8]]) -> Result<Arc<ClientTlsSource>, TlsError> {
    let mut paths = vec![files.ca.clone()];
    if let Some((c, k)) = &files.identity {
        paths.extend([c.clone(), k.clone()]);
    }
    let what = format!("client TLS of {}", files.ca.display());
    Reloading::load(what, paths, move || {
        let identity = files.identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        client_config(&files.ca, identity, alpn)
    })
}

//! TLS on the main listener (SPEC §4.8, `[server.tls]`).
//!
//! - The server's certificate comes from a [`TlsIdentity`]: a resolver over an atomically
//!   swapped certified key. [`TlsIdentity::set`] installs a new chain and key (a rotated
//!   X509-SVID, re-read certificate files) without a restart: handshakes from then on use it,
//!   connections already open keep the session they have.
//! - With `client_auth = "optional"` the server asks for a client certificate. The handshake
//!   only bounds the chain and checks that the client holds the leaf's private key; whether
//!   the chain is an X509-SVID of a configured trust domain is decided per request, against
//!   the bundles of that moment ([`crate::identity::x509`]), so that a refusal is answered
//!   with its OAuth error rather than a TLS alert, and a rotated bundle applies to
//!   connections already open.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::{ClientAuth, ConfigError, TlsConfig};
use crate::identity::bundles::{FileStamp, stamp};
use crate::identity::x509::{MAX_CERT_BYTES, MAX_CHAIN_LEN, check_bounds};

/// Largest certificate chain or key file read.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Why a certificate and key cannot serve.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{path}`: {reason}")]
    Read { path: String, reason: String },
    #[error("`{0}` holds no PEM certificate")]
    NoCertificate(String),
    #[error("`{0}` holds no PEM private key")]
    NoKey(String),
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("the private key cannot be used: {0}")]
    Key(String),
    #[error("the private key does not match the certificate: {0}")]
    Mismatch(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's certificate and key, swapped atomically. Before the first [`set`] (a
/// Workload API that has not answered yet) every handshake fails: the broker never serves
/// TLS with a certificate it was not given.
///
/// [`set`]: TlsIdentity::set
pub struct TlsIdentity {
    current: ArcSwapOption<CertifiedKey>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("set", &self.current.load().is_some())
            .finish()
    }
}

impl TlsIdentity {
    /// An identity with no certificate yet.
    pub fn empty() -> Self {
        TlsIdentity {
            current: ArcSwapOption::empty(),
            provider: provider(),
        }
    }

    /// Installs `chain_der` (leaf first, DER) and its PKCS#8 `key_der` for every handshake
    /// from now on. A key that does not match the leaf is refused and the current identity
    /// keeps serving.
    pub fn set(&self, chain_der: Vec<Vec<u8>>, key_der: Vec<u8>) -> Result<(), TlsError> {
        let chain = chain_der.into_iter().map(CertificateDer::from).collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
        self.install(chain, key)
    }

    fn install(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        if chain.is_empty() {
            return Err(TlsError::EmptyChain);
        }
        let signing = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Key(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| TlsError::Mismatch(e.to_string()))?;
        self.current.store(Some(Arc::new(certified)));
        Ok(())
    }

    /// Reads a PEM certificate chain and a PEM private key (PKCS#8, SEC1 or PKCS#1) and
    /// installs them.
    pub fn set_pem_files(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let cert_pem = read_bounded(cert)?;
        let key_pem = read_bounded(key)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|_| TlsError::NoCertificate(cert.display().to_string()))?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate(cert.display().to_string()));
        }
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|_| TlsError::NoKey(key.display().to_string()))?;
        self.install(chain, key_der)
    }

    /// The certificate chain being served (DER, leaf first), if any.
    pub fn chain(&self) -> Option<Vec<Vec<u8>>> {
        self.current
            .load()
            .as_ref()
            .map(|k| k.cert.iter().map(|c| c.to_vec()).collect())
    }
}

impl ResolvesServerCert for TlsIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    let rerr = |reason: String| TlsError::Read {
        path: path.display().to_string(),
        reason,
    };
    let md = std::fs::metadata(path).map_err(|e| rerr(e.to_string()))?;
    if md.len() > MAX_PEM_BYTES {
        return Err(rerr(format!("larger than {MAX_PEM_BYTES} bytes")));
    }
    std::fs::read(path).map_err(|e| rerr(e.to_string()))
}

/// Asks for a client certificate without requiring one. A presented chain is bounded
/// ([`MAX_CHAIN_LEN`], [`MAX_CERT_BYTES`]) and the handshake signature proves the client
/// holds the leaf's key; the chain itself is judged per request (module docs).
#[derive(Debug)]
struct RequestClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for RequestClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // An empty list: the client may send any certificate (RFC 8446 §4.2.4); the trust
        // domains' authorities change with their bundles.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let too_long = intermediates.len() >= MAX_CHAIN_LEN;
        let too_large = end_entity.len() > MAX_CERT_BYTES || check_bounds(intermediates).is_err();
        if too_long || too_large {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            ));
        }
        Ok(ClientCertVerified::assertion())
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

/// The certificate chain (leaf first) a TLS client presented, as the handshake left it:
/// bounded, the leaf's key proven, NOT yet verified as an X509-SVID.
#[derive(Debug, Clone)]
pub struct PeerChain(pub Arc<[CertificateDer<'static>]>);

impl PeerChain {
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.0
    }
}

/// The main listener's TLS: the acceptor, the identity behind it, and the certificate
/// files it re-reads when they change.
pub struct TlsServer {
    identity: Arc<TlsIdentity>,
    acceptor: tokio_rustls::TlsAcceptor,
    client_auth: bool,
    files: Option<(PathBuf, PathBuf)>,
    stamps: Mutex<(Option<FileStamp>, Option<FileStamp>)>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Builds the listener's TLS from `[server.tls]`, loading the certificate files.
    pub fn from_config(tls: &TlsConfig) -> Result<Self, ConfigError> {
        let identity = Arc::new(TlsIdentity::empty());
        let files = match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                identity.set_pem_files(cert, key).map_err(|e| {
                    let key_named = match e {
                        TlsError::NoKey(_) | TlsError::Key(_) | TlsError::Mismatch(_) => {
                            "server.tls.key"
                        }
                        TlsError::Read { ref path, .. } if Path::new(path) == key.as_path() => {
                            "server.tls.key"
                        }
                        _ => "server.tls.cert",
                    };
                    ConfigError::new(key_named, e.to_string())
                })?;
                Some((cert.clone(), key.clone()))
            }
            _ => None,
        };
        let client_auth = tls.client_auth == ClientAuth::Optional;
        let stamps = match &files {
            Some((c, k)) => (stamp(c), stamp(k)),
            None => (None, None),
        };
        Ok(TlsServer {
            acceptor: acceptor(identity.clone(), client_auth)
                .map_err(|e| ConfigError::new("server.tls", e.to_string()))?,
            identity,
            client_auth,
            files,
            stamps: Mutex::new(stamps),
        })
    }

    /// The identity the listener serves: [`TlsIdentity::set`] rotates it.
    pub fn identity(&self) -> &Arc<TlsIdentity> {
        &self.identity
    }

    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// True when clients are asked for a certificate (`client_auth = "optional"`).
    pub fn requests_client_certs(&self) -> bool {
        self.client_auth
    }

    /// Re-reads `cert` and `key` when either file changed. A pair that does not load (say,
    /// a certificate written before its key) keeps the current identity serving; it is read
    /// again at the next change.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let Some((cert, key)) = &self.files else {
            return Ok(false);
        };
        let now = (stamp(cert), stamp(key));
        {
            let mut last = self.stamps.lock();
            if *last == now {
                return Ok(false);
            }
            *last = now;
        }
        self.identity.set_pem_files(cert, key)?;
        Ok(true)
    }
}

fn acceptor(
    identity: Arc<TlsIdentity>,
    client_auth: bool,
) -> Result<tokio_rustls::TlsAcceptor, rustls::Error> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = if client_auth {
        builder
            .with_client_cert_verifier(Arc::new(RequestClientCert { provider }))
            .with_cert_resolver(identity)
    } else {
        builder.with_no_client_auth().with_cert_resolver(identity)
    };
    // The server speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

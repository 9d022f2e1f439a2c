//! X509-SVIDs presented as TLS client certificates (SPIFFE X509-SVID specification), verified
//! against the X.509 authorities of the SPIFFE ID's own trust domain.
//!
//! The checks, in order, each bounded before the next does any work:
//! 1. the chain has at most [`MAX_CHAIN_LEN`] certificates of at most [`MAX_CERT_BYTES`] each;
//! 2. the leaf has exactly one URI SAN, and it is a SPIFFE ID with a path (§2, §5.1);
//! 3. the leaf is not a CA (basicConstraints, §4.1) and its keyUsage has `digitalSignature`
//!    and neither `keyCertSign` nor `cRLSign` (§4.3);
//! 4. the chain verifies (signatures, validity at the broker's clock, clientAuth when an EKU
//!    is present) to an X.509 authority of the leaf's trust domain, and of no other.

use base64::Engine;
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use serde::Deserialize;
use spiffe::SpiffeId;
use x509_parser::extensions::ParsedExtension;

/// Most certificates in a presented chain (leaf and intermediates).
pub const MAX_CHAIN_LEN: usize = 8;
/// Largest certificate of a presented chain, in DER bytes.
pub const MAX_CERT_BYTES: usize = 16 * 1024;

/// The X.509 authorities of one trust domain: the `x509-svid` keys of its bundle, each the
/// one certificate of its `x5c` (SPIFFE Trust Domain and Bundle §4.2.2).
#[derive(Debug, Clone, Default)]
pub struct X509Authorities {
    anchors: Vec<TrustAnchor<'static>>,
}

impl X509Authorities {
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// Authorities from DER certificates (as the Workload API streams them).
    pub fn from_der<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> Result<Self, webpki::Error> {
        let mut anchors = Vec::new();
        for der in certs {
            let cert = CertificateDer::from(der);
            anchors.push(webpki::anchor_from_trusted_cert(&cert)?.to_owned());
        }
        Ok(X509Authorities { anchors })
    }
}

#[derive(Deserialize)]
struct RawKeys {
    keys: Vec<serde_json::Value>,
}

/// The `x509-svid` keys of a SPIFFE bundle. Each must carry exactly one certificate in
/// `x5c`; a key that does not, or whose certificate does not parse, is an error: an
/// authority silently dropped would refuse every SVID it issued with no hint why.
pub fn parse_x509_authorities(text: &[u8]) -> Result<X509Authorities, String> {
    let raw: RawKeys = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let mut ders = Vec::new();
    for (i, key) in raw.keys.iter().enumerate() {
        if key.get("use").and_then(|u| u.as_str()) != Some("x509-svid") {
            continue;
        }
        let x5c = key
            .get("x5c")
            .and_then(|v| v.as_array())
            .ok_or_else(|| format!("keys[{i}]: an x509-svid key needs `x5c`"))?;
        let [cert] = x5c.as_slice() else {
            return Err(format!(
                "keys[{i}]: `x5c` of an x509-svid key holds exactly one certificate"
            ));
        };
        let der = cert
            .as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .ok_or_else(|| format!("keys[{i}]: `x5c` is not base64 DER"))?;
        ders.push(der);
    }
    X509Authorities::from_der(ders.iter().map(Vec::as_slice))
        .map_err(|e| format!("an x509-svid certificate does not parse: {e}"))
}

/// Why a presented certificate chain is not an X509-SVID of a configured trust domain.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509SvidError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the certificate chain is longer than {MAX_CHAIN_LEN} certificates")]
    ChainTooLong,
    #[error("a certificate is larger than {MAX_CERT_BYTES} bytes")]
    CertificateTooLarge,
    #[error("the certificate is not well-formed X.509")]
    Malformed,
    #[error("the certificate has no URI SAN with a SPIFFE ID")]
    NoSpiffeId,
    #[error("the certificate has more than one URI SAN")]
    MultipleUriSans,
    #[error("the certificate's URI SAN is not a valid SPIFFE ID")]
    InvalidSpiffeId,
    #[error("the certificate's SPIFFE ID has no path (a trust domain ID is not a workload)")]
    SpiffeIdWithoutPath,
    #[error("the leaf certificate is a CA (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("the leaf certificate has no keyUsage extension")]
    NoKeyUsage,
    #[error("the leaf certificate's keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("the leaf certificate's keyUsage has keyCertSign")]
    KeyCertSign,
    #[error("the leaf certificate's keyUsage has cRLSign")]
    CrlSign,
    #[error("the certificate's trust domain `{0}` has no configured X.509 authorities")]
    UntrustedDomain(String),
    /// The trust domain's bundle source cannot be read now: the broker's problem, not the
    /// caller's (answered 503).
    #[error("the X.509 authorities of trust domain `{0}` are not available: {1}")]
    TrustDomainNotReady(String, String),
    #[error("the certificate has expired")]
    Expired,
    #[error("the certificate is not yet valid")]
    NotYetValid,
    #[error("the certificate does not chain to an X.509 authority of its trust domain")]
    UnknownIssuer,
    #[error("a certificate signature in the chain does not verify")]
    BadSignature,
    #[error("the certificate is not for TLS client authentication (extendedKeyUsage)")]
    NotForClientAuth,
    #[error("the certificate chain is refused: {0}")]
    Chain(String),
}

/// A verified X509-SVID.
#[derive(Debug, Clone)]
pub struct X509Svid {
    pub spiffe_id: SpiffeId,
    /// The leaf's `notAfter` (unix seconds).
    pub not_after: i64,
    /// base64url(SHA-256(leaf DER)): the token's `cnf["x5t#S256"]` (RFC 8705 §3.1).
    pub x5t_s256: String,
}

/// base64url(SHA-256(DER)) of a certificate, unpadded (RFC 8705 §3.1).
pub fn x5t_s256(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

impl X509SvidError {
    /// True when the broker could not decide (its trust source is down): 503, not a refusal.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, X509SvidError::TrustDomainNotReady(..))
    }
}

/// What a trust domain lookup finds: `None` for a trust domain that is not configured,
/// `Some(Err(reason))` for one whose bundle cannot be read now.
pub type AuthoritiesLookup = Option<Result<std::sync::Arc<X509Authorities>, String>>;

/// Verifies `chain` (leaf first) as an X509-SVID at `now` (unix seconds). `authorities`
/// finds the X.509 authorities of a trust domain.
pub fn verify(
    chain: &[CertificateDer<'_>],
    now: i64,
    authorities: impl FnOnce(&str) -> AuthoritiesLookup,
) -> Result<X509Svid, X509SvidError> {
    check_bounds(chain)?;
    let (leaf, intermediates) = chain.split_first().ok_or(X509SvidError::NoCertificate)?;
    let spiffe_id = leaf_spiffe_id(leaf)?;
    let not_after = check_leaf(leaf)?;
    let td = spiffe_id.trust_domain_name();
    let authorities = match authorities(td) {
        None => return Err(X509SvidError::UntrustedDomain(td.to_string())),
        Some(Err(reason)) => {
            return Err(X509SvidError::TrustDomainNotReady(td.to_string(), reason));
        }
        Some(Ok(a)) if a.is_empty() => {
            return Err(X509SvidError::UntrustedDomain(td.to_string()));
        }
        Some(Ok(a)) => a,
    };
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|_| X509SvidError::Malformed)?;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now).unwrap_or(0),
    ));
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &authorities.anchors,
        intermediates,
        time,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(chain_error)?;
    Ok(X509Svid {
        spiffe_id,
        not_after,
        x5t_s256: x5t_s256(leaf),
    })
}

/// The bounds on a presented chain, checked before anything is parsed.
pub fn check_bounds(chain: &[CertificateDer<'_>]) -> Result<(), X509SvidError> {
    if chain.len() > MAX_CHAIN_LEN {
        return Err(X509SvidError::ChainTooLong);
    }
    if chain.iter().any(|c| c.len() > MAX_CERT_BYTES) {
        return Err(X509SvidError::CertificateTooLarge);
    }
    Ok(())
}

fn leaf_spiffe_id(leaf: &[u8]) -> Result<SpiffeId, X509SvidError> {
    use spiffe::cert::error::CertificateError as E;
    let id = spiffe::cert::spiffe_id_from_der(leaf).map_err(|e| match e {
        E::MissingSpiffeId | E::MissingX509Extension(_) => X509SvidError::NoSpiffeId,
        E::MultipleUriSanEntries | E::MultipleSpiffeIds | E::TooManyUriSanEntries { .. } => {
            X509SvidError::MultipleUriSans
        }
        E::InvalidSpiffeId(_) | E::OversizedUriSan { .. } => X509SvidError::InvalidSpiffeId,
        _ => X509SvidError::Malformed,
    })?;
    if id.path().is_empty() {
        return Err(X509SvidError::SpiffeIdWithoutPath);
    }
    Ok(id)
}

/// basicConstraints and keyUsage of the leaf (X509-SVID §4.1, §4.3); returns its `notAfter`.
fn check_leaf(leaf: &[u8]) -> Result<i64, X509SvidError> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|_| X509SvidError::Malformed)?;
    if !rest.is_empty() {
        return Err(X509SvidError::Malformed);
    }
    let mut key_usage = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(b) if b.ca => return Err(X509SvidError::LeafIsCa),
            ParsedExtension::KeyUsage(k) => key_usage = Some(*k),
            ParsedExtension::UnsupportedExtension { .. } | ParsedExtension::ParseError { .. }
                if ext.oid == x509_parser::oid_registry::OID_X509_EXT_BASIC_CONSTRAINTS
                    || ext.oid == x509_parser::oid_registry::OID_X509_EXT_KEY_USAGE =>
            {
                return Err(X509SvidError::Malformed);
            }
            _ => {}
        }
    }
    let ku = key_usage.ok_or(X509SvidError::NoKeyUsage)?;
    if !ku.digital_signature() {
        return Err(X509SvidError::NoDigitalSignature);
    }
    if ku.key_cert_sign() {
        return Err(X509SvidError::KeyCertSign);
    }
    if ku.crl_sign() {
        return Err(X509SvidError::CrlSign);
    }
    Ok(cert.validity().not_after.timestamp())
}

fn chain_error(e: webpki::Error) -> X509SvidError {
    use webpki::Error as W;
    match e {
        W::CertExpired { .. } => X509SvidError::Expired,
        W::CertNotValidYet { .. } => X509SvidError::NotYetValid,
        W::UnknownIssuer => X509SvidError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => X509SvidError::BadSignature,
        W::CaUsedAsEndEntity => X509SvidError::LeafIsCa,
        W::RequiredEkuNotFoundContext(_) => X509SvidError::NotForClientAuth,
        W::BadDer | W::BadDerTime => X509SvidError::Malformed,
        other => X509SvidError::Chain(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    use serde_json::json;

    use super::*;

    fn ca() -> (Issuer<'static, KeyPair>, Vec<u8>) {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "ca");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let key = KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        (Issuer::new(p, key), der)
    }

    fn svid(issuer: &Issuer<'static, KeyPair>, id: &str) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, issuer).unwrap().der().to_vec()
    }

    fn bundle(keys: serde_json::Value) -> Result<X509Authorities, String> {
        parse_x509_authorities(json!({ "keys": keys }).to_string().as_bytes())
    }

    #[test]
    fn bounds_come_before_any_parsing() {
        let junk = CertificateDer::from(vec![0u8; 10]);
        let long: Vec<_> = (0..=MAX_CHAIN_LEN).map(|_| junk.clone()).collect();
        let none = |_: &str| -> AuthoritiesLookup { unreachable!() };
        assert_eq!(
            verify(&long, 0, none).unwrap_err(),
            X509SvidError::ChainTooLong
        );
        let big = [CertificateDer::from(vec![0u8; MAX_CERT_BYTES + 1])];
        assert_eq!(
            verify(&big, 0, none).unwrap_err(),
            X509SvidError::CertificateTooLarge
        );
        assert_eq!(
            verify(&[], 0, none).unwrap_err(),
            X509SvidError::NoCertificate
        );
        assert_eq!(
            verify(&[junk], 0, none).unwrap_err(),
            X509SvidError::Malformed
        );
    }

    #[test]
    fn a_leaf_verifies_against_its_own_trust_domain_only() {
        let (issuer, ca_der) = ca();
        let leaf = CertificateDer::from(svid(&issuer, "spiffe://example.org/agent"));
        let auth = Arc::new(X509Authorities::from_der([ca_der.as_slice()]).unwrap());
        let now = 1_900_000_000;
        let ok = verify(std::slice::from_ref(&leaf), now, |td| {
            (td == "example.org").then(|| Ok(auth.clone()))
        })
        .unwrap();
        assert_eq!(ok.spiffe_id.to_string(), "spiffe://example.org/agent");
        assert_eq!(ok.x5t_s256, x5t_s256(&leaf));
        // The same authority configured for another trust domain does not count.
        let err = verify(std::slice::from_ref(&leaf), now, |td| {
            (td == "other.org").then(|| Ok(auth.clone()))
        })
        .unwrap_err();
        assert_eq!(err, X509SvidError::UntrustedDomain("example.org".into()));
        // A trust domain with no X.509 authorities refuses as an unconfigured one.
        let empty = Arc::new(X509Authorities::default());
        let err = verify(std::slice::from_ref(&leaf), now, |_| {
            Some(Ok(empty.clone()))
        })
        .unwrap_err();
        assert_eq!(err, X509SvidError::UntrustedDomain("example.org".into()));
        // A trust domain whose source is down cannot decide: unavailable, not refused.
        let err = verify(&[leaf], now, |_| Some(Err("agent down".into()))).unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }

    #[test]
    fn bundle_x509_keys_must_carry_one_certificate() {
        let (_, der) = ca();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        assert_eq!(
            bundle(json!([{"use": "x509-svid", "x5c": [b64]}, {"use": "jwt-svid"}]))
                .unwrap()
                .len(),
            1
        );
        let cases = [
            (
                json!([{"use": "x509-svid"}]),
                "keys[0]: an x509-svid key needs `x5c`",
            ),
            (
                json!([{"use": "jwt-svid"}, {"use": "x509-svid", "x5c": [b64, b64]}]),
                "keys[1]: `x5c` of an x509-svid key holds exactly one certificate",
            ),
            (
                json!([{"use": "x509-svid", "x5c": []}]),
                "keys[0]: `x5c` of an x509-svid key holds exactly one certificate",
            ),
            (
                json!([{"use": "x509-svid", "x5c": ["%%%"]}]),
                "keys[0]: `x5c` is not base64 DER",
            ),
            (
                json!([{"use": "x509-svid", "x5c": ["AAAA"]}]),
                "an x509-svid certificate does not parse",
            ),
        ];
        for (keys, want) in cases {
            let err = bundle(keys).unwrap_err();
            assert!(err.starts_with(want), "{err}");
        }
    }
}

//! TLS on the main listener, X509-SVIDs as TLS client certificates, certificate-bound tokens
//! (RFC 8705) and client credentials (RFC 6749 §4.4, RFC 7523, SPEC §4.5, §4.8), over real
//! sockets with certificates minted here.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};
use writ::domain::Clock;

use crate::helpers::*;

pub const CLIENT_CREDENTIALS: &str = "client_credentials";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub const OTHER_TD: &str = "other.org";

/// Policies that only an mTLS-bound X509-SVID request satisfies.
const MTLS_POLICY: &str = r#"
@id("mtls-only")
permit (
  principal in Writ::TrustDomain::"example.org",
  action == Writ::Action::"exchange",
  resource == Writ::Scope::"vault:unseal"
) when { context.binding == "mtls" && context.source == "x509-svid" };
"#;

/// A certificate authority: a trust domain's X.509 authority, or the server's issuer.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub der: Vec<u8>,
    pub pem: String,
    pub key_pem: String,
}

/// A certificate and its key.
pub struct Leaf {
    pub der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    /// base64url(SHA-256(DER)): what `cnf["x5t#S256"]` must be.
    pub fn x5t(&self) -> String {
        URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &self.der))
    }

    pub fn identity(&self) -> reqwest::Identity {
        reqwest::Identity::from_pem(format!("{}{}", self.cert_pem, self.key_pem).as_bytes())
            .unwrap()
    }
}

fn ca_params(uri: Option<&str>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(
        DnType::CommonName,
        format!("{} CA", uri.unwrap_or("server")),
    );
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    if let Some(u) = uri {
        p.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())];
    }
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2090, 1, 1);
    p
}

impl Ca {
    /// The X.509 authority of trust domain `td`.
    pub fn new(td: &str) -> Ca {
        Self::from_params(ca_params(Some(&format!("spiffe://{td}"))))
    }

    fn from_params(params: CertificateParams) -> Ca {
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate with `params`, signed by this authority.
    pub fn issue(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A well-formed X509-SVID for `spiffe_id`.
    pub fn svid(&self, spiffe_id: &str) -> Leaf {
        self.issue(svid_params(&[spiffe_id]))
    }

    /// The bundle key of this authority (`use` x509-svid, its certificate in `x5c`).
    pub fn bundle_key(&self) -> Value {
        json!({"kty": "EC", "use": "x509-svid", "x5c": [STANDARD.encode(&self.der)]})
    }
}

/// The parameters of a well-formed X509-SVID leaf with these URI SANs.
pub fn svid_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "workload");
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2090, 1, 1);
    p
}

/// The server certificate of 127.0.0.1.
fn server_leaf(ca: &Ca) -> Leaf {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "writ.test");
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2090, 1, 1);
    ca.issue(p)
}

/// A broker serving TLS, asking for client certificates, whose trust domain `example.org`
/// has `td_ca` as X.509 authority and whose trust domain `other.org` has `other_ca`.
pub struct MtlsApp {
    pub app: TestApp,
    pub server_ca: Ca,
    pub td_ca: Ca,
    pub other_ca: Ca,
    pub files: tempfile::TempDir,
}

pub async fn spawn_mtls() -> MtlsApp {
    spawn_mtls_with(Options::default()).await
}

pub async fn spawn_mtls_with(mut opts: Options) -> MtlsApp {
    let files = tempfile::tempdir().unwrap();
    let server_ca = Ca::from_params(ca_params(None));
    let td_ca = Ca::new(TD);
    let other_ca = Ca::new(OTHER_TD);
    let server = server_leaf(&server_ca);
    let cert = files.path().join("server.pem");
    let key = files.path().join("server.key");
    std::fs::write(&cert, &server.cert_pem).unwrap();
    std::fs::write(&key, &server.key_pem).unwrap();
    let other_bundle = files.path().join("other.json");
    std::fs::write(
        &other_bundle,
        json!({"keys": [other_ca.bundle_key()]}).to_string(),
    )
    .unwrap();
    opts.server_extra = format!(
        "{}\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_auth = \"optional\"\n",
        opts.server_extra,
        cert.display(),
        key.display()
    );
    opts.extra_config = format!(
        "{}\n[[spiffe.trust_domains]]\nname = \"{OTHER_TD}\"\nbundle_file = \"{}\"\naudience = \"{AUD}\"\n",
        opts.extra_config,
        other_bundle.display()
    );
    opts.bundle_extra_keys.push(td_ca.bundle_key());
    opts.extra_policy = format!("{}\n{MTLS_POLICY}", opts.extra_policy);
    let app = spawn_app_with(opts).await;
    MtlsApp {
        app,
        server_ca,
        td_ca,
        other_ca,
        files,
    }
}

impl MtlsApp {
    /// A client that trusts the server's CA and presents `leaf`, if given.
    pub fn client(&self, leaf: Option<&Leaf>) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.server_ca.pem.as_bytes()).unwrap(),
            )
            .tls_info(true)
            .timeout(Duration::from_secs(10));
        if let Some(l) = leaf {
            b = b.identity(l.identity());
        }
        b.build().unwrap()
    }

    pub async fn post(
        &self,
        client: &reqwest::Client,
        path: &str,
        form: &[(&str, &str)],
    ) -> (u16, Value) {
        let resp = client
            .post(format!("{}{path}", self.app.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(form).unwrap())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// An exchange with no subject_token: the client certificate is the subject.
    pub async fn cert_exchange(
        &self,
        leaf: Option<&Leaf>,
        scope: &str,
        extra: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut form = vec![("grant_type", GRANT), ("scope", scope), ("audience", API)];
        form.extend_from_slice(extra);
        self.post(&self.client(leaf), "/oauth2/token", &form).await
    }

    /// Client credentials authenticated by the client certificate.
    pub async fn tls_client_auth(
        &self,
        leaf: Option<&Leaf>,
        scope: &str,
        extra: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut form = vec![
            ("grant_type", CLIENT_CREDENTIALS),
            ("scope", scope),
            ("audience", API),
        ];
        form.extend_from_slice(extra);
        self.post(&self.client(leaf), "/oauth2/token", &form).await
    }
}

/// The first decision record after the first `since` whose reason starts with `prefix`,
/// waited for.
pub async fn wait_record(app: &TestApp, since: usize, prefix: &str) -> Value {
    let start = std::time::Instant::now();
    loop {
        if let Some(r) = app
            .audit_records()
            .into_iter()
            .skip(since)
            .find(|r| r["reason"].as_str().is_some_and(|s| s.starts_with(prefix)))
        {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no decision record `{prefix}…` in:\n{}",
            app.audit_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_exchange_over_mtls_binds_the_token_to_the_x509_svid() {
    let m = spawn_mtls().await;
    let leaf = m.td_ca.svid(AGENT);
    let (s, v) = m.cert_exchange(Some(&leaf), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    let token = v["access_token"].as_str().unwrap();
    let claims = claims_of(token);
    assert_eq!(claims["sub"], AGENT);
    assert_eq!(claims["client_id"], AGENT);
    assert_eq!(claims["cnf"], json!({"x5t#S256": leaf.x5t()}));
    // The thumbprint is of the DER the client sent, computed here independently.
    assert_eq!(leaf.x5t().len(), 43);

    let intro = m.app.introspect(token).await;
    assert_eq!(intro["active"], true);
    assert_eq!(intro["cnf"]["x5t#S256"], leaf.x5t());
    assert_eq!(intro["token_type"], "Bearer");

    let rec = m
        .app
        .audit_records()
        .into_iter()
        .rev()
        .find(|r| r["event"] == "exchange" && r["decision"] == "allow")
        .unwrap();
    assert_eq!(rec["subject"], AGENT);
    assert_eq!(rec["detail"]["source"], "x509-svid");
    assert_eq!(rec["detail"]["x5t#S256"], leaf.x5t());

    // The task records how its owner authenticated.
    let (s, task) = m
        .app
        .call(
            reqwest::Method::GET,
            &format!("/v1/tasks/{}", v["task_id"].as_str().unwrap()),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200, "{task}");
}

#[tokio::test]
async fn policy_sees_the_x509_svid_source_and_the_mtls_binding() {
    let m = spawn_mtls().await;
    let leaf = m.td_ca.svid(AGENT);
    let (s, v) = m.cert_exchange(Some(&leaf), "vault:unseal", &[]).await;
    assert_eq!(s, 200, "{v}");
    // The same subject with a JWT-SVID over TLS without a client certificate: unbound.
    let svid = m.app.svid(AGENT);
    let form = [
        ("grant_type", GRANT),
        ("subject_token", svid.as_str()),
        ("subject_token_type", JWT_TYPE),
        ("scope", "vault:unseal"),
        ("audience", API),
    ];
    let (s, v) = m.post(&m.client(None), "/oauth2/token", &form).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_scope")),
        "{v}"
    );
    // A JWT-SVID subject over mTLS is bound (binding mtls) but its source is jwt-svid.
    let (s, v) = m.post(&m.client(Some(&leaf)), "/oauth2/token", &form).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_scope")),
        "{v}"
    );
}

#[tokio::test]
async fn a_jwt_svid_subject_over_mtls_is_bound_to_the_certificate() {
    let m = spawn_mtls().await;
    let leaf = m.td_ca.svid("spiffe://example.org/agent/other");
    let svid = m.app.svid(AGENT);
    let form = [
        ("grant_type", GRANT),
        ("subject_token", svid.as_str()),
        ("subject_token_type", JWT_TYPE),
        ("scope", "repo:read"),
        ("audience", API),
    ];
    let (s, v) = m.post(&m.client(Some(&leaf)), "/oauth2/token", &form).await;
    assert_eq!(s, 200, "{v}");
    let claims = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(claims["sub"], AGENT);
    assert_eq!(claims["cnf"]["x5t#S256"], leaf.x5t());
    // Without a client certificate: a bearer token, as before.
    let (s, v) = m.post(&m.client(None), "/oauth2/token", &form).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        claims_of(v["access_token"].as_str().unwrap())
            .get("cnf")
            .is_none()
    );
    // A DPoP proof and a client certificate together: one binding only.
    let resp = m
        .client(Some(&leaf))
        .post(format!("{}/oauth2/token", m.app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("dpop", "x.y.z")
        .body(serde_urlencoded::to_string(form).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "invalid_request", "{v}");
}

#[tokio::test]
async fn without_subject_token_or_certificate_the_exchange_is_refused() {
    let m = spawn_mtls().await;
    let (s, v) = m.cert_exchange(None, "repo:read", &[]).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    // subject_token_type without subject_token is malformed, certificate or not.
    let leaf = m.td_ca.svid(AGENT);
    let (s, v) = m
        .cert_exchange(
            Some(&leaf),
            "repo:read",
            &[("subject_token_type", JWT_TYPE)],
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
}

#[tokio::test]
async fn a_task_keeps_the_certificate_binding_of_its_first_token() {
    let m = spawn_mtls().await;
    let leaf = m.td_ca.svid(AGENT);
    let (s, v) = m.cert_exchange(Some(&leaf), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    let task = v["task_id"].as_str().unwrap().to_string();
    // The same certificate mints into the task.
    let (s, v) = m
        .cert_exchange(Some(&leaf), "repo:read", &[("task_id", task.as_str())])
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        claims_of(v["access_token"].as_str().unwrap())["cnf"]["x5t#S256"],
        leaf.x5t()
    );
    // Another valid X509-SVID of the same workload (a rotated one) is another key.
    let rotated = m.td_ca.svid(AGENT);
    let (s, v) = m
        .cert_exchange(Some(&rotated), "repo:read", &[("task_id", task.as_str())])
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
    // The owner's JWT-SVID without a certificate: unbound, refused.
    let svid = m.app.svid(AGENT);
    let form = [
        ("grant_type", GRANT),
        ("subject_token", svid.as_str()),
        ("subject_token_type", JWT_TYPE),
        ("scope", "repo:read"),
        ("audience", API),
        ("task_id", task.as_str()),
    ];
    let (s, v) = m.post(&m.client(None), "/oauth2/token", &form).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
    // And the same JWT-SVID over mTLS with the task's certificate is accepted.
    let (s, v) = m.post(&m.client(Some(&leaf)), "/oauth2/token", &form).await;
    assert_eq!(s, 200, "{v}");
}

/// The defective certificates, each with the reason the decision log must give.
fn defects(m: &MtlsApp) -> Vec<(&'static str, Leaf, &'static str)> {
    let mut expired = svid_params(&[AGENT]);
    expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let mut not_yet = svid_params(&[AGENT]);
    not_yet.not_before = rcgen::date_time_ymd(2089, 1, 1);
    let mut ca_leaf = svid_params(&[AGENT]);
    ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let mut no_uri = svid_params(&[]);
    no_uri.subject_alt_names = vec![SanType::DnsName("agent.example.org".try_into().unwrap())];
    let mut cert_sign = svid_params(&[AGENT]);
    cert_sign.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    let mut crl_sign = svid_params(&[AGENT]);
    crl_sign.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
    let mut no_digital = svid_params(&[AGENT]);
    no_digital.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    let mut no_ku = svid_params(&[AGENT]);
    no_ku.key_usages = vec![];
    let mut server_only = svid_params(&[AGENT]);
    server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let self_signed = Ca::from_params(svid_params(&[AGENT]));
    let self_signed = Leaf {
        der: self_signed.der.clone(),
        cert_pem: self_signed.pem.clone(),
        key_pem: self_signed.key_pem.clone(),
    };
    let unknown_td = Ca::new("unknown.org");
    vec![
        (
            "expired",
            m.td_ca.issue(expired),
            "the certificate has expired",
        ),
        (
            "not yet valid",
            m.td_ca.issue(not_yet),
            "the certificate is not yet valid",
        ),
        (
            "wrong trust domain",
            unknown_td.svid("spiffe://unknown.org/agent/demo"),
            "the certificate's trust domain `unknown.org` has no configured X.509 authorities",
        ),
        (
            "two URI SANs",
            m.td_ca
                .issue(svid_params(&[AGENT, "spiffe://example.org/agent/two"])),
            "the certificate has more than one URI SAN",
        ),
        (
            "a SPIFFE ID and another URI",
            m.td_ca
                .issue(svid_params(&[AGENT, "https://agent.example.org"])),
            "the certificate has more than one URI SAN",
        ),
        (
            "CA leaf",
            m.td_ca.issue(ca_leaf),
            "the leaf certificate is a CA",
        ),
        (
            "no URI SAN",
            m.td_ca.issue(no_uri),
            "the certificate has no URI SAN with a SPIFFE ID",
        ),
        (
            "trust domain ID, no path",
            m.td_ca.svid("spiffe://example.org"),
            "the certificate's SPIFFE ID has no path",
        ),
        (
            "keyCertSign",
            m.td_ca.issue(cert_sign),
            "the leaf certificate's keyUsage has keyCertSign",
        ),
        (
            "cRLSign",
            m.td_ca.issue(crl_sign),
            "the leaf certificate's keyUsage has cRLSign",
        ),
        (
            "no digitalSignature",
            m.td_ca.issue(no_digital),
            "the leaf certificate's keyUsage lacks digitalSignature",
        ),
        (
            "no keyUsage",
            m.td_ca.issue(no_ku),
            "the leaf certificate has no keyUsage extension",
        ),
        (
            "server-only EKU",
            m.td_ca.issue(server_only),
            "the certificate is not for TLS client authentication",
        ),
        (
            "self-signed, not in the bundle",
            self_signed,
            "the certificate does not chain to an X.509 authority of its trust domain",
        ),
        (
            "chains to another trust domain's authority",
            m.other_ca.svid(AGENT),
            "the certificate does not chain to an X.509 authority of its trust domain",
        ),
        (
            "signed by an impostor with the authority's name",
            Ca::new(TD).svid(AGENT),
            "a certificate signature in the chain does not verify",
        ),
    ]
}

#[tokio::test]
async fn defective_x509_svids_are_refused_each_for_its_reason() {
    let m = spawn_mtls().await;
    for (name, leaf, reason) in defects(&m) {
        // A new clock minute: the decision log writes the first refusals of a source in
        // full each minute and summarises the rest.
        m.app.clock.advance(60);
        let since = m.app.audit_records().len();
        // As the subject of an exchange: the subject is not acceptable (RFC 8693 §2.2.2).
        let (s, v) = m.cert_exchange(Some(&leaf), "repo:read", &[]).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (400, Some("invalid_request")),
            "{name}: {v}"
        );
        let rec = wait_record(&m.app, since, "client certificate refused").await;
        let got = rec["reason"].as_str().unwrap();
        assert!(
            got.starts_with(&format!("client certificate refused: {reason}")),
            "{name}: {got}"
        );
        assert_eq!(
            rec["detail"]["client_certificate_x5t#S256"],
            leaf.x5t(),
            "{name}"
        );
        // As a client's authentication: 401 invalid_client (RFC 6749 §5.2).
        let (s, v) = m.tls_client_auth(Some(&leaf), "repo:read", &[]).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (401, Some("invalid_client")),
            "{name}: {v}"
        );
        // Nothing was issued for it.
        assert!(
            !m.app
                .audit_records()
                .iter()
                .any(|r| r["decision"] == "allow" && r["detail"]["x5t#S256"] == leaf.x5t()),
            "{name}"
        );
    }
    // The same authority's well-formed SVID still passes.
    let (s, v) = m
        .cert_exchange(Some(&m.td_ca.svid(AGENT)), "repo:read", &[])
        .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn an_x509_svid_expires_on_the_brokers_clock() {
    let m = spawn_mtls().await;
    let mut p = svid_params(&[AGENT]);
    p.not_after = rcgen::date_time_ymd(2090, 1, 1);
    let leaf = m.td_ca.issue(p);
    let (s, v) = m.cert_exchange(Some(&leaf), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    // Past notAfter on the broker's clock, the same certificate on a new connection and on
    // a kept-alive one is refused.
    let client = m.client(Some(&leaf));
    let form = [
        ("grant_type", GRANT),
        ("scope", "repo:read"),
        ("audience", API),
    ];
    let (s, _) = m.post(&client, "/oauth2/token", &form).await;
    assert_eq!(s, 200);
    // 2091-01-01T00:00:00Z
    let until_2091 = 3_818_448_000 - m.app.clock.now();
    m.app.clock.advance(until_2091);
    let (s, v) = m.post(&client, "/oauth2/token", &form).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
}

#[tokio::test]
async fn client_credentials_with_tls_client_auth() {
    let m = spawn_mtls().await;
    let leaf = m.td_ca.svid(AGENT);
    let (s, v) = m
        .tls_client_auth(
            Some(&leaf),
            "repo:read",
            &[("task_purpose", "nightly sync")],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    let claims = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(claims["sub"], AGENT);
    assert_eq!(claims["client_id"], AGENT);
    assert_eq!(claims["cnf"]["x5t#S256"], leaf.x5t());
    let task = v["task_id"].as_str().unwrap().to_string();
    let rec = m
        .app
        .audit_records()
        .into_iter()
        .rev()
        .find(|r| r["decision"] == "allow")
        .unwrap();
    assert_eq!(rec["detail"]["grant_type"], "client_credentials");
    assert_eq!(rec["detail"]["client_auth"], "tls_client_auth");
    assert_eq!(rec["detail"]["source"], "x509-svid");

    // client_id, when given, must be the certificate's SPIFFE ID.
    let (s, v) = m
        .tls_client_auth(
            Some(&leaf),
            "repo:read",
            &[("client_id", AGENT), ("task_id", task.as_str())],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["task_id"], task.as_str());
    let (s, v) = m
        .tls_client_auth(
            Some(&leaf),
            "repo:read",
            &[("client_id", "spiffe://example.org/agent/someone-else")],
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (401, Some("invalid_client")),
        "{v}"
    );
    // No client authentication at all.
    let (s, v) = m.tls_client_auth(None, "repo:read", &[]).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (401, Some("invalid_client")),
        "{v}"
    );
    // Policy still decides: a scope it does not permit.
    let (s, v) = m.tls_client_auth(Some(&leaf), "admin:all", &[]).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_scope")),
        "{v}"
    );
}

/// A JWT-SVID client assertion for `sub` with audience `aud`.
fn assertion(app: &TestApp, sub: &str, aud: &str) -> String {
    app.svid_with(json!({"sub": sub, "aud": [aud]}))
}

async fn assert_client(app: &TestApp, form: &[(&str, &str)]) -> (u16, Value) {
    let (s, v, _) = app.post_form("/oauth2/token", form).await;
    (s, v)
}

#[tokio::test]
async fn client_credentials_with_a_jwt_svid_client_assertion() {
    let app = spawn_app().await;
    for aud in [AUD, "https://writ.test/oauth2/token"] {
        let a = assertion(&app, AGENT, aud);
        let (s, v) = assert_client(
            &app,
            &[
                ("grant_type", CLIENT_CREDENTIALS),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", &a),
                ("scope", "repo:read"),
                ("audience", API),
            ],
        )
        .await;
        assert_eq!(s, 200, "{aud}: {v}");
        let claims = claims_of(v["access_token"].as_str().unwrap());
        assert_eq!(claims["sub"], AGENT);
        assert!(claims.get("cnf").is_none());
    }
    let rec = app
        .audit_records()
        .into_iter()
        .rev()
        .find(|r| r["decision"] == "allow")
        .unwrap();
    assert_eq!(rec["detail"]["client_auth"], "private_key_jwt");
    assert_eq!(rec["detail"]["source"], "jwt-svid");

    let good = assertion(&app, AGENT, AUD);
    let base = |extra: &[(&'static str, &str)]| {
        let mut f: Vec<(&str, String)> = vec![
            ("grant_type", CLIENT_CREDENTIALS.into()),
            ("scope", "repo:read".into()),
            ("audience", API.into()),
        ];
        f.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        f
    };
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "client_id = sub",
            base(&[
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", good.as_str()),
                ("client_id", AGENT),
            ]),
            200,
            "",
        ),
        (
            "client_id is not sub",
            base(&[
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", good.as_str()),
                ("client_id", "spiffe://example.org/agent/x"),
            ]),
            401,
            "invalid_client",
        ),
        (
            "another audience",
            base(&[
                ("client_assertion_type", JWT_BEARER),
                (
                    "client_assertion",
                    assertion(&app, AGENT, "https://elsewhere.example").as_str(),
                ),
            ]),
            401,
            "invalid_client",
        ),
        (
            "expired",
            base(&[
                ("client_assertion_type", JWT_BEARER),
                (
                    "client_assertion",
                    app.svid_with(
                        json!({"exp": app.clock.now() - 3600, "iat": app.clock.now() - 4000}),
                    )
                    .as_str(),
                ),
            ]),
            401,
            "invalid_client",
        ),
        (
            "unknown assertion type",
            base(&[
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
                ),
                ("client_assertion", good.as_str()),
            ]),
            401,
            "invalid_client",
        ),
        (
            "assertion without its type",
            base(&[("client_assertion", good.as_str())]),
            400,
            "invalid_request",
        ),
        (
            "type without an assertion",
            base(&[("client_assertion_type", JWT_BEARER)]),
            400,
            "invalid_request",
        ),
        ("no client authentication", base(&[]), 401, "invalid_client"),
        (
            "a Writ task token is not a client assertion",
            base(&[
                ("client_assertion_type", JWT_BEARER),
                (
                    "client_assertion",
                    app.task_token(AGENT, "repo:read").await.0.as_str(),
                ),
            ]),
            401,
            "invalid_client",
        ),
    ];
    for (name, form, status, code) in cases {
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (s, v) = assert_client(&app, &form).await;
        assert_eq!(s, status, "{name}: {v}");
        if status != 200 {
            assert_eq!(v["error"], code, "{name}: {v}");
        }
    }
}

#[tokio::test]
async fn client_credentials_opens_a_task_like_an_exchange() {
    let app = spawn_app().await;
    let a = assertion(&app, AGENT, AUD);
    let form = |extra: &[(&'static str, &str)]| {
        let mut f: Vec<(&str, String)> = vec![
            ("grant_type", CLIENT_CREDENTIALS.into()),
            ("client_assertion_type", JWT_BEARER.into()),
            ("client_assertion", a.clone()),
        ];
        f.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        f
    };
    let post = |f: Vec<(&'static str, String)>| {
        let app = &app;
        async move {
            let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_client(app, &f).await
        }
    };
    let (s, v) = post(form(&[
        ("scope", "repo:read"),
        ("resource", API),
        ("expires_in", "60"),
        ("task_purpose", "sync"),
    ]))
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["expires_in"], 60);
    let task = v["task_id"].as_str().unwrap().to_string();
    let (s, v) = post(form(&[
        ("scope", "repo:read"),
        ("audience", API),
        ("task_id", task.as_str()),
    ]))
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["task_id"], task.as_str());
    // Escalation beyond the task's first grant is refused as it is for an exchange.
    let (s, v) = post(form(&[
        ("scope", "repo:write"),
        ("audience", API),
        ("task_id", task.as_str()),
    ]))
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_scope")),
        "{v}"
    );
    // A bad audience is invalid_target.
    let (s, v) = post(form(&[("scope", "repo:read"), ("audience", "not a uri")])).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_target")),
        "{v}"
    );
    // Grant types the broker does not have.
    let (s, v, _) = app
        .post_form(
            "/oauth2/token",
            &[("grant_type", "password"), ("scope", "repo:read")],
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("unsupported_grant_type")),
        "{v}"
    );
    // A repeated grant_type is malformed.
    let (s, v, _) = app
        .post_form(
            "/oauth2/token",
            &[
                ("grant_type", CLIENT_CREDENTIALS),
                ("grant_type", CLIENT_CREDENTIALS),
            ],
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
}

#[tokio::test]
async fn metadata_names_the_grants_and_client_authentication() {
    let app = spawn_app().await;
    let (_, md) = app.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(
        md["grant_types_supported"],
        json!([GRANT, CLIENT_CREDENTIALS])
    );
    assert_eq!(
        md["token_endpoint_auth_methods_supported"],
        json!(["none", "private_key_jwt"])
    );
    assert_eq!(md["tls_client_certificate_bound_access_tokens"], false);
    assert!(
        md["token_endpoint_auth_signing_alg_values_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("ES256"))
    );

    let m = spawn_mtls().await;
    let (_, md) = m.app.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(
        md["token_endpoint_auth_methods_supported"],
        json!(["none", "tls_client_auth", "private_key_jwt"])
    );
    assert_eq!(md["tls_client_certificate_bound_access_tokens"], true);
}

#[tokio::test]
async fn tls_without_a_client_certificate_serves_bearer_tokens() {
    let m = spawn_mtls().await;
    let svid = m.app.svid(AGENT);
    let form = [
        ("grant_type", GRANT),
        ("subject_token", svid.as_str()),
        ("subject_token_type", JWT_TYPE),
        ("scope", "repo:read"),
        ("audience", API),
    ];
    let (s, v) = m.post(&m.client(None), "/oauth2/token", &form).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        claims_of(v["access_token"].as_str().unwrap())
            .get("cnf")
            .is_none()
    );
    // Plain HTTP to the TLS listener is not served.
    let addr = m.app.base.trim_start_matches("https://").to_string();
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}

/// The certificate a new connection is served.
async fn served_cert(m: &MtlsApp, client: &reqwest::Client) -> Vec<u8> {
    let resp = client
        .get(format!("{}/healthz", m.app.base))
        .send()
        .await
        .unwrap();
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .unwrap()
        .peer_certificate()
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn the_server_certificate_rotates_without_dropping_connections() {
    let m = spawn_mtls().await;
    let tls = m.app.broker.tls.clone().unwrap();
    let first = served_cert(&m, &m.client(None)).await;
    assert_eq!(tls.identity().chain().unwrap()[0], first);
    // A kept-alive connection opened before the rotation.
    let kept = m.client(None);
    let (s, _) = m.post(&kept, "/oauth2/introspect", &[]).await;
    assert_eq!(s, 401);

    let next = server_leaf(&m.server_ca);
    let key_der = pem::parse(&next.key_pem).unwrap().into_contents();
    tls.identity().set(vec![next.der.clone()], key_der).unwrap();
    assert_eq!(served_cert(&m, &m.client(None)).await, next.der);
    // The connection from before the rotation still answers.
    let (s, _) = m.post(&kept, "/oauth2/introspect", &[]).await;
    assert_eq!(s, 401);

    // A key that is not the certificate's is refused; the current pair keeps serving.
    let stranger = KeyPair::generate().unwrap().serialize_der();
    let err = tls
        .identity()
        .set(vec![server_leaf(&m.server_ca).der], stranger)
        .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    assert_eq!(served_cert(&m, &m.client(None)).await, next.der);
}

#[tokio::test]
async fn rewritten_certificate_files_are_served_to_new_connections() {
    let m = spawn_mtls().await;
    let next = server_leaf(&m.server_ca);
    std::fs::write(m.files.path().join("server.key"), &next.key_pem).unwrap();
    std::fs::write(m.files.path().join("server.pem"), &next.cert_pem).unwrap();
    let start = std::time::Instant::now();
    while served_cert(&m, &m.client(None)).await != next.der {
        assert!(start.elapsed() < Duration::from_secs(5), "not reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_handshake_must_finish_within_the_header_timeout() {
    use tokio::io::AsyncReadExt;
    let m = spawn_mtls_with(Options {
        server_extra: "header_timeout = \"1s\"\nmax_connections = 2\n".into(),
        ..Options::default()
    })
    .await;
    let addr = m.app.base.trim_start_matches("https://").to_string();
    // Two silent connections take both slots; each is closed at the header timeout.
    let t0 = std::time::Instant::now();
    let mut a = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut b = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
        .await
        .expect("a silent TLS connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let _ = tokio::time::timeout(Duration::from_secs(5), b.read(&mut buf)).await;
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    // Then the broker serves TLS clients again.
    let (s, v) = m
        .cert_exchange(Some(&m.td_ca.svid(AGENT)), "repo:read", &[])
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, metrics) = m.app.get("/metrics").await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("writ_http_connections_closed_total{reason=\"header_timeout\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_overlong_client_chain_fails_the_handshake() {
    let m = spawn_mtls().await;
    let leaf = m.td_ca.svid(AGENT);
    // The leaf followed by nine copies of the authority: over the bound of 8.
    let mut pem = leaf.cert_pem.clone();
    for _ in 0..9 {
        pem.push_str(&m.td_ca.pem);
    }
    pem.push_str(&leaf.key_pem);
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(m.server_ca.pem.as_bytes()).unwrap())
        .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = client
        .post(format!("{}/oauth2/token", m.app.base))
        .send()
        .await;
    assert!(r.is_err(), "{r:?}");
    m.app.assert_still_serving().await;
}

fn config_with_tls(tls: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
issuer = "https://writ.test"
[server.tls]
{tls}
[tokens]
signing_keys = ["k.pem"]
[policy]
dir = "p"
[audit]
path = "a.jsonl"
"#
    )
}

#[test]
fn server_tls_keys_are_validated_naming_the_key() {
    let cases = [
        ("key = \"k.pem\"", "server.tls.cert"),
        ("cert = \"c.pem\"", "server.tls.key"),
        (
            "cert = \"c.pem\"\nkey = \"k.pem\"\nclient_auth = \"required\"",
            "server.tls.client_auth",
        ),
        (
            "cert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"",
            "client_ca",
        ),
        (
            "workload_api = \"http://127.0.0.1:8081\"",
            "server.tls.workload_api",
        ),
        (
            "workload_api = \"unix:///run/spire/agent.sock\"\ncert = \"c.pem\"\nkey = \"k.pem\"",
            "server.tls.workload_api",
        ),
        (
            "workload_api = \"/run/spire/agent.sock\"",
            "server.tls.workload_api",
        ),
    ];
    // Serving with the broker's own X509-SVID from the Workload API.
    writ::config::Config::from_toml_with_env(
        &config_with_tls("workload_api = \"unix:///run/spire/agent.sock\""),
        Vec::new(),
    )
    .unwrap();
    for (tls, key) in cases {
        let err = writ::config::Config::from_toml_with_env(&config_with_tls(tls), Vec::new())
            .err()
            .unwrap_or_else(|| panic!("{tls}: accepted"))
            .to_string();
        assert!(err.contains(key), "{tls}: {err}");
    }
}

#[tokio::test]
async fn unreadable_or_mismatched_certificate_files_are_refused_at_start() {
    let m = spawn_mtls().await;
    let other = server_leaf(&m.server_ca);
    let dir = m.files.path();
    std::fs::write(dir.join("other.key"), &other.key_pem).unwrap();
    std::fs::write(dir.join("garbage.pem"), "not a certificate").unwrap();
    let text = &m.app.config_text;
    let server_pem = dir.join("server.pem").display().to_string();
    let server_key = dir.join("server.key").display().to_string();
    let cases = [
        (
            text.replace(&server_key, &dir.join("other.key").display().to_string()),
            "server.tls.key",
            "does not match",
        ),
        (
            text.replace(&server_pem, &dir.join("missing.pem").display().to_string()),
            "server.tls.cert",
            "cannot read",
        ),
        (
            text.replace(&server_pem, &dir.join("garbage.pem").display().to_string()),
            "server.tls.cert",
            "no PEM certificate",
        ),
        (
            text.replace(&server_key, &dir.join("garbage.pem").display().to_string()),
            "server.tls.key",
            "no PEM private key",
        ),
    ];
    for (text, key, why) in cases {
        let text = text.replace("audit.jsonl", "audit-check.jsonl");
        let config = writ::config::Config::from_toml_with_env(&text, Vec::new()).unwrap();
        let err = writ::broker::check_config(&config)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains(why), "{key}: {err}");
    }
}

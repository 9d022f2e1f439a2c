//! OAuth endpoints: token exchange, JWKS, authorization server metadata.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::{json_no_store, no_store};
use super::extract::{Authorization, DpopHeader, FormPairs, PeerCert, SourceIp};
use crate::broker::Broker;
use crate::domain::{
    Audience, AudienceListError, MAX_AUDIENCES, MAX_PURPOSE_LEN, Scope, TaskId,
    parse_audiences_with, parse_scopes,
};
use crate::error::{BrokerError, ErrorCode};
use crate::exchange::{
    CLIENT_CREDENTIALS, ExchangeRequest, Flow, GRANT_TYPE, JWT_BEARER_ASSERTION, SubjectTokenType,
    TYPE_ACCESS_TOKEN, TYPE_ID_TOKEN, TYPE_JWT,
};
use crate::introspect::Introspection;

/// The parameters of a token exchange (RFC 8693 §2.1); `audience` and `resource` repeat.
pub const EXCHANGE_PARAMS: &[&str] = &[
    "grant_type",
    "subject_token",
    "subject_token_type",
    "requested_token_type",
    "actor_token",
    "actor_token_type",
    "scope",
    "audience",
    "resource",
    "task_purpose",
    "task_id",
    "expires_in",
    "approval_id",
];
/// The parameters of a client credentials request (RFC 6749 §4.4.2, with the exchange's
/// task parameters, client authentication by RFC 7523 §2.2 or RFC 8705 §2); `audience` and
/// `resource` repeat.
pub const CLIENT_CREDENTIALS_PARAMS: &[&str] = &[
    "grant_type",
    "scope",
    "audience",
    "resource",
    "task_purpose",
    "task_id",
    "expires_in",
    "approval_id",
    "client_id",
    "client_assertion_type",
    "client_assertion",
];
/// Longest `client_id` compared (a SPIFFE ID is at most 2048 bytes).
const MAX_CLIENT_ID_LEN: usize = 2048;
/// The parameters of introspection and revocation (RFC 7662 §2.1, RFC 7009 §2.1).
pub const TOKEN_PARAMS: &[&str] = &["token", "token_type_hint"];

/// Form parameters under RFC 6749's rules: a parameter sent without a value is treated as
/// omitted (§3.1, §3.2), a parameter the endpoint does not know is ignored however often it
/// appears (§3.2), and a known one may appear at most once unless it is defined to repeat.
pub struct Form {
    pairs: Vec<(String, String)>,
}

impl Form {
    pub fn new(
        pairs: Vec<(String, String)>,
        known: &[&str],
        repeatable: &[&str],
    ) -> Result<Self, BrokerError> {
        let pairs: Vec<(String, String)> = pairs
            .into_iter()
            .filter(|(name, value)| !value.is_empty() && known.contains(&name.as_str()))
            .collect();
        // A set, not a scan of the earlier pairs: a 64 KiB body holds tens of thousands of
        // parameters, and a quadratic check would let one request burn a core for a second.
        let mut seen: HashSet<&str> = HashSet::with_capacity(pairs.len().min(64));
        for (name, _) in &pairs {
            if !repeatable.contains(&name.as_str()) && !seen.insert(name.as_str()) {
                // Only known names are left, so the name is one of ours, not caller input.
                return Err(BrokerError::invalid_request(format!(
                    "parameter `{name}` is repeated"
                )));
            }
        }
        Ok(Form { pairs })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.pairs
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn required(&self, name: &str) -> Result<&str, BrokerError> {
        self.get(name)
            .ok_or_else(|| BrokerError::invalid_request(format!("`{name}` is required")))
    }
}

/// Parses the wire form of an exchange into a request of domain types.
/// `default_scope` stands in for an absent `scope` (RFC 6749 §3.3); when it is empty too, the
/// request fails with `invalid_scope`.
/// `peer_cert`: the request came with a TLS client certificate, which may stand for
/// `subject_token`.
pub fn parse_exchange(
    form: &Form,
    source_ip: Option<String>,
    default_scope: &[Scope],
    peer_cert: bool,
) -> Result<ExchangeRequest, BrokerError> {
    let grant_type = form.required("grant_type")?;
    if grant_type != GRANT_TYPE {
        return Err(BrokerError::new(
            ErrorCode::UnsupportedGrantType,
            "this grant_type is not supported; use token exchange or client_credentials",
        ));
    }
    // Without `subject_token` the TLS client's X509-SVID is the subject (SPEC §4.8); the
    // exchange refuses the request when there is none.
    let (subject_token, subject_token_type) = match form.get("subject_token") {
        Some(token) => (token, subject_token_type(form)?),
        None if form.get("subject_token_type").is_some() => {
            return Err(BrokerError::invalid_request(
                "`subject_token` is required with subject_token_type",
            ));
        }
        None if !peer_cert => {
            return Err(BrokerError::invalid_request(
                "`subject_token` is required (or an X509-SVID as TLS client certificate)",
            ));
        }
        None => ("", SubjectTokenType::PeerCertificate),
    };
    if let Some(t) = form.get("requested_token_type")
        && t != TYPE_ACCESS_TOKEN
    {
        return Err(BrokerError::invalid_request(
            "requested_token_type must be the access_token type",
        ));
    }
    let actor_token = actor_token(form, subject_token_type)?;
    let mut req = task_request(form, source_ip, default_scope)?;
    req.subject_token = subject_token.into();
    req.subject_token_type = subject_token_type;
    req.actor_token = actor_token;
    Ok(req)
}

/// Parses a client credentials request (RFC 6749 §4.4.2): the client authenticates with a
/// JWT-SVID `client_assertion` (RFC 7523 §2.2) or, without one, with the X509-SVID of the
/// TLS connection (`tls_client_auth`, RFC 8705 §2).
pub fn parse_client_credentials(
    form: &Form,
    source_ip: Option<String>,
    default_scope: &[Scope],
    peer_cert: bool,
) -> Result<ExchangeRequest, BrokerError> {
    let (token, kind) = match (
        form.get("client_assertion_type"),
        form.get("client_assertion"),
    ) {
        (Some(JWT_BEARER_ASSERTION), Some(a)) => (a, SubjectTokenType::ClientAssertion),
        (Some(JWT_BEARER_ASSERTION), None) => {
            return Err(BrokerError::invalid_request(
                "`client_assertion` is required with client_assertion_type",
            ));
        }
        (Some(_), _) => {
            return Err(BrokerError::client_auth_failed(
                "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ));
        }
        (None, Some(_)) => {
            return Err(BrokerError::invalid_request(
                "`client_assertion_type` is required with client_assertion",
            ));
        }
        (None, None) if !peer_cert => {
            return Err(BrokerError::client_auth_failed(
                "client authentication is required: an X509-SVID as TLS client certificate \
                 (tls_client_auth) or a JWT-SVID client_assertion",
            ));
        }
        (None, None) => ("", SubjectTokenType::PeerCertificate),
    };
    let client_id = form.get("client_id");
    if client_id.is_some_and(|c| c.len() > MAX_CLIENT_ID_LEN) {
        return Err(BrokerError::client_auth_failed(format!(
            "client_id is longer than {MAX_CLIENT_ID_LEN} bytes"
        )));
    }
    let mut req = task_request(form, source_ip, default_scope)?;
    req.subject_token = token.into();
    req.subject_token_type = kind;
    req.flow = Flow::ClientCredentials;
    req.client_id = client_id.map(str::to_string);
    Ok(req)
}

/// What both grants ask of a task: scope, audience, purpose, task, lifetime, approval.
fn task_request(
    form: &Form,
    source_ip: Option<String>,
    default_scope: &[Scope],
) -> Result<ExchangeRequest, BrokerError> {
    let scopes = scopes(form, default_scope)?;
    let audiences = audiences(form, form.get("task_id").is_some())?;
    let purpose = form.get("task_purpose").unwrap_or("").to_string();
    if purpose.len() > MAX_PURPOSE_LEN {
        return Err(BrokerError::invalid_request(format!(
            "task_purpose is longer than {MAX_PURPOSE_LEN} bytes"
        )));
    }
    let task_id = task_id(form)?;
    let expires_in = expires_in(form)?;
    let approval_id = form
        .get("approval_id")
        .map(|raw| {
            crate::approvals::parse_id(raw)
                .map(str::to_string)
                .ok_or_else(|| BrokerError::invalid_request("approval_id is not an approval id"))
        })
        .transpose()?;
    Ok(ExchangeRequest {
        subject_token: "".into(),
        subject_token_type: SubjectTokenType::PeerCertificate,
        scopes,
        audiences,
        purpose,
        task_id,
        expires_in,
        source_ip,
        actor_token: None,
        approval_id,
        dpop: None,
        flow: Flow::Exchange,
        client_id: None,
        peer: None,
    })
}

/// `actor_token` and `actor_token_type` (RFC 8693 §2.1): only for delegation (a task token
/// as `subject_token`), where they are required (SPEC §4.4); the actor is a workload
/// identity token, never a task token.
fn actor_token(
    form: &Form,
    subject: SubjectTokenType,
) -> Result<Option<(secrecy::SecretString, SubjectTokenType)>, BrokerError> {
    let token = form.get("actor_token");
    let kind = form.get("actor_token_type");
    if subject != SubjectTokenType::AccessToken {
        if token.is_some() || kind.is_some() {
            return Err(BrokerError::invalid_request(
                "actor_token is only used with a delegation grant (a task token) as \
                 subject_token",
            ));
        }
        return Ok(None);
    }
    let Some(token) = token else {
        return Err(BrokerError::invalid_request(
            "a task token as subject_token is a delegation grant: actor_token (the \
             sub-agent's own identity token) is required",
        ));
    };
    let kind = match kind {
        None => {
            return Err(BrokerError::invalid_request(
                "actor_token_type is required with actor_token",
            ));
        }
        Some(TYPE_JWT) => SubjectTokenType::Jwt,
        Some(TYPE_ID_TOKEN) => SubjectTokenType::IdToken,
        Some(_) => {
            return Err(BrokerError::invalid_request(
                "actor_token_type must be the jwt or id_token type",
            ));
        }
    };
    Ok(Some((token.into(), kind)))
}

fn scopes(form: &Form, default_scope: &[Scope]) -> Result<Vec<Scope>, BrokerError> {
    match form.get("scope") {
        Some(scope) => parse_scopes(scope).ok_or_else(|| {
            BrokerError::invalid_scope("scope must be up to 32 space-separated scope tokens")
        }),
        None if default_scope.is_empty() => Err(BrokerError::invalid_scope(
            "scope is required: no default scope is configured",
        )),
        None => Ok(default_scope.to_vec()),
    }
}

fn subject_token_type(form: &Form) -> Result<SubjectTokenType, BrokerError> {
    match form.required("subject_token_type")? {
        TYPE_JWT => Ok(SubjectTokenType::Jwt),
        TYPE_ID_TOKEN => Ok(SubjectTokenType::IdToken),
        TYPE_ACCESS_TOKEN => Ok(SubjectTokenType::AccessToken),
        _ => Err(BrokerError::invalid_request(
            "subject_token_type is not a supported token type",
        )),
    }
}

/// `audience` and `resource` together: distinct, valid, and bounded before they are parsed.
/// With `task_id` (a token minted into a task, such as a delegation grant), an OIDC subject
/// `<issuer>#<sub>` is also an audience; the exchange checks its issuer.
fn audiences(form: &Form, grant: bool) -> Result<Vec<Audience>, BrokerError> {
    parse_audiences_with(form.all("audience").chain(form.all("resource")), grant).map_err(|e| {
        match e {
            AudienceListError::Invalid(_) => BrokerError::invalid_target(
                "an audience or resource is not an absolute URI without fragment or a SPIFFE ID \
             of at most 255 bytes",
            ),
            AudienceListError::TooMany => BrokerError::invalid_target(format!(
                "at most {MAX_AUDIENCES} audiences may be requested"
            )),
        }
    })
}

fn task_id(form: &Form) -> Result<Option<TaskId>, BrokerError> {
    form.get("task_id")
        .map(|raw| {
            TaskId::parse(raw)
                .ok_or_else(|| BrokerError::invalid_request("task_id is not a task id"))
        })
        .transpose()
}

fn expires_in(form: &Form) -> Result<Option<u64>, BrokerError> {
    form.get("expires_in")
        .map(|raw| match raw.parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(BrokerError::invalid_request(
                "expires_in must be a positive number of seconds",
            )),
        })
        .transpose()
}

/// The token endpoint's form, parsed by its `grant_type`: token exchange, or client
/// credentials.
pub fn parse_token_request(
    pairs: Vec<(String, String)>,
    source_ip: Option<String>,
    default_scope: &[Scope],
    peer_cert: bool,
) -> Result<ExchangeRequest, BrokerError> {
    let client_credentials = pairs
        .iter()
        .any(|(n, v)| n == "grant_type" && v == CLIENT_CREDENTIALS);
    if client_credentials {
        let form = Form::new(pairs, CLIENT_CREDENTIALS_PARAMS, &["audience", "resource"])?;
        return parse_client_credentials(&form, source_ip, default_scope, peer_cert);
    }
    let form = Form::new(pairs, EXCHANGE_PARAMS, &["audience", "resource"])?;
    parse_exchange(&form, source_ip, default_scope, peer_cert)
}

pub async fn token(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    DpopHeader(dpop): DpopHeader,
    PeerCert(peer): PeerCert,
    form: Result<FormPairs, BrokerError>,
) -> Response {
    let result = async {
        auth.refuse_client_credentials()?;
        let mut req =
            parse_token_request(form?.0, ip, &broker.limits.default_scope, peer.is_some())?;
        req.dpop = dpop?;
        req.peer = peer;
        broker.exchange(req).await
    }
    .await;
    let outcome = match &result {
        Ok(_) => "issued",
        Err(e) => e.code.as_str(),
    };
    broker
        .metrics
        .inc("writ_exchanges_total", &[("outcome", outcome)]);
    let mut resp = match result {
        Ok(ok) => {
            let mut resp = Json(ok).into_response();
            no_store(&mut resp);
            resp
        }
        Err(e) => e.into_response(),
    };
    // RFC 9449 §8: the nonce for the next proof, on every answer of the token endpoint.
    if let Some(nonce) = broker.dpop_nonce()
        && let Ok(v) = axum::http::HeaderValue::from_str(&nonce)
    {
        resp.headers_mut().insert("dpop-nonce", v);
    }
    resp
}

/// A token status list (draft-ietf-oauth-status-list, SPEC §4.6) as a signed
/// `statuslist+jwt`; an unknown or expired list is 404.
pub async fn status_list(
    State(broker): State<Arc<Broker>>,
    axum::extract::Path(list): axum::extract::Path<String>,
) -> Response {
    match broker.status.serve(&list, broker.now()).await {
        Ok(Some(signed)) => {
            let mut resp = signed.jwt.into_response();
            let headers = resp.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static(crate::token::status::MEDIA_TYPE),
            );
            if let Ok(v) =
                axum::http::HeaderValue::from_str(&format!("max-age={}", signed.ttl_secs))
            {
                headers.insert(header::CACHE_CONTROL, v);
            }
            resp
        }
        Ok(None) => BrokerError::not_found("no such status list").into_response(),
        Err(e) => broker.fail(e).into_response(),
    }
}

pub async fn jwks(State(broker): State<Arc<Broker>>) -> Response {
    let mut resp = Json(broker.tokens.keys().jwks().clone()).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

/// RFC 8414 metadata: endpoints are absolute URLs under the configured issuer. Served at
/// `/.well-known/oauth-authorization-server` and, for an issuer with a path, also at that
/// path after it (RFC 8414 §3.1). `response_types_supported` is left out: Writ has no
/// authorization endpoint, and an empty list is not a valid value.
pub async fn metadata(State(broker): State<Arc<Broker>>) -> Response {
    let issuer = broker.tokens.issuer().trim_end_matches('/');
    let algs: Vec<&str> = {
        let mut v: Vec<&str> = broker
            .tokens
            .keys()
            .all()
            .iter()
            .map(|k| k.alg.name())
            .collect();
        v.dedup();
        v
    };
    // mTLS client authentication and certificate-bound tokens only where the listener asks
    // for client certificates (RFC 8705 §2.1.1, §3.3).
    let mtls = broker
        .tls
        .as_ref()
        .is_some_and(|t| t.requests_client_certs());
    let auth_methods: &[&str] = if mtls {
        &["none", "tls_client_auth", "private_key_jwt"]
    } else {
        &["none", "private_key_jwt"]
    };
    let mut doc = json!({
        "issuer": broker.tokens.issuer(),
        "token_endpoint": format!("{issuer}/oauth2/token"),
        "introspection_endpoint": format!("{issuer}/oauth2/introspect"),
        "revocation_endpoint": format!("{issuer}/oauth2/revoke"),
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "jwks_uri": format!("{issuer}/oauth2/jwks"),
        "grant_types_supported": [GRANT_TYPE, CLIENT_CREDENTIALS],
        "token_endpoint_auth_methods_supported": auth_methods,
        "token_endpoint_auth_signing_alg_values_supported": crate::identity::spiffe::JWT_SVID_ALGS
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>(),
        "tls_client_certificate_bound_access_tokens": mtls,
        "subject_token_types_supported": [TYPE_JWT, TYPE_ID_TOKEN, TYPE_ACCESS_TOKEN],
        "access_token_signing_alg_values_supported": algs,
        "dpop_signing_alg_values_supported": crate::token::dpop::SIGNING_ALGS,
    });
    if let (Some(scopes), Some(obj)) = (
        broker.policy.current().scopes_supported(),
        doc.as_object_mut(),
    ) {
        obj.insert("scopes_supported".into(), json!(scopes));
    }
    Json(doc).into_response()
}

/// RFC 7662 introspection for resource servers (bearer: an introspection principal or an
/// admin).
pub async fn introspect(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    form: Result<FormPairs, BrokerError>,
) -> Response {
    let result = async {
        let caller = broker
            .authorize(auth.as_deref(), crate::auth::Role::Introspector, ip)
            .await?;
        let form = Form::new(form?.0, TOKEN_PARAMS, &[])?;
        let token = form.required("token")?;
        let workload = match &caller {
            crate::auth::Caller::AdminToken(_) | crate::auth::Caller::ApproverToken(_) => None,
            crate::auth::Caller::Workload(s) => Some(s.as_str()),
        };
        broker.introspect_for(token, workload).await
    }
    .await;
    let outcome = match &result {
        Ok(Introspection::Active(_)) => "active",
        Ok(Introspection::Inactive) => "inactive",
        Err(e) => e.code.as_str(),
    };
    broker
        .metrics
        .inc("writ_introspections_total", &[("outcome", outcome)]);
    match result {
        Ok(Introspection::Active(c)) => {
            let bound = c.cnf.as_ref().is_some_and(|v| v.get("jkt").is_some());
            let token_type = if bound { "DPoP" } else { "Bearer" };
            let mut v = json!({
                "active": true,
                "scope": c.scope,
                "client_id": c.client_id,
                "sub": c.sub,
                "aud": c.aud,
                "iss": c.iss,
                "exp": c.exp,
                "iat": c.iat,
                "nbf": c.nbf,
                "jti": c.jti,
                "txn": c.txn,
                "token_type": token_type,
            });
            if let Some(obj) = v.as_object_mut() {
                if let Some(cnf) = c.cnf {
                    obj.insert("cnf".into(), cnf);
                }
                if let Some(act) = c.act {
                    obj.insert("act".into(), act);
                }
            }
            json_no_store(v)
        }
        Ok(Introspection::Inactive) => json_no_store(json!({"active": false})),
        Err(e) => e.into_response(),
    }
}

/// RFC 7009: the holder revokes its token; 200 whether or not the token was known.
pub async fn revoke(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    auth: Authorization,
    form: Result<FormPairs, BrokerError>,
) -> Response {
    let result = async {
        auth.refuse_client_credentials()?;
        // Writ issues access tokens only, so a token is searched as one whatever its
        // `token_type_hint`: RFC 7009 §2.1 has a wrong or unknown hint ignored.
        let form = Form::new(form?.0, TOKEN_PARAMS, &[])?;
        let token = form.required("token")?;
        broker.revoke_own_token(token, ip).await
    }
    .await;
    match result {
        Ok(()) => json_no_store(json!({})),
        Err(e) => e.into_response(),
    }
}

//! OAuth endpoints: token exchange, JWKS, authorization server metadata.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::{json_no_store, no_store};
use super::extract::{Authorization, FormPairs, SourceIp};
use crate::broker::Broker;
use crate::domain::{
    Audience, AudienceListError, MAX_AUDIENCES, MAX_PURPOSE_LEN, TaskId, parse_audiences,
    parse_scopes,
};
use crate::error::{BrokerError, ErrorCode};
use crate::exchange::{
    ExchangeRequest, GRANT_TYPE, SubjectTokenType, TYPE_ACCESS_TOKEN, TYPE_ID_TOKEN, TYPE_JWT,
};
use crate::introspect::Introspection;

/// Form parameters with RFC 6749 §3.1's rule: a parameter may appear at most once, except
/// those defined to repeat.
pub struct Form {
    pairs: Vec<(String, String)>,
}

impl Form {
    pub fn new(pairs: Vec<(String, String)>, repeatable: &[&str]) -> Result<Self, BrokerError> {
        // A set, not a scan of the earlier pairs: a 64 KiB body holds tens of thousands of
        // parameters, and a quadratic check would let one request burn a core for a second.
        let mut seen: HashSet<&str> = HashSet::with_capacity(pairs.len().min(64));
        for (name, _) in &pairs {
            if !repeatable.contains(&name.as_str()) && !seen.insert(name.as_str()) {
                return Err(BrokerError::invalid_request(format!(
                    "parameter `{}` is repeated",
                    clip(name)
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
            .filter(|v| !v.is_empty())
            .ok_or_else(|| BrokerError::invalid_request(format!("`{name}` is required")))
    }
}

/// User input echoed in an error is cut short.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Parses the wire form of an exchange into a request of domain types.
pub fn parse_exchange(
    form: &Form,
    source_ip: Option<String>,
) -> Result<ExchangeRequest, BrokerError> {
    let grant_type = form.required("grant_type")?;
    if grant_type != GRANT_TYPE {
        return Err(BrokerError::new(
            ErrorCode::UnsupportedGrantType,
            format!("grant_type `{}` is not supported", clip(grant_type)),
        ));
    }
    let subject_token = form.required("subject_token")?;
    let subject_token_type = subject_token_type(form)?;
    if let Some(t) = form.get("requested_token_type")
        && t != TYPE_ACCESS_TOKEN
    {
        return Err(BrokerError::invalid_request(format!(
            "requested_token_type `{}` is not supported",
            clip(t)
        )));
    }
    if form.get("actor_token").is_some() || form.get("actor_token_type").is_some() {
        return Err(BrokerError::invalid_request("actor_token is not supported"));
    }
    let scope = form.required("scope")?;
    let scopes = parse_scopes(scope).ok_or_else(|| {
        BrokerError::new(
            ErrorCode::InvalidScope,
            "scope must be up to 32 space-separated scope tokens",
        )
    })?;
    let audiences = audiences(form)?;
    let purpose = form.get("task_purpose").unwrap_or("").to_string();
    if purpose.len() > MAX_PURPOSE_LEN {
        return Err(BrokerError::invalid_request(format!(
            "task_purpose is longer than {MAX_PURPOSE_LEN} bytes"
        )));
    }
    let task_id = task_id(form)?;
    let expires_in = expires_in(form)?;
    Ok(ExchangeRequest {
        subject_token: subject_token.into(),
        subject_token_type,
        scopes,
        audiences,
        purpose,
        task_id,
        expires_in,
        source_ip,
    })
}

fn subject_token_type(form: &Form) -> Result<SubjectTokenType, BrokerError> {
    match form.required("subject_token_type")? {
        TYPE_JWT => Ok(SubjectTokenType::Jwt),
        TYPE_ID_TOKEN => Ok(SubjectTokenType::IdToken),
        TYPE_ACCESS_TOKEN => Ok(SubjectTokenType::AccessToken),
        other => Err(BrokerError::invalid_request(format!(
            "subject_token_type `{}` is not supported",
            clip(other)
        ))),
    }
}

/// `audience` and `resource` together: distinct, valid, and bounded before they are parsed.
fn audiences(form: &Form) -> Result<Vec<Audience>, BrokerError> {
    parse_audiences(form.all("audience").chain(form.all("resource"))).map_err(|e| match e {
        AudienceListError::Invalid(raw) => BrokerError::invalid_target(format!(
            "`{}` is not an absolute URI without fragment or a SPIFFE ID of at most 255 bytes",
            clip(raw)
        )),
        AudienceListError::TooMany => BrokerError::invalid_target(format!(
            "at most {MAX_AUDIENCES} audiences may be requested"
        )),
    })
}

fn task_id(form: &Form) -> Result<Option<TaskId>, BrokerError> {
    form.get("task_id")
        .map(|raw| {
            TaskId::parse(raw).ok_or_else(|| {
                BrokerError::invalid_request(format!("task_id `{}` is not a task id", clip(raw)))
            })
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

pub async fn token(
    State(broker): State<Arc<Broker>>,
    SourceIp(ip): SourceIp,
    form: Result<FormPairs, BrokerError>,
) -> Response {
    let result = async {
        let form = Form::new(form?.0, &["audience", "resource"])?;
        let req = parse_exchange(&form, ip)?;
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
    match result {
        Ok(ok) => {
            let mut resp = Json(ok).into_response();
            no_store(&mut resp);
            resp
        }
        Err(e) => e.into_response(),
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

/// RFC 8414 metadata: endpoints are absolute URLs under the configured issuer.
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
    Json(json!({
        "issuer": broker.tokens.issuer(),
        "token_endpoint": format!("{issuer}/oauth2/token"),
        "introspection_endpoint": format!("{issuer}/oauth2/introspect"),
        "revocation_endpoint": format!("{issuer}/oauth2/revoke"),
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "jwks_uri": format!("{issuer}/oauth2/jwks"),
        "grant_types_supported": [GRANT_TYPE],
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["none"],
        "subject_token_types_supported": [TYPE_JWT, TYPE_ID_TOKEN, TYPE_ACCESS_TOKEN],
        "access_token_signing_alg_values_supported": algs,
    }))
    .into_response()
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
        broker
            .authorize(auth.as_deref(), crate::auth::Role::Introspector, ip)
            .await?;
        let form = Form::new(form?.0, &[])?;
        let token = form.required("token")?;
        broker.introspect(token)
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
                "token_type": "Bearer",
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
    form: Result<FormPairs, BrokerError>,
) -> Response {
    let result = async {
        let form = Form::new(form?.0, &[])?;
        let token = form.required("token")?;
        if let Some(hint) = form.get("token_type_hint")
            && hint != "access_token"
        {
            return Err(BrokerError::new(
                ErrorCode::UnsupportedTokenType,
                format!("token_type_hint `{}` is not supported", clip(hint)),
            ));
        }
        broker.revoke_own_token(token, ip).await
    }
    .await;
    match result {
        Ok(()) => json_no_store(json!({})),
        Err(e) => e.into_response(),
    }
}

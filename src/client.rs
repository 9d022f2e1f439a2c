//! The HTTP client behind the CLI's client commands.

use std::time::Duration;

use serde_json::Value;

use crate::exchange::{GRANT_TYPE, TYPE_JWT};
use crate::store::BlockKind;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the broker: {0}")]
    Transport(String),
    #[error("the broker refused ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("the broker answered with something that is not JSON")]
    NotJson,
    #[error("the token is not a Writ task token (no `txn` claim)")]
    NotATaskToken,
    #[error("`{url}` is not a broker URL: {why}")]
    BadUrl { url: String, why: String },
}

/// An error with its causes, for a person reading a terminal.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub struct Client {
    base: String,
    http: reqwest::Client,
}

/// What `writ token exchange` asks for.
#[derive(Debug, Default, Clone)]
pub struct ExchangeParams {
    pub subject_token: String,
    pub subject_token_type: Option<String>,
    pub scope: String,
    pub audience: Vec<String>,
    pub purpose: Option<String>,
    pub ttl: Option<Duration>,
    pub task_id: Option<String>,
    /// Delegation (SPEC §4.4): the sub-agent's own identity token and its type URI.
    pub actor_token: Option<(String, String)>,
    /// The repeat of a request held for approval.
    pub approval_id: Option<String>,
    /// Bind the token to this key with a DPoP proof (RFC 9449).
    pub dpop_key: Option<std::sync::Arc<crate::token::keys::SigningKey>>,
}

/// A broker's base URL, checked: `http` or `https`, a host, no path.
fn broker_base(given: &str) -> Result<String, ClientError> {
    let bad = |why: String| ClientError::BadUrl {
        url: given.to_string(),
        why,
    };
    let no_scheme = || {
        bad(format!(
            "it has no scheme (write http://{given} or https://{given})"
        ))
    };
    if !given.contains("://") {
        return Err(no_scheme());
    }
    let url = url::Url::parse(given).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("its scheme must be http or https".to_string()));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        let base = format!("{}://{}", url.scheme(), url.authority());
        return Err(bad(format!(
            "it has a path (`{}`); give the broker's base URL, e.g. {base}",
            url.path()
        )));
    }
    Ok(given.trim_end_matches('/').to_string())
}

impl Client {
    /// A client of the broker at `base` (`http(s)://host[:port]`).
    pub fn new(base: &str) -> Result<Self, ClientError> {
        Self::with_base(broker_base(base)?)
    }

    /// A client for documents fetched by their full URL (a JWKS).
    pub fn for_documents() -> Result<Self, ClientError> {
        Self::with_base(String::new())
    }

    fn with_base(base: String) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(Client { base, http })
    }

    pub async fn exchange(&self, p: &ExchangeParams) -> Result<Value, ClientError> {
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", GRANT_TYPE.to_string()),
            ("subject_token", p.subject_token.clone()),
            (
                "subject_token_type",
                p.subject_token_type
                    .clone()
                    .unwrap_or_else(|| TYPE_JWT.to_string()),
            ),
            ("scope", p.scope.clone()),
        ];
        for a in &p.audience {
            form.push(("audience", a.clone()));
        }
        if let Some(purpose) = &p.purpose {
            form.push(("task_purpose", purpose.clone()));
        }
        if let Some(ttl) = p.ttl {
            form.push(("expires_in", ttl.as_secs().to_string()));
        }
        if let Some(t) = &p.task_id {
            form.push(("task_id", t.clone()));
        }
        if let Some((token, kind)) = &p.actor_token {
            form.push(("actor_token", token.clone()));
            form.push(("actor_token_type", kind.clone()));
        }
        if let Some(a) = &p.approval_id {
            form.push(("approval_id", a.clone()));
        }
        let Some(key) = &p.dpop_key else {
            let resp = self
                .http
                .post(format!("{}/oauth2/token", self.base))
                .form(&form)
                .send()
                .await
                .map_err(|e| ClientError::Transport(chain(&e)))?;
            return Self::json(resp).await;
        };
        // The proof names the token endpoint as the broker's metadata states it (behind a
        // proxy, not the URL this client calls); a nonce challenge is answered once.
        let meta = self
            .send(self.http.get(format!(
                "{}/.well-known/oauth-authorization-server",
                self.base
            )))
            .await?;
        let htu = meta
            .get("token_endpoint")
            .and_then(Value::as_str)
            .ok_or(ClientError::NotJson)?
            .to_string();
        let mut nonce: Option<String> = None;
        for _ in 0..2 {
            let now = i64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs(),
            )
            .unwrap_or(i64::MAX);
            let proof =
                crate::token::dpop::make_proof(key, "POST", &htu, now, nonce.as_deref(), None)
                    .map_err(|e| ClientError::Transport(chain(&e)))?;
            let resp = self
                .http
                .post(format!("{}/oauth2/token", self.base))
                .header("DPoP", proof)
                .form(&form)
                .send()
                .await
                .map_err(|e| ClientError::Transport(chain(&e)))?;
            let fresh = resp
                .headers()
                .get("dpop-nonce")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let result = Self::json(resp).await;
            let challenged = matches!(&result, Err(ClientError::Refused { status: 400, body })
                if body.contains("use_dpop_nonce"));
            if challenged && nonce.is_none() && fresh.is_some() {
                nonce = fresh;
                continue;
            }
            return result;
        }
        Err(ClientError::Refused {
            status: 400,
            body: "the broker asked for a DPoP nonce twice".into(),
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Transport(chain(&e)))?;
        Self::json(resp).await
    }

    /// Ends the task a token belongs to (the token is the credential).
    pub async fn end_task(&self, token: &str) -> Result<Value, ClientError> {
        let task = task_of(token).ok_or(ClientError::NotATaskToken)?;
        self.send(
            self.http
                .post(format!("{}/v1/tasks/{task}/end", self.base))
                .bearer_auth(token),
        )
        .await
    }

    pub async fn list_tasks(
        &self,
        admin: &str,
        subject: Option<&str>,
        state: Option<&str>,
    ) -> Result<Value, ClientError> {
        let mut q: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = subject {
            q.push(("subject", s));
        }
        if let Some(s) = state {
            q.push(("state", s));
        }
        self.send(
            self.http
                .get(format!("{}/admin/v1/tasks", self.base))
                .query(&q)
                .bearer_auth(admin),
        )
        .await
    }

    /// One task's state (`GET /v1/tasks/{id}`), as an admin.
    pub async fn get_task(&self, admin: &str, task_id: &str) -> Result<Value, ClientError> {
        let mut url = reqwest::Url::parse(&format!("{}/v1/tasks", self.base))
            .map_err(|e| ClientError::Transport(format!("`{}`: {e}", self.base)))?;
        url.path_segments_mut()
            .map_err(|_| ClientError::Transport(format!("`{}` is not a base URL", self.base)))?
            .push(task_id);
        self.send(self.http.get(url).bearer_auth(admin)).await
    }

    /// Whether a token is active (`POST /oauth2/introspect`, RFC 7662), as an admin.
    pub async fn introspect(&self, admin: &str, token: &str) -> Result<Value, ClientError> {
        self.send(
            self.http
                .post(format!("{}/oauth2/introspect", self.base))
                .form(&[("token", token)])
                .bearer_auth(admin),
        )
        .await
    }

    pub async fn revoke(
        &self,
        admin: &str,
        selector: Value,
        reason: &str,
    ) -> Result<Value, ClientError> {
        let body = serde_json::json!({"selector": selector, "reason": reason});
        self.send(
            self.http
                .post(format!("{}/admin/v1/revocations", self.base))
                .json(&body)
                .bearer_auth(admin),
        )
        .await
    }

    /// Lists the standing blocks of one kind (`GET /admin/v1/{revocations|quarantines}`).
    pub async fn list_blocks(&self, admin: &str, kind: BlockKind) -> Result<Value, ClientError> {
        let url = self.admin_url(&[kind.collection()])?;
        self.send(self.http.get(url).bearer_auth(admin)).await
    }

    /// Lifts one block by id (`DELETE /admin/v1/{revocations|quarantines}/{id}`); the id is
    /// sent as one percent-encoded path segment, whatever it holds.
    pub async fn lift_block(
        &self,
        admin: &str,
        kind: BlockKind,
        id: &str,
    ) -> Result<Value, ClientError> {
        let url = self.admin_url(&[kind.collection(), id])?;
        self.send(self.http.delete(url).bearer_auth(admin)).await
    }

    /// Lists approval requests (`GET /admin/v1/approvals?state=`).
    pub async fn list_approvals(
        &self,
        approver: &str,
        state: Option<&str>,
    ) -> Result<Value, ClientError> {
        let mut url = self.admin_url(&["approvals"])?;
        if let Some(s) = state {
            url.query_pairs_mut().append_pair("state", s);
        }
        self.send(self.http.get(url).bearer_auth(approver)).await
    }

    /// Approves (`deny` = None) or denies with a reason an approval request
    /// (`POST /admin/v1/approvals/{id}/approve|deny`).
    pub async fn decide_approval(
        &self,
        approver: &str,
        id: &str,
        deny: Option<&str>,
    ) -> Result<Value, ClientError> {
        let verb = if deny.is_some() { "deny" } else { "approve" };
        let url = self.admin_url(&["approvals", id, verb])?;
        let mut req = self.http.post(url).bearer_auth(approver);
        if let Some(reason) = deny {
            req = req.json(&serde_json::json!({ "reason": reason }));
        }
        self.send(req).await
    }

    /// Confirms that the store lost its revocation state (`POST /admin/v1/store/confirm-reset`).
    pub async fn confirm_store_reset(&self, admin: &str) -> Result<Value, ClientError> {
        let url = self.admin_url(&["store", "confirm-reset"])?;
        self.send(self.http.post(url).bearer_auth(admin)).await
    }

    /// The decision log's latest signed head (`GET /admin/v1/audit/head`).
    pub async fn audit_head(&self, admin: &str) -> Result<Value, ClientError> {
        let url = self.admin_url(&["audit", "head"])?;
        self.send(self.http.get(url).bearer_auth(admin)).await
    }

    /// Fetches a JSON document by its full URL (a JWKS).
    pub async fn get_json(&self, url: &str) -> Result<Value, ClientError> {
        self.send(self.http.get(url)).await
    }

    fn admin_url(&self, segments: &[&str]) -> Result<reqwest::Url, ClientError> {
        let mut url = reqwest::Url::parse(&format!("{}/admin/v1", self.base))
            .map_err(|e| ClientError::Transport(format!("`{}`: {e}", self.base)))?;
        url.path_segments_mut()
            .map_err(|_| ClientError::Transport(format!("`{}` is not a base URL", self.base)))?
            .extend(segments);
        Ok(url)
    }

    async fn json(resp: reqwest::Response) -> Result<Value, ClientError> {
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if !status.is_success() {
            return Err(ClientError::Refused {
                status: status.as_u16(),
                body: text,
            });
        }
        serde_json::from_str(&text).map_err(|_| ClientError::NotJson)
    }
}

/// The task id (`txn`) of a task token, read without verifying it (the broker verifies).
pub fn task_of(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("txn")?.as_str().map(str::to_string)
}

/// Reads a secret from a file or standard input (`-`), trimmed of surrounding white space.
pub fn read_secret(source: &str) -> std::io::Result<String> {
    let text = if source == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(source)?
    };
    Ok(text.trim().to_string())
}

//! The test harness: a real broker on a loopback port, with its own keys, trust domain,
//! policies and decision log in a temporary directory, and a clock the test moves.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use writ::app::Application;
use writ::broker::Broker;
use writ::config::Config;
use writ::domain::{Clock, ManualClock};
use writ::token::keys::{KeyAlg, SigningKey, generate_pem};

pub const TD: &str = "example.org";
pub const AUD: &str = "writ";
pub const AGENT: &str = "spiffe://example.org/agent/demo";
pub const API: &str = "https://api.example.org";
pub const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const RESOURCE: &str = "spiffe://example.org/resource/api";
pub const SECURITY: &str = "spiffe://example.org/security/oncall";
pub const AT_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The sub-agent of [`TestApp::delegate`].
pub const DELEGATE: &str = "spiffe://example.org/agent/sub/delegate";

pub const POLICY: &str = r#"
@id("agent-read")
@max_ttl("5m")
permit (
  principal in Writ::TrustDomain::"example.org",
  action == Writ::Action::"exchange",
  resource == Writ::Scope::"repo:read"
) when { principal.path like "/agent/*" };

@id("agent-write")
@max_ttl("2m")
permit (
  principal in Writ::TrustDomain::"example.org",
  action == Writ::Action::"exchange",
  resource == Writ::Scope::"repo:write"
) when { principal.path like "/agent/*" };

@id("tickets-read")
permit (
  principal in Writ::TrustDomain::"example.org",
  action == Writ::Action::"exchange",
  resource == Writ::Scope::"tickets:read"
);

@id("ci-deploy")
permit (
  principal,
  action == Writ::Action::"exchange",
  resource == Writ::Scope::"ci:deploy"
) when { principal.issuer like "http://127.0.0.1:*" && principal.claims has repository
         && principal.claims.repository == "org/app" };

@id("delegate-tickets")
permit (
  principal in Writ::TrustDomain::"example.org",
  action == Writ::Action::"delegate",
  resource == Writ::Scope::"tickets:read"
);

@id("delegate-read")
permit (
  principal in Writ::TrustDomain::"example.org",
  action == Writ::Action::"delegate",
  resource == Writ::Scope::"repo:read"
) when { context.depth <= 3 };
"#;

pub struct TestApp {
    pub base: String,
    pub dir: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    pub broker: Arc<Broker>,
    pub svid_key: SigningKey,
    pub http: reqwest::Client,
    pub config_text: String,
    pub svid_key_pem: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Options for a test broker.
pub struct Options {
    pub extra_config: String,
    /// Lines added to the `[server]` section.
    pub server_extra: String,
    pub max_tokens: u32,
    pub signing_alg: KeyAlg,
    /// More keys of the trust domain's bundle (such as `x509-svid` authorities).
    pub bundle_extra_keys: Vec<Value>,
    /// Cedar policies beside [`POLICY`].
    pub extra_policy: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            extra_config: String::new(),
            server_extra: String::new(),
            max_tokens: 50,
            signing_alg: KeyAlg::Es256,
            bundle_extra_keys: Vec::new(),
            extra_policy: String::new(),
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(opts: Options) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    std::fs::write(p("signing.pem"), generate_pem(opts.signing_alg).unwrap()).unwrap();
    let svid_pem = generate_pem(KeyAlg::Es256).unwrap();
    let svid_key = SigningKey::from_pem(svid_pem.as_bytes(), "svid").unwrap();
    write_bundle_with(&p("bundle.json"), &[&svid_key], &opts.bundle_extra_keys);
    std::fs::create_dir_all(p("policies")).unwrap();
    std::fs::write(p("policies/test.cedar"), POLICY).unwrap();
    if !opts.extra_policy.is_empty() {
        std::fs::write(p("policies/options.cedar"), &opts.extra_policy).unwrap();
    }
    let config_text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
issuer = "https://writ.test"
{server_extra}
[tokens]
default_ttl = "5m"
max_ttl = "15m"
signing_keys = ["{signing}"]
[tasks]
max_duration = "1h"
max_tokens = {max_tokens}
[[spiffe.trust_domains]]
name = "{TD}"
bundle_file = "{bundle}"
audience = "{AUD}"
[policy]
dir = "{policies}"
[audit]
path = "{audit}"
[admin]
token_sha256 = ["{admin_hash}"]
principals = ["spiffe://example.org/security/*"]
[introspection]
principals = ["spiffe://example.org/resource/*"]
{extra}
"#,
        signing = p("signing.pem").display(),
        bundle = p("bundle.json").display(),
        policies = p("policies").display(),
        audit = p("audit.jsonl").display(),
        max_tokens = opts.max_tokens,
        extra = opts.extra_config,
        server_extra = opts.server_extra,
        admin_hash = writ::domain::sha256_hex(ADMIN_TOKEN.as_bytes()),
    );
    let mut app = start(config_text, dir, svid_key).await;
    app.svid_key_pem = svid_pem;
    app
}

async fn start(config_text: String, dir: tempfile::TempDir, svid_key: SigningKey) -> TestApp {
    start_inner(config_text, dir, svid_key, true).await
}

async fn start_inner(
    config_text: String,
    dir: tempfile::TempDir,
    svid_key: SigningKey,
    wait_ready: bool,
) -> TestApp {
    let config = Config::from_toml_with_env(&config_text, Vec::new()).unwrap();
    let clock = Arc::new(ManualClock::new(now()));
    let store = writ::broker::connect_store(&config).await.unwrap();
    let broker =
        Arc::new(Broker::build_with(config, clock.clone() as Arc<dyn Clock>, store).unwrap());
    let app = Application::from_broker(broker.clone()).await.unwrap();
    let addr = app.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    // Over `[server.tls]` the harness reaches the broker by https, trusting whatever
    // certificate it serves (tests that look at the certificate use their own client).
    let tls = config_text.contains("[server.tls]");
    let http = if tls {
        reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap()
    } else {
        reqwest::Client::new()
    };
    let app = TestApp {
        base: format!("{}://{addr}", if tls { "https" } else { "http" }),
        dir,
        clock,
        broker,
        svid_key,
        http,
        config_text,
        svid_key_pem: String::new(),
        _stop: tx,
    };
    // A broker on a shared store is not ready until it has loaded the revocation state; one
    // serving its Workload API X509-SVID completes no handshake before the SVID arrives.
    let start = std::time::Instant::now();
    let ready = |app: &TestApp| {
        let req = app.http.get(format!("{}/readyz", app.base)).send();
        async move { req.await.is_ok_and(|r| r.status() == 200) }
    };
    while wait_ready && !ready(&app).await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "broker did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app
}

/// A broker from a config text (its files must exist), with a fresh temp dir for nothing.
pub async fn spawn_with_text(text: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let svid_key =
        SigningKey::from_pem(generate_pem(KeyAlg::Es256).unwrap().as_bytes(), "svid").unwrap();
    start(text.to_string(), dir, svid_key).await
}

/// Stops a broker (no new connections, its background tasks end) and keeps its files, so
/// that [`restart`] can start another on them.
pub fn stop(app: TestApp) -> (String, tempfile::TempDir, String) {
    let TestApp {
        config_text,
        dir,
        svid_key_pem,
        _stop,
        ..
    } = app;
    drop(_stop);
    (config_text, dir, svid_key_pem)
}

/// A broker on the files and config of one that [`stop`] stopped.
pub async fn restart(stopped: (String, tempfile::TempDir, String)) -> TestApp {
    let (text, dir, svid_pem) = stopped;
    // The stopped broker lets go of its decision log once its last request has finished.
    let log = dir.path().join("audit.jsonl");
    let start_wait = std::time::Instant::now();
    while writ::audit::lock::in_use(&log) {
        assert!(
            start_wait.elapsed() < Duration::from_secs(10),
            "the stopped broker still holds its decision log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let svid_key = SigningKey::from_pem(svid_pem.as_bytes(), "svid").unwrap();
    let mut app = start(text, dir, svid_key).await;
    app.svid_key_pem = svid_pem;
    app
}

/// The `[store]` section for a Redis server.
pub fn redis_store(url: &str) -> String {
    format!("[store]\nbackend = \"redis\"\nurl = \"{url}\"\nmax_staleness = \"2s\"\n")
}

/// A second broker sharing the first one's keys, trust bundle, policies and store config,
/// with its own decision log.
pub async fn spawn_replica(first: &TestApp) -> TestApp {
    replica(
        &first.config_text,
        first.dir.path(),
        &first.svid_key_pem,
        true,
    )
    .await
}

/// A replica of a broker whose config is `config` (its files under `first_dir`), returned
/// without waiting for it to become ready.
pub async fn spawn_replica_unready(
    config: &str,
    first_dir: &std::path::Path,
    svid_key_pem: &str,
) -> TestApp {
    replica(config, first_dir, svid_key_pem, false).await
}

async fn replica(
    config: &str,
    first_dir: &std::path::Path,
    svid_key_pem: &str,
    wait_ready: bool,
) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let own_audit = dir.path().join("audit.jsonl");
    let text = config.replace(
        &first_dir.join("audit.jsonl").display().to_string(),
        &own_audit.display().to_string(),
    );
    let svid_key = SigningKey::from_pem(svid_key_pem.as_bytes(), "svid").unwrap();
    let mut app = start_inner(text, dir, svid_key, wait_ready).await;
    app.svid_key_pem = svid_key_pem.to_string();
    app
}

pub fn write_bundle(path: &std::path::Path, keys: &[&SigningKey]) {
    write_bundle_with(path, keys, &[]);
}

/// A bundle of the JWT-SVID `keys` and the `extra` keys as they are.
pub fn write_bundle_with(path: &std::path::Path, keys: &[&SigningKey], extra: &[Value]) {
    let mut keys: Vec<Value> = keys
        .iter()
        .map(|k| {
            let mut jwk = k.jwk().clone();
            jwk["use"] = json!("jwt-svid");
            jwk
        })
        .collect();
    keys.extend_from_slice(extra);
    std::fs::write(
        path,
        serde_json::to_vec(&json!({"keys": keys, "spiffe_sequence": 1})).unwrap(),
    )
    .unwrap();
}

/// Builds a JWT from raw header and claims, signed by `key` (header `alg`/`kid` as given).
pub fn sign_jwt(header: &Value, claims: &Value, key: &SigningKey) -> String {
    let mut h: jsonwebtoken::Header = serde_json::from_value(header.clone()).unwrap();
    h.alg = key.alg.jwt_alg();
    jsonwebtoken::encode(&h, claims, key.encoding_key()).unwrap()
}

/// A JWT whose parts are given as they are, with an arbitrary signature.
pub fn raw_jwt(header: &Value, claims: &Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode(sig)
    )
}

impl TestApp {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A valid JWT-SVID for `spiffe_id` at the broker's current time.
    pub fn svid(&self, spiffe_id: &str) -> String {
        self.svid_with(json!({"sub": spiffe_id}))
    }

    /// A JWT-SVID with the default claims overlaid by `overrides`.
    pub fn svid_with(&self, overrides: Value) -> String {
        let now = self.clock.now();
        let mut claims = json!({"sub": AGENT, "aud": [AUD], "iat": now, "exp": now + 300});
        for (k, v) in overrides.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        sign_jwt(
            &json!({"alg": "ES256", "kid": self.svid_key.kid, "typ": "JWT"}),
            &claims,
            &self.svid_key,
        )
    }

    pub async fn post_form(
        &self,
        path: &str,
        form: &[(&str, &str)],
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let body = serde_urlencoded::to_string(form).unwrap();
        self.post_raw(path, "application/x-www-form-urlencoded", body)
            .await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: String,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json, headers)
    }

    /// A request with a bearer credential and an optional body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<(&str, String)>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(Duration::from_secs(10));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        if let Some((ct, b)) = body {
            req = req.header("content-type", ct).body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Introspects `token` as the resource server.
    pub async fn introspect(&self, token: &str) -> Value {
        let (s, v) = self.introspect_as(&self.svid(RESOURCE), token).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    pub async fn introspect_as(&self, bearer: &str, token: &str) -> (u16, Value) {
        let body = serde_urlencoded::to_string([("token", token)]).unwrap();
        self.call(
            reqwest::Method::POST,
            "/oauth2/introspect",
            Some(bearer),
            Some(("application/x-www-form-urlencoded", body)),
        )
        .await
    }

    pub async fn admin_revoke(&self, body: Value) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            "/admin/v1/revocations",
            Some(ADMIN_TOKEN),
            Some(("application/json", body.to_string())),
        )
        .await
    }

    /// A fresh task token for `subject` and `scope`; returns (token, task id).
    pub async fn task_token(&self, subject: &str, scope: &str) -> (String, String) {
        let (s, v) = self.exchange(&self.svid(subject), scope, &[]).await;
        assert_eq!(s, 200, "{v}");
        (
            v["access_token"].as_str().unwrap().to_string(),
            v["task_id"].as_str().unwrap().to_string(),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
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

    /// Exchanges `subject_token` for `scope` at the default API audience, plus `extra`.
    pub async fn exchange(
        &self,
        subject_token: &str,
        scope: &str,
        extra: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut form = vec![
            ("grant_type", GRANT),
            ("subject_token", subject_token),
            ("subject_token_type", JWT_TYPE),
            ("scope", scope),
        ];
        if !extra
            .iter()
            .any(|(k, _)| *k == "audience" || *k == "resource")
        {
            form.push(("audience", API));
        }
        form.extend_from_slice(extra);
        let (s, v, _) = self.post_form("/oauth2/token", &form).await;
        (s, v)
    }

    /// Delegation (SPEC §4.4): `DELEGATE` exchanges `grant` (a task token, as an access
    /// token) with its own JWT-SVID as actor_token, for `scope` at the API.
    pub async fn delegate(&self, grant: &str, scope: &str) -> (u16, Value) {
        let actor = self.svid(DELEGATE);
        let form = [
            ("grant_type", GRANT),
            ("subject_token", grant),
            ("subject_token_type", AT_TYPE),
            ("actor_token", actor.as_str()),
            ("actor_token_type", JWT_TYPE),
            ("scope", scope),
            ("audience", API),
        ];
        let (s, v, _) = self.post_form("/oauth2/token", &form).await;
        (s, v)
    }

    /// A delegation grant for `DELEGATE`: `owner` mints it into its task `task`.
    pub async fn grant_for_delegate(&self, owner: &str, task: &str, scope: &str) -> String {
        let (s, v) = self
            .exchange(
                &self.svid(owner),
                scope,
                &[("task_id", task), ("audience", DELEGATE)],
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v["access_token"].as_str().unwrap().to_string()
    }

    /// Asserts an OAuth error response with the exact status and code.
    pub async fn expect_error(
        &self,
        subject_token: &str,
        scope: &str,
        extra: &[(&str, &str)],
        status: u16,
        code: &str,
    ) -> Value {
        let (s, v) = self.exchange(subject_token, scope, extra).await;
        assert_eq!(
            (s, v["error"].as_str().unwrap_or("")),
            (status, code),
            "{v}"
        );
        v
    }

    /// A valid exchange succeeds: the broker is still up and serving.
    pub async fn assert_still_serving(&self) {
        let (s, v) = self.exchange(&self.svid(AGENT), "repo:read", &[]).await;
        assert_eq!(s, 200, "{v}");
    }

    /// Stops the broker (server and background tasks) and keeps its files.
    pub async fn stop(self) -> tempfile::TempDir {
        let base = self.base.clone();
        let http = self.http.clone();
        let dir = self.dir;
        drop(self._stop);
        let start = std::time::Instant::now();
        while http.get(format!("{base}/healthz")).send().await.is_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "broker did not stop"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        dir
    }

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(self.path("audit.jsonl")).unwrap_or_default()
    }

    pub fn audit_records(&self) -> Vec<Value> {
        self.audit_text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Decodes a JWT's payload without verifying it.
pub fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap()
}

pub fn header_of(token: &str) -> Value {
    let h = token.split('.').next().unwrap();
    serde_json::from_slice(&B64.decode(h).unwrap()).unwrap()
}

/// A broker on a Redis server (standalone).
pub async fn spawn_on_redis(url: &str) -> TestApp {
    spawn_app_with(Options {
        extra_config: redis_store(url),
        ..Options::default()
    })
    .await
}

impl TestApp {
    /// `POST /v1/tasks/{task}/end` with a token of the task.
    pub async fn end_task(&self, task: &str, token: &str) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/tasks/{task}/end"),
            Some(token),
            None,
        )
        .await
    }

    /// Polls `GET path` until it answers `want` (10 s at most).
    pub async fn wait_status(&self, path: &str, want: u16) {
        let start = std::time::Instant::now();
        loop {
            let (s, _) = self.get(path).await;
            if s == want {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{path} answered {s}, not {want}, for 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A broker like `first` (same keys, bundle, policies, store) whose config text is `edit`ed.
pub async fn spawn_edited(first: &TestApp, edit: impl Fn(&str) -> String) -> TestApp {
    replica(
        &edit(&first.config_text),
        first.dir.path(),
        &first.svid_key_pem,
        true,
    )
    .await
}

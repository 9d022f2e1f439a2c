//! A resource server that accepts Writ's task tokens, with `writ::verify` as a tower layer
//! on an axum router (README, "Resource servers").
//!
//! ```text
//! cargo run --example resource_server -- --broker http://127.0.0.1:8080 \
//!     --audience https://api.example.org --listen 127.0.0.1:8090
//! ```
//!
//! Flags, or the environment variables in brackets:
//! - `--broker URL` (`WRIT_BROKER`): where the broker is reached (JWKS, status lists);
//! - `--issuer URL` (`WRIT_ISSUER`): the broker's `server.issuer`, when not the broker URL;
//! - `--audience A` (`RS_AUDIENCE`): this server's audience, which tokens must name;
//! - `--listen ADDR` (`RS_LISTEN`, default `127.0.0.1:8090`);
//! - `--resource-url URL` (`RS_RESOURCE_URL`): the public URL clients address, which DPoP
//!   proofs name in `htu` (default `http://<listen address>`).
//!
//! Routes: `GET /repo` needs `repo:read`, `POST /repo` needs `repo:write`, `GET /tickets`
//! needs `tickets:read`; each answers the verified claims as JSON. `GET /healthz` is open.
//! It prints `listening on http://ADDR` once it accepts connections.

use std::net::SocketAddr;
use std::process::ExitCode;

use axum::handler::Handler;
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::{Value, json};
use writ::verify::{Config, Verified, Verifier};

/// What the server is told.
#[derive(Debug, Clone)]
pub struct Settings {
    pub broker: String,
    pub issuer: String,
    pub audience: String,
    pub listen: SocketAddr,
    pub resource_url: Option<String>,
}

impl Settings {
    /// From the flags, then the environment.
    pub fn from_args_and_env() -> Result<Self, String> {
        let mut args = std::env::args().skip(1);
        let mut flags = std::collections::HashMap::new();
        while let Some(flag) = args.next() {
            let name = match flag.as_str() {
                "--broker" | "--issuer" | "--audience" | "--listen" | "--resource-url" => flag,
                other => return Err(format!("unknown argument `{other}`")),
            };
            let value = args.next().ok_or(format!("`{name}` needs a value"))?;
            flags.insert(name, value);
        }
        let get = |flag: &str, env: &str| {
            flags
                .get(flag)
                .cloned()
                .or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()))
        };
        let broker =
            get("--broker", "WRIT_BROKER").ok_or("`--broker` (WRIT_BROKER) is required")?;
        let audience =
            get("--audience", "RS_AUDIENCE").ok_or("`--audience` (RS_AUDIENCE) is required")?;
        let listen = get("--listen", "RS_LISTEN")
            .unwrap_or_else(|| "127.0.0.1:8090".into())
            .parse()
            .map_err(|_| "`--listen` (RS_LISTEN) is not an address like 127.0.0.1:8090")?;
        Ok(Settings {
            issuer: get("--issuer", "WRIT_ISSUER").unwrap_or_else(|| broker.clone()),
            broker,
            audience,
            listen,
            resource_url: get("--resource-url", "RS_RESOURCE_URL"),
        })
    }

    /// The verifier's config for a server listening on `bound`.
    pub fn verifier_config(&self, bound: SocketAddr) -> Config {
        let mut config = Config::new(&self.issuer, &self.audience);
        config.broker_url = Some(self.broker.clone());
        config.resource_url = Some(
            self.resource_url
                .clone()
                .unwrap_or_else(|| format!("http://{bound}")),
        );
        config
    }
}

/// The routes, each behind the verifier with the scopes it needs.
pub fn router(verifier: &Verifier) -> Router {
    let needs = |scope: &str| verifier.layer().require_scopes([scope]);
    Router::new()
        .route(
            "/repo",
            get(claims.layer(needs("repo:read"))).post(claims.layer(needs("repo:write"))),
        )
        .route("/tickets", get(claims.layer(needs("tickets:read"))))
        .route("/healthz", get(|| async { "ok" }))
}

/// The verified claims, as the handler sees them.
async fn claims(Extension(v): Extension<Verified>) -> Json<Value> {
    Json(json!({
        "subject": v.subject,
        "client_id": v.client_id,
        "scopes": v.scopes,
        "task_id": v.task_id,
        "actors": v.actors(),
        "act": v.act,
        "cnf": v.cnf,
        "binding": match &v.binding {
            writ::verify::Binding::None => "none",
            writ::verify::Binding::Dpop { .. } => "dpop",
            writ::verify::Binding::Mtls { .. } => "mtls",
        },
    }))
}

/// Serves `router` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, verifier: &Verifier) -> std::io::Result<()> {
    axum::serve(listener, router(verifier)).await
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let settings = Settings::from_args_and_env()?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let verifier =
        Verifier::new(settings.verifier_config(bound)).map_err(|e| format!("config: {e}"))?;
    // The broker's keys now, so that a broker that cannot be reached is said at once; the
    // server still starts, and fetches them on the first request.
    if let Err(e) = verifier.warm().await {
        eprintln!("warning: {e}");
    }
    println!("listening on http://{bound}");
    serve(listener, &verifier).await.map_err(|e| e.to_string())
}

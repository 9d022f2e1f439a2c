//! Trust sources other than bundle files (SPEC §4.8), against real servers in their own
//! processes: a Workload API server on a unix socket and a federation bundle endpoint over
//! HTTPS (tests/interop/spiffe). A source that cannot be read fails closed for its trust
//! domain only (503 `temporarily_unavailable`), and recovers without a restart.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use writ::domain::Clock;
use writ::token::keys::SigningKey;

use crate::helpers::*;
use crate::spiffe_support::{BundleEndpoint, WorkloadApi};

const WL: &str = "wl.test";
const FED: &str = "fed.test";
const WL_AGENT: &str = "spiffe://wl.test/agent/demo";
const FED_AGENT: &str = "spiffe://fed.test/agent/demo";

/// Lets the agents of the test trust domains read the repo, like `example.org`'s.
fn policy_for(tds: &[&str]) -> String {
    tds.iter()
        .map(|td| {
            format!(
                "permit (\n  principal in Writ::TrustDomain::\"{td}\",\n  action == \
                 Writ::Action::\"exchange\",\n  resource == Writ::Scope::\"repo:read\"\n);\n"
            )
        })
        .collect()
}

/// A JWT-SVID for `sub` signed by the authority `(kid, pem)`.
fn svid_by(app: &TestApp, key: &(String, String), sub: &str) -> String {
    let signer = SigningKey::from_pem(key.1.as_bytes(), "authority").unwrap();
    let now = app.clock.now();
    sign_jwt(
        &json!({"alg": "ES256", "kid": key.0, "typ": "JWT"}),
        &json!({"sub": sub, "aud": [AUD], "iat": now, "exp": now + 300}),
        &signer,
    )
}

async fn readyz(app: &TestApp) -> Value {
    let (s, v) = app.get("/readyz").await;
    assert_eq!(
        s, 200,
        "a trust domain that is not ready leaves the broker ready: {v}"
    );
    v
}

/// Waits until `/readyz` reports `td` as `want` ("ok" or a "not ready: …" prefix).
async fn wait_trust_domain(app: &TestApp, td: &str, want: &str, bound: Duration) -> Value {
    let start = Instant::now();
    loop {
        let v = readyz(app).await;
        let got = v["checks"]["trust_domains"][td]
            .as_str()
            .unwrap_or("")
            .to_string();
        if got.starts_with(want) {
            return v;
        }
        assert!(start.elapsed() < bound, "{td} never became `{want}`: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the broker holds `n` JWT authorities for `td`.
async fn wait_authorities(app: &TestApp, td: &str, n: usize, bound: Duration) {
    let start = Instant::now();
    loop {
        let held = app
            .broker
            .identity
            .svid
            .domain(td)
            .unwrap()
            .current()
            .map(|b| b.authorities.len());
        if held == Ok(n) {
            return;
        }
        assert!(
            start.elapsed() < bound,
            "{td}: {held:?} authorities, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn exchange_status(app: &TestApp, svid: &str) -> (u16, String) {
    let (s, v) = app.exchange(svid, "repo:read", &[]).await;
    (s, v["error"].as_str().unwrap_or("").to_string())
}

const REFUSED: (u16, &str) = (400, "invalid_request");
const FAILS_CLOSED: (u16, &str) = (503, "temporarily_unavailable");

fn is(got: &(u16, String), want: (u16, &str)) -> bool {
    got.0 == want.0 && got.1 == want.1
}

async fn wl_app(wapi: &WorkloadApi, extra_tds: &[&str]) -> TestApp {
    let mut extra = String::new();
    for td in [WL].iter().chain(extra_tds) {
        extra.push_str(&format!(
            "[[spiffe.trust_domains]]\nname = \"{td}\"\nworkload_api = \"{}\"\naudience = \"{AUD}\"\n",
            wapi.url()
        ));
    }
    let mut tds = vec![WL];
    tds.extend_from_slice(extra_tds);
    spawn_app_with(Options {
        extra_config: extra,
        extra_policy: policy_for(&tds),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_down_fails_closed_for_its_trust_domain_only_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut wapi = WorkloadApi::start(dir.path(), "spiffe://wl.test/writ", &[]);
    let app = wl_app(&wapi, &[]).await;
    wait_trust_domain(&app, WL, "ok", Duration::from_secs(10)).await;
    let key = wapi.jwt_keys(WL).remove(0);
    let wl_svid = svid_by(&app, &key, WL_AGENT);
    assert_eq!(exchange_status(&app, &wl_svid).await, (200, String::new()));
    // The agent goes away: the trust domain fails closed, example.org keeps serving.
    wapi.stop();
    let v = wait_trust_domain(&app, WL, "not ready", Duration::from_secs(10)).await;
    assert_eq!(v["trust_domains_not_ready"], json!([WL]), "{v}");
    assert_eq!(v["checks"]["trust_domains"][TD], "ok", "{v}");
    let got = exchange_status(&app, &wl_svid).await;
    assert!(is(&got, FAILS_CLOSED), "{got:?}");
    app.assert_still_serving().await;
    // A fresh JWT-SVID signed by a key the broker held is refused just the same.
    let got = exchange_status(&app, &svid_by(&app, &key, WL_AGENT)).await;
    assert!(is(&got, FAILS_CLOSED), "{got:?}");
    let (s, m) = app.get("/metrics").await;
    assert_eq!(s, 200);
    let text = m.as_str().unwrap();
    assert!(
        text.contains("writ_trust_domain_ready{trust_domain=\"wl.test\"} 0"),
        "{text}"
    );
    assert!(text.contains("writ_trust_domain_ready{trust_domain=\"example.org\"} 1"));

    // Back: recovered without a restart, the same key accepted again.
    wapi.start_again();
    wait_trust_domain(&app, WL, "ok", Duration::from_secs(15)).await;
    assert_eq!(exchange_status(&app, &wl_svid).await, (200, String::new()));
    assert_eq!(readyz(&app).await["trust_domains_not_ready"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_bearer_credential_of_a_trust_domain_that_fails_closed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut wapi = WorkloadApi::start(dir.path(), "spiffe://wl.test/writ", &[]);
    let first = wl_app(&wapi, &[]).await;
    // The resource servers of wl.test may introspect.
    let app = spawn_edited(&first, |text| {
        text.replace(
            "principals = [\"spiffe://example.org/resource/*\"]",
            "principals = [\"spiffe://example.org/resource/*\", \"spiffe://wl.test/resource/*\"]",
        )
    })
    .await;
    wait_trust_domain(&app, WL, "ok", Duration::from_secs(10)).await;
    let key = wapi.jwt_keys(WL).remove(0);
    let bearer = svid_by(&app, &key, "spiffe://wl.test/resource/api");
    let (s, v) = app.introspect_as(&bearer, "not-a-token").await;
    assert_eq!(s, 200, "{v}");
    // Verified once, the bearer is cached; the cache must not outlive the trust domain.
    wapi.stop();
    wait_trust_domain(&app, WL, "not ready", Duration::from_secs(10)).await;
    let (s, v) = app.introspect_as(&bearer, "not-a-token").await;
    assert_eq!(
        (s, v["error"].as_str().unwrap_or("")),
        (503, "temporarily_unavailable"),
        "{v}"
    );
    wapi.start_again();
    wait_trust_domain(&app, WL, "ok", Duration::from_secs(15)).await;
    let (s, v) = app.introspect_as(&bearer, "not-a-token").await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_rotation_adds_and_removes_authorities() {
    let dir = tempfile::tempdir().unwrap();
    let mut wapi = WorkloadApi::start(dir.path(), "spiffe://wl.test/writ", &["partner.test"]);
    let app = wl_app(&wapi, &["partner.test"]).await;
    wait_trust_domain(&app, WL, "ok", Duration::from_secs(10)).await;
    wait_trust_domain(&app, "partner.test", "ok", Duration::from_secs(10)).await;

    // A JWT-SVID minted by the Workload API server itself (FetchJWTSVID) is accepted.
    let client = spiffe::WorkloadApiClient::connect_to(wapi.url())
        .await
        .unwrap();
    let id: spiffe::SpiffeId = WL_AGENT.parse().unwrap();
    let minted = client.fetch_jwt_token([AUD], Some(&id)).await.unwrap();
    assert_eq!(exchange_status(&app, &minted).await, (200, String::new()));
    // So is one of the federated trust domain served on the same socket.
    let id: spiffe::SpiffeId = "spiffe://partner.test/agent/x".parse().unwrap();
    let partner = client.fetch_jwt_token([AUD], Some(&id)).await.unwrap();
    assert_eq!(exchange_status(&app, &partner).await, (200, String::new()));

    // The X.509 authorities are kept for X509-SVID verification.
    let held = |td: &str| -> Vec<Vec<u8>> {
        app.broker
            .identity
            .svid
            .domain(td)
            .unwrap()
            .current()
            .unwrap()
            .x509_authorities
            .iter()
            .map(|c| c.to_vec())
            .collect()
    };
    assert_eq!(held(WL), wapi.ca_ders(WL));
    assert_eq!(held("partner.test"), wapi.ca_ders("partner.test"));

    let old = wapi.jwt_keys(WL).remove(0);
    wapi.rotate();
    let new = wapi.jwt_keys(WL).pop().unwrap();
    assert_ne!(old.0, new.0);
    wait_authorities(&app, WL, 2, Duration::from_secs(10)).await;
    assert_eq!(
        exchange_status(&app, &svid_by(&app, &new, WL_AGENT)).await,
        (200, String::new())
    );
    assert_eq!(
        exchange_status(&app, &svid_by(&app, &old, WL_AGENT)).await,
        (200, String::new())
    );

    wapi.retire();
    wait_authorities(&app, WL, 1, Duration::from_secs(10)).await;
    let got = exchange_status(&app, &svid_by(&app, &old, WL_AGENT)).await;
    assert!(is(&got, REFUSED), "a removed authority is refused: {got:?}");
    assert_eq!(
        exchange_status(&app, &svid_by(&app, &new, WL_AGENT)).await,
        (200, String::new())
    );

    // A new CA reaches the X.509 authorities too.
    wapi.rotate_ca();
    let start = Instant::now();
    while held(WL).len() != 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new CA never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held(WL), wapi.ca_ders(WL));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_domain_the_workload_api_does_not_serve_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let wapi = WorkloadApi::start(dir.path(), "spiffe://wl.test/writ", &[]);
    let app = wl_app(&wapi, &["absent.test"]).await;
    wait_trust_domain(&app, WL, "ok", Duration::from_secs(10)).await;
    let v = wait_trust_domain(&app, "absent.test", "not ready", Duration::from_secs(10)).await;
    let reason = v["checks"]["trust_domains"]["absent.test"]
        .as_str()
        .unwrap();
    assert!(
        reason.contains("serves no JWT bundle for this trust domain"),
        "{reason}"
    );
    // A token naming it fails closed; the trust domain the agent serves is not affected.
    let key = wapi.jwt_keys(WL).remove(0);
    let got = exchange_status(&app, &svid_by(&app, &key, "spiffe://absent.test/agent/x")).await;
    assert!(is(&got, FAILS_CLOSED), "{got:?}");
    assert_eq!(
        exchange_status(&app, &svid_by(&app, &key, WL_AGENT)).await,
        (200, String::new())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_started_before_its_agent_fails_closed_then_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut wapi = WorkloadApi::start(dir.path(), "spiffe://wl.test/writ", &[]);
    wapi.stop();
    let app = wl_app(&wapi, &[]).await;
    let v = wait_trust_domain(&app, WL, "not ready", Duration::from_secs(5)).await;
    assert_eq!(v["trust_domains_not_ready"], json!([WL]));
    let key = wapi.jwt_keys(WL).remove(0);
    let got = exchange_status(&app, &svid_by(&app, &key, WL_AGENT)).await;
    assert!(is(&got, FAILS_CLOSED), "{got:?}");
    wapi.start_again();
    wait_trust_domain(&app, WL, "ok", Duration::from_secs(15)).await;
    assert_eq!(
        exchange_status(&app, &svid_by(&app, &key, WL_AGENT)).await,
        (200, String::new())
    );
}

fn endpoint_td(be: &BundleEndpoint, extra: &str) -> String {
    format!(
        "[[spiffe.trust_domains]]\nname = \"{FED}\"\nbundle_endpoint = \"{}\"\n\
         bundle_endpoint_ca = \"{}\"\naudience = \"{AUD}\"\n{extra}",
        be.url,
        be.web_ca().display()
    )
}

async fn fed_app(td_section: String) -> TestApp {
    spawn_app_with(Options {
        extra_config: td_section,
        extra_policy: policy_for(&[FED]),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_endpoint_rotation_is_picked_up_at_the_refresh_hint() {
    let dir = tempfile::tempdir().unwrap();
    let mut be = BundleEndpoint::start(dir.path(), FED, 1);
    let app = fed_app(endpoint_td(
        &be,
        "refresh_hint_min = \"1s\"\nrefresh_hint_max = \"10s\"\nmax_bundle_age = \"1m\"\n",
    ))
    .await;
    wait_trust_domain(&app, FED, "ok", Duration::from_secs(10)).await;
    let held = app
        .broker
        .identity
        .svid
        .domain(FED)
        .unwrap()
        .current()
        .unwrap();
    assert_eq!(held.refresh_hint, Some(1));
    assert_eq!(held.x509_authorities.len(), 1);
    assert_eq!(held.x509_authorities[0].to_vec(), be.ca_der());

    let old = be.jwt_keys().remove(0);
    assert_eq!(
        exchange_status(&app, &svid_by(&app, &old, FED_AGENT)).await,
        (200, String::new())
    );
    be.rotate();
    let new = be.jwt_keys().pop().unwrap();
    // Not known before the next refresh (about a second away).
    wait_authorities(&app, FED, 2, Duration::from_secs(10)).await;
    assert_eq!(
        exchange_status(&app, &svid_by(&app, &new, FED_AGENT)).await,
        (200, String::new())
    );
    be.retire();
    wait_authorities(&app, FED, 1, Duration::from_secs(10)).await;
    let got = exchange_status(&app, &svid_by(&app, &old, FED_AGENT)).await;
    assert!(is(&got, REFUSED), "{got:?}");
    assert_eq!(
        exchange_status(&app, &svid_by(&app, &new, FED_AGENT)).await,
        (200, String::new())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_hint_below_the_configured_minimum_is_raised_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let be = BundleEndpoint::start(dir.path(), FED, 1);
    let app = fed_app(endpoint_td(
        &be,
        "refresh_hint_min = \"3s\"\nrefresh_hint_max = \"10s\"\n",
    ))
    .await;
    wait_trust_domain(&app, FED, "ok", Duration::from_secs(10)).await;
    let first = be.requests();
    tokio::time::sleep(Duration::from_millis(6500)).await;
    // The endpoint asks for a refresh every second; the broker waits 3 s between fetches.
    let more = be.requests() - first;
    assert!((1..=3).contains(&more), "{more} fetches in 6.5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_endpoint_down_serves_until_stale_then_fails_closed_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut be = BundleEndpoint::start(dir.path(), FED, 1);
    let app = fed_app(endpoint_td(
        &be,
        "refresh_hint_min = \"1s\"\nrefresh_hint_max = \"1s\"\nmax_bundle_age = \"4s\"\n",
    ))
    .await;
    wait_trust_domain(&app, FED, "ok", Duration::from_secs(10)).await;
    let key = be.jwt_keys().remove(0);
    be.stop();
    let stopped = Instant::now();
    // Within max_bundle_age the bundle held keeps serving.
    assert_eq!(
        exchange_status(&app, &svid_by(&app, &key, FED_AGENT)).await,
        (200, String::new())
    );
    assert!(stopped.elapsed() < Duration::from_secs(3));
    let v = wait_trust_domain(&app, FED, "not ready: stale", Duration::from_secs(10)).await;
    assert!(
        stopped.elapsed() >= Duration::from_secs(2),
        "stale too early: {v}"
    );
    assert_eq!(v["trust_domains_not_ready"], json!([FED]));
    let got = exchange_status(&app, &svid_by(&app, &key, FED_AGENT)).await;
    assert!(is(&got, FAILS_CLOSED), "{got:?}");
    app.assert_still_serving().await;
    be.start_again();
    wait_trust_domain(&app, FED, "ok", Duration::from_secs(10)).await;
    assert_eq!(
        exchange_status(&app, &svid_by(&app, &key, FED_AGENT)).await,
        (200, String::new())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_endpoint_whose_certificate_is_not_trusted_is_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let be = BundleEndpoint::start(dir.path(), FED, 1);
    // No bundle_endpoint_ca: the test CA is not a web PKI root.
    let section = format!(
        "[[spiffe.trust_domains]]\nname = \"{FED}\"\nbundle_endpoint = \"{}\"\naudience = \"{AUD}\"\n",
        be.url
    );
    let app = fed_app(section).await;
    let v = wait_trust_domain(
        &app,
        FED,
        "not ready: no bundle loaded yet: GET",
        Duration::from_secs(10),
    )
    .await;
    let reason = v["checks"]["trust_domains"][FED]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(reason.contains("certificate"), "{reason}");
    let key = be.jwt_keys().remove(0);
    let got = exchange_status(&app, &svid_by(&app, &key, FED_AGENT)).await;
    assert!(is(&got, FAILS_CLOSED), "{got:?}");
    assert_eq!(be.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_own_x509_svid_is_followed_through_rotations_and_outages() {
    use writ::identity::workload_api::X509SvidWatch;
    let dir = tempfile::tempdir().unwrap();
    let mut wapi = WorkloadApi::start(dir.path(), "spiffe://wl.test/writ", &[]);
    let (mut watch, task) = X509SvidWatch::spawn(wapi.url());
    // What a TLS server installs: every SVID in turn; one it refuses is skipped.
    let installed = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<Vec<u8>>::new()));
    let sink = installed.clone();
    let applier = tokio::spawn(watch.clone().apply_each(move |svid| {
        let leaf = svid.cert_chain.first().cloned().unwrap_or_default();
        if leaf.is_empty() {
            return Err("no leaf");
        }
        sink.lock().push(leaf);
        Ok(())
    }));
    let first = watch.first(Duration::from_secs(10)).await.unwrap();
    let (cert, key) = wapi.svid_der();
    assert_eq!(first.spiffe_id, "spiffe://wl.test/writ");
    assert_eq!(first.cert_chain, vec![cert.clone()]);
    assert_eq!(first.key_pkcs8_der(), key.as_slice());
    assert!(
        !format!("{first:?}").contains("key_pkcs8"),
        "the key is not printed"
    );

    let next = |watch: &mut X509SvidWatch| {
        let mut w = watch.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(15), w.changed())
                .await
                .expect("a new SVID")
                .unwrap()
        }
    };
    wapi.rotate();
    let rotated = next(&mut watch).await;
    let (cert2, key2) = wapi.svid_der();
    assert_ne!(cert2, cert);
    assert_eq!(rotated.cert_chain, vec![cert2.clone()]);
    assert_eq!(rotated.key_pkcs8_der(), key2.as_slice());

    // The agent away: the last SVID stays (it is valid until it expires).
    wapi.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(watch.current().unwrap().cert_chain, vec![cert2.clone()]);
    // Back, then rotated: followed again without a new watch.
    wapi.start_again();
    let mut w = watch.clone();
    wapi.rotate_ca();
    let (cert3, _) = wapi.svid_der();
    let start = Instant::now();
    while w.current().unwrap().cert_chain != vec![cert3.clone()] {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the re-issued SVID never came"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), w.changed()).await;
    }
    let start = Instant::now();
    while installed.lock().last() != Some(&cert3) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "not installed: {:?}",
            installed.lock().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = installed.lock().clone();
    assert_eq!(
        seen.first(),
        Some(&cert),
        "the first SVID is installed first"
    );
    assert!(seen.contains(&cert2), "each rotation is installed");
    task.abort();
    applier.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_serves_the_brokers_x509_svid_from_the_workload_api_and_its_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let mut wapi = WorkloadApi::start(dir.path(), "spiffe://wl.test/writ", &[]);
    let app = spawn_app_with(Options {
        server_extra: format!("[server.tls]\nworkload_api = \"{}\"\n", wapi.url()),
        ..Options::default()
    })
    .await;
    assert!(app.base.starts_with("https://"));
    // A client that trusts the trust domain's CA only, as a SPIFFE workload would.
    let served = |ca: Vec<u8>| {
        let base = app.base.clone();
        async move {
            let client = reqwest::Client::builder()
                .use_rustls_tls()
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_der(&ca).unwrap())
                .danger_accept_invalid_hostnames(true)
                .tls_info(true)
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let resp = client.get(format!("{base}/healthz")).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.extensions()
                .get::<reqwest::tls::TlsInfo>()
                .unwrap()
                .peer_certificate()
                .unwrap()
                .to_vec()
        }
    };
    let ca = wapi.ca_ders(WL).remove(0);
    assert_eq!(served(ca.clone()).await, wapi.svid_der().0);
    // A rotated SVID is served to new connections without a restart.
    wapi.rotate();
    let rotated = wapi.svid_der().0;
    let start = Instant::now();
    while served(ca.clone()).await != rotated {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the rotated SVID is not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the broker still answers over it.
    let (s, v) = app.get("/readyz").await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_svid_of_a_workload_api_trust_domain_fails_closed_while_the_agent_is_away() {
    let dir = tempfile::tempdir().unwrap();
    // The agent's SVID is an agent's identity here, presented as the mTLS client certificate.
    let mut wapi = WorkloadApi::start(dir.path(), WL_AGENT, &[]);
    let app = spawn_app_with(Options {
        server_extra: format!(
            "[server.tls]\nworkload_api = \"{}\"\nclient_auth = \"optional\"\n",
            wapi.url()
        ),
        extra_config: format!(
            "[[spiffe.trust_domains]]\nname = \"{WL}\"\nworkload_api = \"{}\"\naudience = \"{AUD}\"\n",
            wapi.url()
        ),
        extra_policy: policy_for(&[WL]),
        ..Options::default()
    })
    .await;
    wait_trust_domain(&app, WL, "ok", Duration::from_secs(10)).await;
    let ca = wapi.ca_ders(WL).remove(0);
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_der(&ca).unwrap())
        .danger_accept_invalid_hostnames(true)
        .identity(reqwest::Identity::from_pem(wapi.svid_pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let token = |client: reqwest::Client| {
        let base = app.base.clone();
        async move {
            let resp = client
                .post(format!("{base}/oauth2/token"))
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("scope", "repo:read"),
                    ("audience", API),
                ])
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap();
            (status, v)
        }
    };
    let (s, v) = token(client.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        claims_of(v["access_token"].as_str().unwrap())["sub"],
        WL_AGENT
    );

    wapi.stop();
    wait_trust_domain(&app, WL, "not ready", Duration::from_secs(10)).await;
    // The listener keeps its last SVID; the client's X509-SVID cannot be verified: 503.
    let (s, v) = token(client.clone()).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap_or("")),
        (503, "temporarily_unavailable"),
        "{v}"
    );

    wapi.start_again();
    wait_trust_domain(&app, WL, "ok", Duration::from_secs(15)).await;
    let (s, v) = token(client).await;
    assert_eq!(s, 200, "recovered without a restart: {v}");
}

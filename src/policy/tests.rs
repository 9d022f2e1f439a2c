use super::*;

const DEMO: &str = include_str!("../../config/policies/demo.cedar");

fn demo() -> PolicySet {
    PolicySet::from_sources(&[("demo.cedar".into(), DEMO.into())]).unwrap()
}

fn spiffe(id: &str) -> PolicyPrincipal {
    let parsed = crate::domain::parse_spiffe_id(id).unwrap();
    PolicyPrincipal {
        subject: id.into(),
        kind: PrincipalKind::Spiffe {
            trust_domain: parsed.trust_domain_name().into(),
            path: parsed.path().into(),
            spiffe_id: id.into(),
        },
    }
}

fn ctx() -> PolicyContext {
    PolicyContext {
        audience: vec!["https://api.example.org".into()],
        ttl: 300,
        source: "jwt-svid".into(),
        ..PolicyContext::default()
    }
}

#[test]
fn demo_permits_agents_and_caps_ttl() {
    let set = demo();
    let d = set.decide(
        &spiffe("spiffe://dev.writ.local/agent/demo"),
        PolicyAction::Exchange,
        "repo:read",
        &ctx(),
    );
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.max_ttl, Some(Duration::from_secs(300)));
    assert_eq!(d.policies, vec!["agent-repo-read".to_string()]);
    let d = set.decide(
        &spiffe("spiffe://dev.writ.local/other/x"),
        PolicyAction::Exchange,
        "repo:read",
        &ctx(),
    );
    assert!(!d.allowed);
    assert!(d.policies.is_empty());
    let d = set.decide(
        &spiffe("spiffe://other.org/agent/demo"),
        PolicyAction::Exchange,
        "repo:read",
        &ctx(),
    );
    assert!(!d.allowed);
}

#[test]
fn several_scopes_are_decided_separately() {
    let set = demo();
    let mut c = ctx();
    c.purpose = "fix".into();
    let ds = set.decide_all(
        &spiffe("spiffe://dev.writ.local/agent/demo"),
        PolicyAction::Exchange,
        &["repo:read".into(), "repo:write".into(), "repo:admin".into()],
        &c,
    );
    assert_eq!(
        ds.iter().map(|d| d.allowed).collect::<Vec<_>>(),
        vec![true, true, false]
    );
    assert_eq!(ds[1].max_ttl, Some(Duration::from_secs(120)));
}

#[test]
fn oidc_principals_and_claims() {
    let src = r#"
        permit (principal in Writ::Issuer::"https://token.actions.githubusercontent.com",
                action == Writ::Action::"exchange", resource == Writ::Scope::"deploy")
        when { principal.claims has repository && principal.claims.repository == "org/app"
               && !(principal.claims has namespace) };
        permit (principal in Writ::Issuer::"https://k8s.example.org",
                action == Writ::Action::"exchange", resource == Writ::Scope::"db:read")
        when { principal.claims has service_account && principal.claims.service_account == "api" };
    "#;
    let set = PolicySet::from_sources(&[("oidc.cedar".into(), src.into())]).unwrap();
    let mk = |issuer: &str, claims: Value| PolicyPrincipal {
        subject: format!("{issuer}#x"),
        kind: PrincipalKind::Oidc {
            issuer: issuer.into(),
            sub: "x".into(),
            claims: claims.as_object().cloned().unwrap_or_default(),
        },
    };
    let gh = "https://token.actions.githubusercontent.com";
    assert!(
        set.decide(
            &mk(gh, serde_json::json!({"repository": "org/app"})),
            PolicyAction::Exchange,
            "deploy",
            &ctx()
        )
        .allowed
    );
    assert!(
        !set.decide(
            &mk(gh, serde_json::json!({"repository": "org/other"})),
            PolicyAction::Exchange,
            "deploy",
            &ctx()
        )
        .allowed
    );
    assert!(
        !set.decide(
            &mk(gh, serde_json::json!({})),
            PolicyAction::Exchange,
            "deploy",
            &ctx()
        )
        .allowed
    );
    let k8s = serde_json::json!({"kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "api"}}});
    assert!(
        set.decide(
            &mk("https://k8s.example.org", k8s),
            PolicyAction::Exchange,
            "db:read",
            &ctx()
        )
        .allowed
    );
}

#[test]
fn schema_violations_and_syntax_errors_name_the_file() {
    let bad_attr = r#"permit (principal, action == Writ::Action::"exchange", resource) when { principal.nope == "x" };"#;
    let e = PolicySet::from_sources(&[
        ("a.cedar".into(), DEMO.into()),
        ("bad.cedar".into(), bad_attr.into()),
    ])
    .unwrap_err();
    assert!(matches!(e, PolicyError::Invalid(_)), "{e}");
    assert!(e.to_string().contains("`bad.cedar`"), "{e}");
    let bad_type = r#"permit (principal == Writ::User::"x", action, resource);"#;
    let e = PolicySet::from_sources(&[("t.cedar".into(), bad_type.into())]).unwrap_err();
    assert!(e.to_string().contains("`t.cedar`"), "{e}");
    let e = PolicySet::from_sources(&[(
        "s.cedar".into(),
        "permit (principal, action, resource".into(),
    )])
    .unwrap_err();
    assert!(
        matches!(&e, PolicyError::Parse { file, .. } if file == "s.cedar"),
        "{e}"
    );
    assert!(e.to_string().contains("line 1"), "{e}");
}

#[test]
fn annotations_are_checked_at_load() {
    let bad = r#"@max_ttl("garbage") permit (principal, action, resource);"#;
    let e = PolicySet::from_sources(&[("m.cedar".into(), bad.into())]).unwrap_err();
    assert!(
        matches!(&e, PolicyError::Annotation { id, .. } if id == "m:0"),
        "{e}"
    );
    let forbid = r#"@max_ttl("5m") forbid (principal, action, resource);"#;
    assert!(PolicySet::from_sources(&[("f.cedar".into(), forbid.into())]).is_err());
    let dup = r#"@id("x") permit (principal, action, resource); @id("x") permit (principal, action, resource);"#;
    assert!(matches!(
        PolicySet::from_sources(&[("d.cedar".into(), dup.into())]),
        Err(PolicyError::DuplicateId { .. })
    ));
    let approval = r#"@approval("required") permit (principal, action, resource);"#;
    let set = PolicySet::from_sources(&[("a.cedar".into(), approval.into())]).unwrap();
    let d = set.decide(
        &spiffe("spiffe://a.org/x"),
        PolicyAction::Exchange,
        "s",
        &ctx(),
    );
    assert!(d.allowed && d.approval_required);
}

#[test]
fn version_is_stable_and_follows_content() {
    let a = ("a.cedar".to_string(), DEMO.to_string());
    let b = (
        "b.cedar".to_string(),
        r#"permit (principal, action == Writ::Action::"exchange", resource == Writ::Scope::"x");"#
            .to_string(),
    );
    let v1 = PolicySet::from_sources(&[a.clone(), b.clone()])
        .unwrap()
        .version()
        .to_string();
    let v2 = PolicySet::from_sources(&[b.clone(), a.clone()])
        .unwrap()
        .version()
        .to_string();
    assert_eq!(v1, v2);
    assert_eq!(v1.len(), 64);
    let b2 = ("b.cedar".to_string(), format!("{}\n", b.1));
    assert_ne!(v1, PolicySet::from_sources(&[a, b2]).unwrap().version());
}

#[test]
fn an_evaluation_error_is_a_deny() {
    // Overflow at run time passes validation but errors when evaluated.
    let src =
        r#"permit (principal, action, resource) when { context.ttl * 9223372036854775807 > 0 };"#;
    let set = PolicySet::from_sources(&[("o.cedar".into(), src.into())]).unwrap();
    let d = set.decide(
        &spiffe("spiffe://a.org/x"),
        PolicyAction::Exchange,
        "s",
        &ctx(),
    );
    assert!(!d.allowed);
    assert!(!d.errors.is_empty());
}

#[test]
fn reload_keeps_the_old_set_when_the_new_one_is_bad() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("demo.cedar"), DEMO).unwrap();
    let handle = PolicyHandle::new(
        PolicySet::load_dir(dir.path()).unwrap(),
        dir.path().to_path_buf(),
    );
    let v1 = handle.current().version().to_string();
    assert!(!handle.reload().unwrap().changed);
    std::fs::write(dir.path().join("bad.cedar"), "permit (").unwrap();
    assert!(handle.reload().is_err());
    assert_eq!(handle.current().version(), v1);
    std::fs::remove_file(dir.path().join("bad.cedar")).unwrap();
    std::fs::write(
        dir.path().join("more.cedar"),
        r#"permit (principal, action == Writ::Action::"exchange", resource == Writ::Scope::"x");"#,
    )
    .unwrap();
    let out = handle.reload().unwrap();
    assert!(out.changed);
    assert_eq!(out.old_version, v1);
    assert_eq!(handle.current().version(), out.new_version);
    assert!(matches!(
        PolicySet::load_dir(&dir.path().join("missing")),
        Err(PolicyError::ReadDir { .. })
    ));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        PolicySet::load_dir(empty.path()),
        Err(PolicyError::Empty(_))
    ));
}

#[tokio::test]
async fn watcher_reloads_on_change_and_reports_a_bad_set_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("demo.cedar"), DEMO).unwrap();
    let handle = Arc::new(PolicyHandle::new(
        PolicySet::load_dir(dir.path()).unwrap(),
        dir.path().to_path_buf(),
    ));
    let events: Arc<parking_lot::Mutex<Vec<Result<ReloadOutcome, String>>>> = Arc::default();
    let ev = events.clone();
    let task = spawn_watcher(
        handle.clone(),
        Duration::from_millis(50),
        Arc::new(move |r| ev.lock().push(r.map_err(|e| e.to_string()))),
    );
    std::fs::write(dir.path().join("bad.cedar"), "permit (").unwrap();
    let mut waited = 0;
    while events.lock().is_empty() && waited < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(events.lock().len(), 1, "a bad set is reported once");
    assert!(events.lock()[0].is_err());
    std::fs::write(
        dir.path().join("bad.cedar"),
        r#"permit (principal, action == Writ::Action::"exchange", resource == Writ::Scope::"y");"#,
    )
    .unwrap();
    let mut waited = 0;
    while events.lock().len() < 2 && waited < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
    }
    assert!(matches!(&events.lock()[1], Ok(o) if o.changed));
    task.abort();
}

#[test]
fn sample_cases_pass_and_wrong_expectations_fail() {
    let set = demo();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let report = run_cases(&set, &root.join("config/policies/cases.json")).unwrap();
    assert_eq!(report.passed, report.total, "{:?}", report.failures);
    assert!(report.total >= 5);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.json");
    std::fs::write(&f, r#"{"cases": [{"name": "wrong", "principal": "spiffe://dev.writ.local/agent/demo", "scope": "repo:read", "expect": "deny"}]}"#).unwrap();
    let report = run_cases(&set, &f).unwrap();
    assert_eq!(report.passed, 0);
    assert!(
        report.failures[0].starts_with("wrong: expected deny but got allow"),
        "{:?}",
        report.failures
    );
}

#[test]
fn scopes_are_listed_only_when_every_permit_names_one() {
    let named = r#"
permit (principal, action == Writ::Action::"exchange", resource == Writ::Scope::"b:read");
permit (principal, action == Writ::Action::"exchange", resource == Writ::Scope::"a:read");
forbid (principal, action, resource);
"#;
    let set = PolicySet::from_sources(&[("n.cedar".into(), named.into())]).unwrap();
    assert_eq!(
        set.scopes_supported(),
        Some(vec!["a:read".to_string(), "b:read".to_string()])
    );
    let open =
        format!("{named}\npermit (principal, action == Writ::Action::\"exchange\", resource);\n");
    let set = PolicySet::from_sources(&[("o.cedar".into(), open)]).unwrap();
    assert_eq!(set.scopes_supported(), None);
}

/// `n` policies, one scope each.
fn permits(n: usize) -> String {
    (0..n)
        .map(|i| format!("permit (principal, action == Writ::Action::\"exchange\", resource == Writ::Scope::\"s{i}\");\n"))
        .collect()
}

fn handle_of(dir: &Path, guard: ShrinkGuard) -> PolicyHandle {
    PolicyHandle::new(PolicySet::load_dir(dir).unwrap(), dir.to_path_buf()).with_guard(guard)
}

#[test]
fn an_emptied_file_is_refused_and_restoring_it_works() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.cedar");
    std::fs::write(&file, DEMO).unwrap();
    let handle = handle_of(dir.path(), ShrinkGuard::default());
    let v1 = handle.current().version().to_string();
    std::fs::write(&file, "").unwrap();
    let e = handle.reload().unwrap_err();
    assert!(matches!(e, PolicyError::Shrunk { new: 0, .. }), "{e}");
    assert!(e.to_string().contains("policy.allow_empty"), "{e}");
    assert_eq!(handle.current().version(), v1, "the old set keeps serving");
    std::fs::write(&file, DEMO).unwrap();
    assert!(!handle.reload().unwrap().changed);
    assert_eq!(handle.current().version(), v1);
}

#[test]
fn a_reload_that_drops_more_than_the_share_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.cedar");
    std::fs::write(&file, permits(5)).unwrap();
    let handle = handle_of(dir.path(), ShrinkGuard::default());
    std::fs::write(&file, permits(2)).unwrap();
    let e = handle.reload().unwrap_err();
    assert!(
        matches!(e, PolicyError::Shrunk { old: 5, new: 2, .. }),
        "a 60% drop: {e}"
    );
    assert_eq!(handle.current().policy_count(), 5);
    std::fs::write(&file, permits(3)).unwrap();
    assert!(handle.reload().unwrap().changed, "a 40% drop is allowed");
    assert_eq!(handle.current().policy_count(), 3);

    let guard = ShrinkGuard {
        allow_empty: true,
        ..ShrinkGuard::default()
    };
    std::fs::write(&file, permits(5)).unwrap();
    let handle = handle_of(dir.path(), guard);
    std::fs::write(&file, permits(2)).unwrap();
    assert!(handle.reload().unwrap().changed);
    std::fs::write(&file, "").unwrap();
    assert!(handle.reload().unwrap().changed);
    assert_eq!(handle.current().policy_count(), 0);
}

type Events = Arc<parking_lot::Mutex<Vec<Result<ReloadOutcome, String>>>>;

fn watch(handle: &Arc<PolicyHandle>) -> (Events, tokio::task::JoinHandle<()>) {
    let events: Events = Arc::default();
    let ev = events.clone();
    let task = spawn_watcher(
        handle.clone(),
        Duration::from_millis(50),
        Arc::new(move |r| ev.lock().push(r.map_err(|e| e.to_string()))),
    );
    (events, task)
}

async fn until_events(events: &Events, n: usize) {
    let start = std::time::Instant::now();
    while events.lock().len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{n} events expected: {:?}",
            events.lock()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(unix)]
#[tokio::test]
async fn the_watcher_follows_a_configmap_symlink_swap() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("..2026_01")).unwrap();
    std::fs::write(root.join("..2026_01/demo.cedar"), permits(2)).unwrap();
    symlink("..2026_01", root.join("..data")).unwrap();
    symlink("..data/demo.cedar", root.join("demo.cedar")).unwrap();
    let handle = Arc::new(handle_of(root, ShrinkGuard::default()));
    assert_eq!(handle.current().policy_count(), 2);
    let (events, task) = watch(&handle);
    // The kubelet's swap: a new timestamped directory, a new symlink renamed over `..data`.
    std::fs::create_dir(root.join("..2026_02")).unwrap();
    std::fs::write(root.join("..2026_02/demo.cedar"), permits(3)).unwrap();
    symlink("..2026_02", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    until_events(&events, 1).await;
    assert!(matches!(&events.lock()[0], Ok(o) if o.changed));
    assert_eq!(handle.current().policy_count(), 3);
    task.abort();
}

#[tokio::test]
async fn a_set_refused_again_is_reported_once() {
    // What the watcher does on each SIGHUP: reload and report.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("demo.cedar"), DEMO).unwrap();
    let handle = Arc::new(handle_of(dir.path(), ShrinkGuard::default()));
    let events: Events = Arc::default();
    let ev = events.clone();
    let on_event =
        move |r: Result<ReloadOutcome, PolicyError>| ev.lock().push(r.map_err(|e| e.to_string()));
    let mut last_refused = None;
    std::fs::write(dir.path().join("bad.cedar"), "permit (").unwrap();
    for _ in 0..3 {
        reload_and_report(&handle, &mut last_refused, &on_event).await;
    }
    let seen = events.lock().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    // Another refused set is reported; so is the first again after a good load in between.
    std::fs::write(dir.path().join("bad.cedar"), "permit ((").unwrap();
    reload_and_report(&handle, &mut last_refused, &on_event).await;
    assert_eq!(events.lock().len(), 2);
    std::fs::remove_file(dir.path().join("bad.cedar")).unwrap();
    reload_and_report(&handle, &mut last_refused, &on_event).await;
    std::fs::write(dir.path().join("bad.cedar"), "permit ((").unwrap();
    reload_and_report(&handle, &mut last_refused, &on_event).await;
    assert_eq!(events.lock().len(), 3);
    assert!(events.lock().iter().all(Result::is_err));
}

#[cfg(unix)]
#[tokio::test]
async fn the_watcher_sees_an_edit_of_a_symlink_target() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("demo.cedar");
    std::fs::write(&target, permits(2)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("demo.cedar")).unwrap();
    let handle = Arc::new(handle_of(dir.path(), ShrinkGuard::default()));
    let (events, task) = watch(&handle);
    std::fs::write(&target, permits(3)).unwrap();
    until_events(&events, 1).await;
    assert_eq!(handle.current().policy_count(), 3);
    task.abort();
}

//! Delegation to sub-agents (SPEC §4.4): the two-step flow, the attenuation rules checked
//! before policy, one budget per tree, the atomic cascade, and the regressions of the four
//! ways the one-step flow broke the promise that a token never carries more than it was
//! given (widening, escape, lockout, budget bypass).

use std::sync::Arc;

use serde_json::{Value, json};
use writ::domain::TaskId;
use writ::store::TaskState;

use crate::helpers::*;

/// The sub-agent an orchestrator hands work to.
pub const SUB: &str = "spiffe://example.org/agent/sub/worker";
/// A resource server that receives task tokens.
pub const TICKETS_RS: &str = "spiffe://example.org/resource/tickets";
pub const TICKETS: &str = "https://tickets.example.org";
pub const EVIL: &str = "https://evil.example.net";

/// Opens a task for `AGENT` with `scope` at `audience`; returns (token, task id).
pub async fn open(app: &TestApp, scope: &str, audience: &str) -> (String, String) {
    let (s, v) = app
        .exchange(&app.svid(AGENT), scope, &[("audience", audience)])
        .await;
    assert_eq!(s, 200, "{v}");
    (
        v["access_token"].as_str().unwrap().to_string(),
        v["task_id"].as_str().unwrap().to_string(),
    )
}

/// Step 1: the owner of `task` mints a delegation grant for `actor` into it.
pub async fn grant(app: &TestApp, owner: &str, task: &str, actor: &str, scope: &str) -> String {
    let (s, v) = app
        .exchange(
            &app.svid(owner),
            scope,
            &[("task_id", task), ("audience", actor)],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    v["access_token"].as_str().unwrap().to_string()
}

/// Step 2: `actor_token` (when given, as a JWT) exchanges `grant` for `scope`; the audience is
/// the API unless `extra` names one.
pub async fn delegate_with(
    app: &TestApp,
    grant: &str,
    actor_token: Option<&str>,
    scope: &str,
    extra: &[(&str, &str)],
) -> (u16, Value) {
    let mut form = vec![
        ("grant_type", GRANT),
        ("subject_token", grant),
        ("subject_token_type", AT_TYPE),
        ("scope", scope),
    ];
    if let Some(a) = actor_token {
        form.push(("actor_token", a));
        form.push(("actor_token_type", JWT_TYPE));
    }
    if !extra
        .iter()
        .any(|(k, _)| *k == "audience" || *k == "resource")
    {
        form.push(("audience", API));
    }
    form.extend_from_slice(extra);
    let (s, v, _) = app.post_form("/oauth2/token", &form).await;
    (s, v)
}

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("")
}

// ---------------------------------------------------------------------------------------
// The four findings, as regression tests. Each tries the attack as it was found (a task
// token presented as subject_token, without an actor) and through the two-step flow.
// ---------------------------------------------------------------------------------------

/// Widening: a token for `tickets:read` at the tickets API for 30 s, received by the tickets
/// resource server, must not buy `repo:read` at another audience for longer.
#[tokio::test]
async fn a_received_token_cannot_be_widened_by_its_resource_server() {
    let app = spawn_app().await;
    let (_, task) = open(&app, "tickets:read repo:read", TICKETS).await;
    let (s, v) = app
        .exchange(
            &app.svid(AGENT),
            "tickets:read",
            &[("task_id", &task), ("audience", TICKETS), ("expires_in", "30")],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let received = v["access_token"].as_str().unwrap().to_string();

    // As found: the token itself as subject_token, no actor.
    let (s, v) = delegate_with(
        &app,
        &received,
        None,
        "repo:read",
        &[("audience", EVIL), ("expires_in", "300")],
    )
    .await;
    assert_eq!((s, error_of(&v)), (400, "invalid_request"), "{v}");
    // The resource server with its own identity as actor: it is not the grant's audience.
    let (s, v) = delegate_with(
        &app,
        &received,
        Some(&app.svid(TICKETS_RS)),
        "repo:read",
        &[("audience", EVIL), ("expires_in", "300")],
    )
    .await;
    assert_eq!((s, error_of(&v)), (400, "invalid_grant"), "{v}");

    // A real grant of tickets:read to the sub-agent: no wider scope, no other audience.
    let g = grant(&app, AGENT, &task, SUB, "tickets:read").await;
    let (s, v) = delegate_with(
        &app,
        &g,
        Some(&app.svid(SUB)),
        "repo:read",
        &[("audience", TICKETS)],
    )
    .await;
    assert_eq!((s, error_of(&v)), (400, "invalid_scope"), "{v}");
    let (s, v) = delegate_with(
        &app,
        &g,
        Some(&app.svid(SUB)),
        "tickets:read",
        &[("audience", EVIL)],
    )
    .await;
    assert_eq!((s, error_of(&v)), (400, "invalid_target"), "{v}");
    let (s, v) = delegate_with(
        &app,
        &g,
        Some(&app.svid(SUB)),
        "tickets:read",
        &[("audience", TICKETS), ("expires_in", "300")],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let child = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(child["scope"], "tickets:read");
    assert_eq!(child["aud"], TICKETS);
    let parent = app
        .broker
        .get_task(&TaskId::parse(&task).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(child["exp"].as_i64().unwrap() <= parent.deadline);
}

/// Ends `parent` while `threads` delegations from `g` run; returns the child tasks created.
async fn race_round(
    app: &Arc<TestApp>,
    parent_token: &str,
    parent: &str,
    g: &str,
    threads: usize,
) -> Vec<String> {
    let mut handles = Vec::new();
    for i in 0..threads {
        let app = app.clone();
        let g = g.to_string();
        handles.push(tokio::spawn(async move {
            // Half as found (no actor), half through the two-step flow.
            let actor = (i % 2 == 0).then(|| app.svid(SUB));
            delegate_with(&app, &g, actor.as_deref(), "repo:read", &[]).await
        }));
    }
    let (s, v) = app.end_task(parent, parent_token).await;
    assert_eq!(s, 200, "{v}");
    let mut children = Vec::new();
    for h in handles {
        let (s, v) = h.await.unwrap();
        match s {
            200 => children.push(v["access_token"].as_str().unwrap().to_string()),
            400 => assert!(
                ["invalid_grant", "invalid_request"].contains(&error_of(&v)),
                "{v}"
            ),
            _ => panic!("unexpected answer {s}: {v}"),
        }
    }
    children
}

/// No task below `root` is open, and none of `tokens` introspects active on `app`.
pub async fn assert_tree_closed(app: &TestApp, root: &str, tokens: &[String]) {
    let mut queue = vec![TaskId::parse(root).unwrap()];
    while let Some(id) = queue.pop() {
        let t = app.broker.get_task(&id).await.unwrap().unwrap();
        assert_ne!(t.state, TaskState::Open, "task {id} of an ended tree is open");
        queue.extend(app.broker.store.task_children(&id).await.unwrap());
    }
    for t in tokens {
        let v = app.introspect(t).await;
        assert_eq!(v["active"], false, "a token of an ended tree is active: {v}");
    }
}

pub async fn escape_race(app: Arc<TestApp>, rounds: usize, replica: Option<&TestApp>) {
    let mut delegated = 0;
    for _ in 0..rounds {
        let (token, task) = open(&app, "repo:read", API).await;
        let g = grant(&app, AGENT, &task, SUB, "repo:read").await;
        let children = race_round(&app, &token, &task, &g, 12).await;
        delegated += children.len();
        assert_tree_closed(&app, &task, &children).await;
        if let Some(r) = replica {
            assert_tree_closed(r, &task, &children).await;
        }
    }
    eprintln!("{delegated} delegations won the race in {rounds} rounds");
}

/// Escape: delegations racing the parent's end are refused or ended with it, never left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delegation_racing_its_parents_end_never_outlives_it_on_memory() {
    let app = Arc::new(spawn_app().await);
    escape_race(app, 100, None).await;
}

/// Lockout: refused delegations count against whoever presented them, never against the
/// owner of the task the grant belongs to.
#[tokio::test]
async fn refused_delegations_do_not_quarantine_the_owner() {
    let app = spawn_app_with(Options {
        extra_config: "[trips]\ndenials = { count = 3, window = \"1m\" }\nquarantine = \"10m\"\n"
            .into(),
        ..Options::default()
    })
    .await;
    let (held, task) = open(&app, "repo:read", API).await;
    // Any holder of the owner's token, asking for more than the task holds.
    for _ in 0..5 {
        let (s, v) = delegate_with(&app, &held, None, "repo:write", &[]).await;
        assert_eq!(s, 400, "{v}");
        let (s, v) = delegate_with(
            &app,
            &held,
            Some(&app.svid(TICKETS_RS)),
            "repo:write",
            &[],
        )
        .await;
        assert_eq!(s, 400, "{v}");
    }
    // The owner is not quarantined: its task and token stand, and it can still exchange.
    assert_eq!(app.introspect(&held).await["active"], true);
    let (s, v) = app.exchange(&app.svid(AGENT), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    let t = app
        .broker
        .get_task(&TaskId::parse(&task).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.state, TaskState::Open);
    // The one that was refused is.
    app.expect_error(
        &app.svid(TICKETS_RS),
        "tickets:read",
        &[],
        400,
        "invalid_grant",
    )
    .await;
}

/// Budget bypass: every token of the tree counts against the root task's `max_tokens`.
#[tokio::test]
async fn delegations_share_the_root_tasks_budget() {
    let app = spawn_app_with(Options {
        max_tokens: 5,
        ..Options::default()
    })
    .await;
    let (held, task) = open(&app, "repo:read", API).await;
    let g = grant(&app, AGENT, &task, SUB, "repo:read").await;
    // Two tokens of the root task so far: three left for the whole tree.
    let mut issued = 0;
    let mut last = None;
    for _ in 0..10 {
        for (token, actor) in [(&held, None), (&g, Some(app.svid(SUB)))] {
            let (s, v) = delegate_with(&app, token, actor.as_deref(), "repo:read", &[]).await;
            if s == 200 {
                issued += 1;
                last = Some(v["task_id"].as_str().unwrap().to_string());
            } else {
                assert_eq!(s, 400, "{v}");
            }
        }
    }
    assert_eq!(issued, 3, "the tree minted more than the root's budget");
    // Minting into a delegated task counts against the same budget.
    let child = last.unwrap();
    app.expect_error(
        &app.svid(SUB),
        "repo:read",
        &[("task_id", &child)],
        400,
        "invalid_grant",
    )
    .await;
    let root = app
        .broker
        .get_task(&TaskId::parse(&task).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(root.tokens_issued, 5);
}

//! Delegation to sub-agents (SPEC §4.4): the two-step flow, the attenuation rules checked
//! before policy, one budget per tree, the atomic cascade, and the regressions of the four
//! ways the one-step flow broke the promise that a token never carries more than it was
//! given (widening, escape, lockout, budget bypass).

use std::sync::Arc;

use serde_json::{Value, json};
use writ::domain::{Clock, TaskId};
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
            &[
                ("task_id", &task),
                ("audience", TICKETS),
                ("expires_in", "30"),
            ],
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

    // A grant for 30 s delegates nothing that lives longer: neither the child's token, asked
    // for 300 s, nor its task.
    let (s, v) = app
        .exchange(
            &app.svid(AGENT),
            "tickets:read",
            &[("task_id", &task), ("audience", SUB), ("expires_in", "30")],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let short = v["access_token"].as_str().unwrap().to_string();
    let short_exp = claims_of(&short)["exp"].as_i64().unwrap();
    let (s, v) = delegate_with(
        &app,
        &short,
        Some(&app.svid(SUB)),
        "tickets:read",
        &[("audience", TICKETS), ("expires_in", "300")],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let child = claims_of(v["access_token"].as_str().unwrap());
    assert!(child["exp"].as_i64().unwrap() <= short_exp, "{child}");
    let child_task = app
        .broker
        .get_task(&TaskId::parse(v["task_id"].as_str().unwrap()).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(child_task.deadline <= short_exp);
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
        assert_ne!(
            t.state,
            TaskState::Open,
            "task {id} of an ended tree is open"
        );
        queue.extend(app.broker.store.task_children(&id).await.unwrap());
    }
    for t in tokens {
        let v = app.introspect(t).await;
        assert_eq!(
            v["active"], false,
            "a token of an ended tree is active: {v}"
        );
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
        let (s, v) =
            delegate_with(&app, &held, Some(&app.svid(TICKETS_RS)), "repo:write", &[]).await;
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

// ---------------------------------------------------------------------------------------
// The two-step flow, the claims, the decision log.
// ---------------------------------------------------------------------------------------

const SUB2: &str = "spiffe://example.org/agent/sub/second";
const SUB3: &str = "spiffe://example.org/agent/sub/third";
const SUB4: &str = "spiffe://example.org/agent/sub/fourth";

/// A chain of delegations three deep: `sub` the root owner, `client_id` the actor, `act`
/// nested with the current actor outermost; policy decides each hop for its actor; the
/// fourth hop is refused by `tasks.max_delegation_depth`.
#[tokio::test]
async fn a_chain_three_deep_nests_act_and_the_fourth_hop_is_refused() {
    let app = spawn_app().await;
    let (_, root) = open(&app, "repo:read", API).await;
    let mut owner = AGENT.to_string();
    let mut task = root.clone();
    let mut chain: Option<Value> = None;
    let mut tokens = Vec::new();
    for (depth, actor) in [SUB, SUB2, SUB3].into_iter().enumerate() {
        let g = grant(&app, &owner, &task, actor, "repo:read").await;
        let (s, v) = delegate_with(&app, &g, Some(&app.svid(actor)), "repo:read", &[]).await;
        assert_eq!(s, 200, "hop {}: {v}", depth + 1);
        let token = v["access_token"].as_str().unwrap().to_string();
        let c = claims_of(&token);
        assert_eq!(c["sub"], AGENT, "sub is the root owner");
        assert_eq!(c["client_id"], actor);
        let mut want = json!({"sub": actor});
        if let Some(prev) = chain.take() {
            want["act"] = prev;
        }
        assert_eq!(c["act"], want);
        chain = Some(want);
        let t = app
            .broker
            .get_task(&TaskId::parse(v["task_id"].as_str().unwrap()).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((t.depth, t.owner.as_str()), (depth as u32 + 1, actor));
        assert_eq!(t.parent.unwrap().as_str(), task);
        // Introspection returns the chain.
        let i = app.introspect(&token).await;
        assert_eq!(
            (i["active"].clone(), i["act"].clone()),
            (json!(true), c["act"].clone())
        );
        owner = actor.to_string();
        task = v["task_id"].as_str().unwrap().to_string();
        tokens.push(token);
    }
    let g = grant(&app, &owner, &task, SUB4, "repo:read").await;
    let (s, v) = delegate_with(&app, &g, Some(&app.svid(SUB4)), "repo:read", &[]).await;
    assert_eq!((s, error_of(&v)), (400, "invalid_grant"), "{v}");

    // The decision log names the actor, for whom it acts, and the whole chain.
    let allows: Vec<Value> = app
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "exchange" && r["reason"] == "delegation permitted")
        .collect();
    assert_eq!(allows.len(), 3);
    let last = &allows[2];
    assert_eq!(last["subject"], SUB3);
    assert_eq!(last["detail"]["actor"], SUB3);
    assert_eq!(last["detail"]["on_behalf_of"], AGENT);
    assert_eq!(last["detail"]["act"], chain.unwrap());
    assert_eq!(last["detail"]["depth"], 3);
    let refused = app
        .audit_records()
        .into_iter()
        .rev()
        .find(|r| r["event"] == "exchange" && r["decision"] == "deny")
        .unwrap();
    assert_eq!(refused["subject"], SUB4);
    assert_eq!(refused["detail"]["on_behalf_of"], AGENT);

    // Ending the root ends the whole chain.
    let root_token = {
        let (s, v) = app
            .exchange(&app.svid(AGENT), "repo:read", &[("task_id", &root)])
            .await;
        assert_eq!(s, 200, "{v}");
        v["access_token"].as_str().unwrap().to_string()
    };
    let (s, v) = app.end_task(&root, &root_token).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["revoked_tasks"], 4, "{v}");
    assert_tree_closed(&app, &root, &tokens).await;
}

/// Policy sees the actor as principal with `on_behalf_of`, `parent_task` and `depth`.
#[tokio::test]
async fn policy_decides_for_the_actor_with_the_delegation_context() {
    let app = spawn_app().await;
    std::fs::write(
        app.path("policies/orchestrator.cedar"),
        r#"
@id("orchestrator-sub-agents-only")
forbid (principal, action == Writ::Action::"delegate", resource)
when {
  context.on_behalf_of == "spiffe://example.org/agent/orchestrator" &&
  !(principal.path like "/agent/sub/*")
};
@id("no-grandchildren-of-a-named-task")
forbid (principal, action == Writ::Action::"delegate", resource)
when { context.parent_task == "tsk_AAAAAAAAAAAAAAAAAAAAAA" };
"#,
    )
    .unwrap();
    app.broker.policy.reload().unwrap();
    let orchestrator = "spiffe://example.org/agent/orchestrator";
    let (_, task) = {
        let (s, v) = app
            .exchange(&app.svid(orchestrator), "repo:read", &[])
            .await;
        assert_eq!(s, 200, "{v}");
        (
            v["access_token"].as_str().unwrap().to_string(),
            v["task_id"].as_str().unwrap().to_string(),
        )
    };
    // An agent outside /agent/sub/* may not act for the orchestrator.
    let other = "spiffe://example.org/agent/other";
    let g = grant(&app, orchestrator, &task, other, "repo:read").await;
    let (s, v) = delegate_with(&app, &g, Some(&app.svid(other)), "repo:read", &[]).await;
    assert_eq!((s, error_of(&v)), (400, "invalid_scope"), "{v}");
    let deny = app
        .audit_records()
        .into_iter()
        .rev()
        .find(|r| r["decision"] == "deny")
        .unwrap();
    assert_eq!(deny["policies"], json!(["orchestrator-sub-agents-only"]));
    assert_eq!(deny["subject"], other);
    // A sub-agent may.
    let g = grant(&app, orchestrator, &task, SUB, "repo:read").await;
    let (s, v) = delegate_with(&app, &g, Some(&app.svid(SUB)), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
}

/// Every bad input of a delegation, with its exact answer.
#[tokio::test]
async fn bad_delegations_get_their_exact_errors() {
    let app = spawn_app().await;
    let (held, task) = open(&app, "repo:read tickets:read", API).await;
    let g = grant(&app, AGENT, &task, SUB, "repo:read").await;
    let actor = app.svid(SUB);
    let expect = |s: u16, v: &Value, want: (u16, &str)| assert_eq!((s, error_of(v)), want, "{v}");

    // No actor_token.
    let (s, v) = delegate_with(&app, &g, None, "repo:read", &[]).await;
    expect(s, &v, (400, "invalid_request"));
    // actor_token_type missing, or not an identity token type.
    for kind in [None, Some(AT_TYPE), Some("urn:x:unknown")] {
        let mut form = vec![
            ("grant_type", GRANT),
            ("subject_token", g.as_str()),
            ("subject_token_type", AT_TYPE),
            ("actor_token", actor.as_str()),
            ("scope", "repo:read"),
            ("audience", API),
        ];
        if let Some(k) = kind {
            form.push(("actor_token_type", k));
        }
        let (s, v, _) = app.post_form("/oauth2/token", &form).await;
        expect(s, &v, (400, "invalid_request"));
    }
    // An actor_token where no delegation is asked.
    let (s, v) = app
        .exchange(
            &app.svid(AGENT),
            "repo:read",
            &[("actor_token", &actor), ("actor_token_type", JWT_TYPE)],
        )
        .await;
    expect(s, &v, (400, "invalid_request"));
    // The actor token expired, or is not an identity token at all.
    let now = app.clock.now();
    let expired = app.svid_with(json!({"sub": SUB, "iat": now - 600, "exp": now - 300}));
    let (s, v) = delegate_with(&app, &g, Some(&expired), "repo:read", &[]).await;
    expect(s, &v, (400, "invalid_request"));
    let (s, v) = delegate_with(&app, &g, Some(&held), "repo:read", &[]).await;
    expect(s, &v, (400, "invalid_request"));
    // The actor is not in the grant's audience.
    let (s, v) = delegate_with(&app, &g, Some(&app.svid(SUB2)), "repo:read", &[]).await;
    expect(s, &v, (400, "invalid_grant"));
    // A scope outside the grant (tickets:read is in the parent task, not in the grant).
    let (s, v) = delegate_with(&app, &g, Some(&actor), "tickets:read", &[]).await;
    expect(s, &v, (400, "invalid_scope"));
    // An audience outside the parent task.
    let (s, v) = delegate_with(
        &app,
        &g,
        Some(&actor),
        "repo:read",
        &[("audience", "https://other.example.org")],
    )
    .await;
    expect(s, &v, (400, "invalid_target"));
    // task_id with a grant.
    let (s, v) = delegate_with(&app, &g, Some(&actor), "repo:read", &[("task_id", &task)]).await;
    expect(s, &v, (400, "invalid_request"));
    // The exchange still works with the right inputs.
    let (s, v) = delegate_with(&app, &g, Some(&actor), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");

    // A revoked grant (RFC 7009).
    let g2 = grant(&app, AGENT, &task, SUB, "repo:read").await;
    let (s, _, _) = app.post_form("/oauth2/revoke", &[("token", &g2)]).await;
    assert_eq!(s, 200);
    let (s, v) = delegate_with(&app, &g2, Some(&actor), "repo:read", &[]).await;
    expect(s, &v, (400, "invalid_request"));
    // A grant of an ended task.
    let (s, v) = app.end_task(&task, &held).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = delegate_with(&app, &g, Some(&actor), "repo:read", &[]).await;
    expect(s, &v, (400, "invalid_request"));
}

/// Depth beyond `tasks.max_delegation_depth` is refused, whatever policy says.
#[tokio::test]
async fn max_delegation_depth_is_a_config_key() {
    let app = spawn_app().await;
    let text = app.config_text.replace(
        "max_tokens = 50",
        "max_tokens = 50\nmax_delegation_depth = 1",
    );
    let app = spawn_with_text_in(&app, &text).await;
    let (_, task) = open(&app, "repo:read", API).await;
    let g = grant(&app, AGENT, &task, SUB, "repo:read").await;
    let (s, v) = delegate_with(&app, &g, Some(&app.svid(SUB)), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    let child = v["task_id"].as_str().unwrap().to_string();
    let g = grant(&app, SUB, &child, SUB2, "repo:read").await;
    let (s, v) = delegate_with(&app, &g, Some(&app.svid(SUB2)), "repo:read", &[]).await;
    assert_eq!((s, error_of(&v)), (400, "invalid_grant"), "{v}");
}

async fn spawn_with_text_in(first: &TestApp, text: &str) -> TestApp {
    let text = text.to_string();
    spawn_edited(first, move |_| text.clone()).await
}

/// Revoking a grant ends the tasks delegated from it (and theirs), by RFC 7009 and by an
/// admin `jti` revocation; the parent task and other grants' tasks stay.
#[tokio::test]
async fn revoking_a_grant_ends_the_tasks_delegated_from_it() {
    let app = spawn_app().await;
    let (held, task) = open(&app, "repo:read", API).await;
    for how in ["rfc7009", "admin"] {
        let g = grant(&app, AGENT, &task, SUB, "repo:read").await;
        let other = grant(&app, AGENT, &task, SUB, "repo:read").await;
        let (s, v) = delegate_with(&app, &g, Some(&app.svid(SUB)), "repo:read", &[]).await;
        assert_eq!(s, 200, "{v}");
        let child = v["access_token"].as_str().unwrap().to_string();
        let child_task = v["task_id"].as_str().unwrap().to_string();
        let g2 = grant(&app, SUB, &child_task, SUB2, "repo:read").await;
        let (s, v) = delegate_with(&app, &g2, Some(&app.svid(SUB2)), "repo:read", &[]).await;
        assert_eq!(s, 200, "{v}");
        let grandchild = v["access_token"].as_str().unwrap().to_string();
        let (s, v) = delegate_with(&app, &other, Some(&app.svid(SUB)), "repo:read", &[]).await;
        assert_eq!(s, 200, "{v}");
        let sibling = v["access_token"].as_str().unwrap().to_string();
        match how {
            "rfc7009" => {
                let (s, _, _) = app.post_form("/oauth2/revoke", &[("token", &g)]).await;
                assert_eq!(s, 200);
            }
            _ => {
                let jti = claims_of(&g)["jti"].as_str().unwrap().to_string();
                let (s, v) = app
                    .admin_revoke(json!({"selector": {"jti": jti}, "reason": "leaked"}))
                    .await;
                assert_eq!(s, 200, "{v}");
                assert_eq!(v["revoked_tasks"], 2, "{v}");
            }
        }
        assert_tree_closed(&app, &child_task, &[child, grandchild]).await;
        assert_eq!(app.introspect(&held).await["active"], true, "{how}");
        assert_eq!(app.introspect(&sibling).await["active"], true, "{how}");
        // And no delegation from it afterwards.
        let (s, v) = delegate_with(&app, &g, Some(&app.svid(SUB)), "repo:read", &[]).await;
        assert_eq!((s, error_of(&v)), (400, "invalid_request"), "{v}");
    }
}

/// An admin `jti` revocation of a grant never used refuses it afterwards on every path,
/// even before this replica's revocation cache has it.
#[tokio::test]
async fn a_grant_revoked_by_jti_before_use_is_refused_by_the_store() {
    let app = spawn_app().await;
    let (_, task) = open(&app, "repo:read", API).await;
    let g = grant(&app, AGENT, &task, SUB, "repo:read").await;
    let jti = claims_of(&g)["jti"].as_str().unwrap().to_string();
    // The store step alone (what a replica whose cache lags still meets).
    app.broker
        .store
        .revoke_grant(&jti, None, app.clock.now() + 300, app.clock.now())
        .await
        .unwrap();
    let (s, v) = delegate_with(&app, &g, Some(&app.svid(SUB)), "repo:read", &[]).await;
    assert_eq!((s, error_of(&v)), (400, "invalid_grant"), "{v}");
}

/// A sub-agent mints more tokens into its delegated task with its own identity and
/// `task_id`: same `sub`, `act` and budget as the delegation.
#[tokio::test]
async fn minting_into_a_delegated_task_keeps_its_claims() {
    let app = spawn_app().await;
    let (_, task) = open(&app, "repo:read", API).await;
    let g = grant(&app, AGENT, &task, SUB, "repo:read").await;
    let (s, v) = delegate_with(&app, &g, Some(&app.svid(SUB)), "repo:read", &[]).await;
    assert_eq!(s, 200, "{v}");
    let child = v["task_id"].as_str().unwrap().to_string();
    let (s, v) = app
        .exchange(&app.svid(SUB), "repo:read", &[("task_id", &child)])
        .await;
    assert_eq!(s, 200, "{v}");
    let c = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(
        (c["sub"].as_str(), c["client_id"].as_str()),
        (Some(AGENT), Some(SUB))
    );
    assert_eq!(c["act"], json!({"sub": SUB}));
    assert_eq!(c["txn"], child.as_str());
    // The owner of the root is not the owner of the child task.
    app.expect_error(
        &app.svid(AGENT),
        "repo:read",
        &[("task_id", &child)],
        400,
        "invalid_grant",
    )
    .await;
}

/// The race on Redis: no open task descends from an ended one, and no token of the tree is
/// active on a second replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delegation_racing_its_parents_end_never_outlives_it_on_redis() {
    let redis = crate::redis_support::RedisServer::start();
    let app = Arc::new(spawn_on_redis(&redis.url()).await);
    let replica = spawn_replica(&app).await;
    escape_race(app, 40, Some(&replica)).await;
}

/// An OIDC sub-agent is named in a grant as `<issuer>#<sub>`: accepted as an audience only
/// with `task_id` and only for a configured issuer.
#[tokio::test]
async fn an_oidc_sub_agent_is_an_audience_of_a_grant_only() {
    let issuer = "http://127.0.0.1:9";
    let app = spawn_app_with(Options {
        extra_config: format!("[[oidc.issuers]]\nissuer = \"{issuer}\"\naudience = \"writ\"\n"),
        ..Options::default()
    })
    .await;
    let (_, task) = open(&app, "repo:read", API).await;
    let sub = format!("{issuer}#agent-7");
    let (s, v) = app
        .exchange(
            &app.svid(AGENT),
            "repo:read",
            &[("task_id", &task), ("audience", &sub)],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        claims_of(v["access_token"].as_str().unwrap())["aud"],
        sub.as_str()
    );
    // Not as the audience of a new task, and not for an issuer that is not configured.
    app.expect_error(
        &app.svid(AGENT),
        "repo:read",
        &[("audience", &sub)],
        400,
        "invalid_target",
    )
    .await;
    app.expect_error(
        &app.svid(AGENT),
        "repo:read",
        &[
            ("task_id", &task),
            ("audience", "https://other.example#agent-7"),
        ],
        400,
        "invalid_target",
    )
    .await;
}

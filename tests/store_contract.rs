//! One store contract, run against the memory store, a real redis-server and a real 3-node
//! Redis Cluster, both started here on free loopback ports: one test per case and backend.
//! The Redis tests of this binary share one server and one cluster, each test under its own
//! key prefix.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

#[path = "support/redis.rs"]
mod redis_support;

use std::sync::Arc;
use std::time::Duration;

use redis_support::{shared_cluster_urls, shared_server_url};
use writ::domain::{Subject, TaskId};
use writ::store::memory::MemoryStore;
use writ::store::redis::RedisStore;
use writ::store::{
    ApprovalRecord, ApprovalState, ApprovalVote, AuditHead, BlockRecord, BlockSelector,
    DelegateOutcome, FeedCursor, FeedEvent, MintOutcome, PolicyTransition, Store, SubtreeClose,
    TaskFilter, TaskRecord, TaskState, TokenEntry,
};

const NOW: i64 = 1_800_000_000;

fn task(owner: &str, created: i64) -> TaskRecord {
    TaskRecord {
        id: TaskId::generate().unwrap(),
        owner: Subject::from_trusted(owner.into()),
        issuer: "example.org".into(),
        purpose: "p".into(),
        created_at: created,
        deadline: created + 3600,
        state: TaskState::Open,
        ended_at: None,
        end_reason: None,
        policy_version: "v".repeat(64),
        scopes: vec!["repo:read".into()],
        audience: vec!["https://api".into()],
        tokens_issued: 1,
        parent: None,
        depth: 0,
        source: "jwt-svid".into(),
        claims: Default::default(),
        grant: None,
        on_behalf_of: None,
        act: None,
        approval: None,
        jkt: None,
        x5t: None,
    }
}

/// A task delegated from `parent` by the grant `grant`, owned by `actor`.
fn child_of(parent: &TaskRecord, actor: &str, grant: &str) -> TaskRecord {
    let mut t = task(actor, parent.created_at + 1);
    t.id = TaskId::generate_child(&parent.id).unwrap();
    t.parent = Some(parent.id.clone());
    t.depth = parent.depth + 1;
    t.deadline = parent.deadline;
    t.grant = Some(grant.into());
    t.on_behalf_of = Some(parent.on_behalf_of.clone().unwrap_or(parent.owner.clone()));
    t.act = Some(serde_json::json!({"sub": actor}));
    t
}

const ACTOR: &str = "spiffe://example.org/agent/sub/worker";

async fn delegating(s: Arc<dyn Store>) {
    let root = task("spiffe://example.org/agent/a", NOW);
    s.create_task(&root, &tok("r", NOW + 300)).await.unwrap();
    let child = child_of(&root, ACTOR, "g1");
    assert_eq!(
        s.create_delegated_task(&child, &tok("c1", NOW + 300), 50, NOW)
            .await
            .unwrap(),
        DelegateOutcome::Created
    );
    let got = s.get_task(&child.id).await.unwrap().unwrap();
    assert_eq!(got.grant.as_deref(), Some("g1"));
    assert_eq!(got.act, child.act);
    assert_eq!(got.on_behalf_of, child.on_behalf_of);
    assert_eq!(got.tokens_issued, 1);
    assert_eq!(
        s.task_children(&root.id).await.unwrap(),
        vec![child.id.clone()]
    );
    // The root counts every token of its tree.
    assert_eq!(
        s.get_task(&root.id).await.unwrap().unwrap().tokens_issued,
        2
    );
    let grandchild = child_of(&got, ACTOR, "g2");
    assert_eq!(grandchild.id.root_str(), root.id.as_str());
    assert_eq!(
        s.create_delegated_task(&grandchild, &tok("c2", NOW + 300), 50, NOW)
            .await
            .unwrap(),
        DelegateOutcome::Created
    );
    assert_eq!(
        s.get_task(&root.id).await.unwrap().unwrap().tokens_issued,
        3
    );
    // Minting into a delegated task counts at the root too; the budget is the tree's.
    let owner = Subject::from_trusted(ACTOR.into());
    assert!(matches!(
        s.mint_into_task(&grandchild.id, &owner, &tok("c3", NOW + 300), 4, NOW)
            .await
            .unwrap(),
        MintOutcome::Minted(_)
    ));
    match s
        .mint_into_task(&child.id, &owner, &tok("c4", NOW + 300), 4, NOW)
        .await
        .unwrap()
    {
        MintOutcome::OverBudget(t) => assert_eq!((t.id, t.tokens_issued), (root.id.clone(), 4)),
        other => panic!("{other:?}"),
    }
    match s
        .create_delegated_task(&child_of(&root, ACTOR, "g1"), &tok("c5", NOW + 300), 4, NOW)
        .await
        .unwrap()
    {
        DelegateOutcome::OverBudget(t) => assert_eq!(t.id, root.id),
        other => panic!("{other:?}"),
    }
    // A parent past its deadline or closed takes no children.
    assert_eq!(
        s.create_delegated_task(
            &child_of(&root, ACTOR, "g1"),
            &tok("c6", NOW + 300),
            50,
            root.deadline
        )
        .await
        .unwrap(),
        DelegateOutcome::ParentClosed
    );
    s.close_task(&child.id, TaskState::Ended, "done", NOW)
        .await
        .unwrap();
    assert_eq!(
        s.create_delegated_task(
            &child_of(&child, ACTOR, "g3"),
            &tok("c7", NOW + 300),
            50,
            NOW
        )
        .await
        .unwrap(),
        DelegateOutcome::ParentClosed
    );
}

async fn closing_a_subtree(s: Arc<dyn Store>) {
    let root = task("spiffe://example.org/agent/a", NOW);
    s.create_task(&root, &tok("r", NOW + 300)).await.unwrap();
    let a = child_of(&root, ACTOR, "g");
    let b = child_of(&root, ACTOR, "g");
    let a1 = child_of(&a, ACTOR, "ga");
    for t in [&a, &b, &a1] {
        let out = s
            .create_delegated_task(t, &tok(t.id.as_str(), NOW + 300), 50, NOW)
            .await
            .unwrap();
        assert_eq!(out, DelegateOutcome::Created);
    }
    // Not told about a1: nothing closes, and a and a1 are named.
    match s
        .close_subtree(&a.id, TaskState::Revoked, "r", NOW + 1, &[], false)
        .await
        .unwrap()
    {
        SubtreeClose::Unknown(mut open) => {
            open.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
            let mut want = vec![(a.id.clone(), a.deadline), (a1.id.clone(), a1.deadline)];
            want.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
            assert_eq!(open, want);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.get_task(&a1.id).await.unwrap().unwrap().state,
        TaskState::Open
    );
    // Told about both: the subtree of a closes in one step; b and the root stay open.
    match s
        .close_subtree(
            &a.id,
            TaskState::Revoked,
            "r",
            NOW + 1,
            &[a.id.clone(), a1.id.clone()],
            false,
        )
        .await
        .unwrap()
    {
        SubtreeClose::Closed(closed) => {
            let mut ids: Vec<_> = closed.iter().map(|t| t.id.clone()).collect();
            ids.sort_by(|x, y| x.as_str().cmp(y.as_str()));
            let mut want = vec![a.id.clone(), a1.id.clone()];
            want.sort_by(|x, y| x.as_str().cmp(y.as_str()));
            assert_eq!(ids, want);
            assert!(closed.iter().all(|t| t.state == TaskState::Revoked));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.get_task(&b.id).await.unwrap().unwrap().state,
        TaskState::Open
    );
    assert_eq!(
        s.get_task(&root.id).await.unwrap().unwrap().state,
        TaskState::Open
    );
    // Forced: closes what it finds even when not told.
    match s
        .close_subtree(&root.id, TaskState::Ended, "e", NOW + 2, &[], true)
        .await
        .unwrap()
    {
        SubtreeClose::Closed(closed) => assert_eq!(closed.len(), 2, "the root and b"),
        other => panic!("{other:?}"),
    }
    // A closed subtree closes nothing more, and a closed task is never reopened.
    assert_eq!(
        s.close_subtree(&root.id, TaskState::Ended, "e", NOW + 3, &[], false)
            .await
            .unwrap(),
        SubtreeClose::Closed(Vec::new())
    );
    assert_eq!(
        s.get_task(&a.id).await.unwrap().unwrap().state,
        TaskState::Revoked
    );
}

async fn revoking_a_grant(s: Arc<dyn Store>) {
    let root = task("spiffe://example.org/agent/a", NOW);
    s.create_task(&root, &tok("r", NOW + 300)).await.unwrap();
    let by_g = child_of(&root, ACTOR, "g");
    let by_h = child_of(&root, ACTOR, "h");
    for t in [&by_g, &by_h] {
        s.create_delegated_task(t, &tok(t.id.as_str(), NOW + 300), 50, NOW)
            .await
            .unwrap();
    }
    // Found by its jti alone (an admin's jti revocation) once the grant was used.
    assert_eq!(
        s.revoke_grant("g", None, NOW + 300, NOW).await.unwrap(),
        vec![by_g.id.clone()]
    );
    assert_eq!(
        s.create_delegated_task(&child_of(&root, ACTOR, "g"), &tok("x", NOW + 300), 50, NOW)
            .await
            .unwrap(),
        DelegateOutcome::GrantRevoked
    );
    // A grant never used, revoked by jti alone, is refused afterwards too.
    assert!(
        s.revoke_grant("k", None, NOW + 300, NOW)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.create_delegated_task(&child_of(&root, ACTOR, "k"), &tok("y", NOW + 300), 50, NOW)
            .await
            .unwrap(),
        DelegateOutcome::GrantRevoked
    );
    // The other grant is untouched.
    assert_eq!(
        s.create_delegated_task(&child_of(&root, ACTOR, "h"), &tok("z", NOW + 300), 50, NOW)
            .await
            .unwrap(),
        DelegateOutcome::Created
    );
}

/// Delegations racing the end of their parent: each is refused or closed with it.
async fn delegations_racing_an_end(s: Arc<dyn Store>) {
    for round in 0..20 {
        let root = task("spiffe://example.org/agent/a", NOW);
        s.create_task(&root, &tok("r", NOW + 300)).await.unwrap();
        let mut handles = Vec::new();
        for i in 0..8 {
            let s = s.clone();
            let c = child_of(&root, ACTOR, "g");
            handles.push(tokio::spawn(async move {
                let out = s
                    .create_delegated_task(&c, &tok(&format!("{round}-{i}"), NOW + 300), 50, NOW)
                    .await
                    .unwrap();
                (c.id, out)
            }));
        }
        let s2 = s.clone();
        let id = root.id.clone();
        let closer = tokio::spawn(async move {
            s2.close_subtree(&id, TaskState::Ended, "e", NOW, &[], true)
                .await
                .unwrap()
        });
        let mut created = Vec::new();
        for h in handles {
            let (id, out) = h.await.unwrap();
            match out {
                DelegateOutcome::Created => created.push(id),
                DelegateOutcome::ParentClosed => {}
                other => panic!("{other:?}"),
            }
        }
        closer.await.unwrap();
        for id in created {
            assert_ne!(
                s.get_task(&id).await.unwrap().unwrap().state,
                TaskState::Open,
                "a child of an ended task is open"
            );
        }
    }
}

fn approval(id: &str, created: i64) -> ApprovalRecord {
    ApprovalRecord {
        id: id.into(),
        rev: 1,
        state: ApprovalState::Pending,
        subject: "spiffe://example.org/agent/a".into(),
        actor: None,
        act: None,
        scopes: vec!["deploy:prod".into()],
        audience: vec!["https://api".into()],
        purpose: "ship it".into(),
        ttl: 300,
        task_id: None,
        gated_scopes: vec!["deploy:prod".into()],
        policies: vec!["deploy-prod".into()],
        policy_version: "v".repeat(64),
        created_at: created,
        expires_at: created + 900,
        last_poll: created,
        approvals: Vec::new(),
        decided_at: None,
        denied_by: None,
        reason: None,
    }
}

/// Approvals: created once per id, read back whole, replaced only over the revision they
/// were read at, listed oldest first, and forgotten past their retention.
async fn approvals(s: Arc<dyn Store>) {
    let a = approval("apr_one", NOW - 10);
    assert!(s.create_approval(&a).await.unwrap());
    assert!(!s.create_approval(&a).await.unwrap(), "an id is taken once");
    assert_eq!(s.get_approval("apr_one").await.unwrap(), Some(a.clone()));
    assert_eq!(s.get_approval("apr_none").await.unwrap(), None);

    let mut approved = a.next();
    approved.state = ApprovalState::Approved;
    approved.approvals.push(ApprovalVote {
        by: "spiffe://example.org/security/alice".into(),
        at: NOW,
    });
    approved.decided_at = Some(NOW);
    let mut denied = a.next();
    denied.state = ApprovalState::Denied;
    // Both were read at revision 1: the first write wins, the second finds revision 2.
    assert!(s.replace_approval(&approved).await.unwrap());
    assert!(!s.replace_approval(&denied).await.unwrap());
    assert_eq!(
        s.get_approval("apr_one").await.unwrap(),
        Some(approved.clone())
    );
    // A revision that skips one is refused; so is a record that does not exist.
    let mut skip = approved.next().next();
    skip.state = ApprovalState::Issued;
    assert!(!s.replace_approval(&skip).await.unwrap());
    assert!(
        !s.replace_approval(&approval("apr_none", NOW).next())
            .await
            .unwrap()
    );

    let b = approval("apr_two", NOW - 5);
    assert!(s.create_approval(&b).await.unwrap());
    let ids: Vec<String> = s
        .list_approvals()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(ids, vec!["apr_one".to_string(), "apr_two".to_string()]);

    // Kept until their retention after expiry or decision has passed.
    s.prune(NOW + 60).await.unwrap();
    assert_eq!(s.list_approvals().await.unwrap().len(), 2);
    s.prune(NOW + 900 + 15 * 60 + 1).await.unwrap();
    assert!(s.list_approvals().await.unwrap().is_empty());
}

/// Many writers racing over one revision: exactly one wins.
async fn concurrent_approval_writes_one_wins(s: Arc<dyn Store>) {
    let a = approval("apr_race", NOW);
    assert!(s.create_approval(&a).await.unwrap());
    let mut handles = Vec::new();
    for i in 0..16 {
        let s = s.clone();
        let mut next = a.next();
        next.reason = Some(format!("writer {i}"));
        handles.push(tokio::spawn(async move {
            s.replace_approval(&next).await.unwrap()
        }));
    }
    let mut wins = 0;
    for h in handles {
        wins += usize::from(h.await.unwrap());
    }
    assert_eq!(wins, 1);
    assert_eq!(s.get_approval("apr_race").await.unwrap().unwrap().rev, 2);
}

fn tok(jti: &str, exp: i64) -> TokenEntry {
    TokenEntry {
        jti: jti.into(),
        exp,
    }
}

fn head(log_id: &str, seq: u64) -> AuditHead {
    AuditHead {
        log_id: log_id.into(),
        seq,
        hash: format!("{seq:064x}"),
        checkpoint: format!("jws-{seq}"),
    }
}

async fn audit_heads(s: Arc<dyn Store>) {
    let a = "a".repeat(64);
    let b = "b".repeat(64);
    assert_eq!(s.audit_head(&a).await.unwrap(), None);
    s.put_audit_head(&head(&a, 5)).await.unwrap();
    assert_eq!(s.audit_head(&a).await.unwrap(), Some(head(&a, 5)));
    // Forward only: an older or equal head never replaces the one kept.
    s.put_audit_head(&head(&a, 4)).await.unwrap();
    let mut same_seq = head(&a, 5);
    same_seq.hash = "f".repeat(64);
    s.put_audit_head(&same_seq).await.unwrap();
    assert_eq!(s.audit_head(&a).await.unwrap(), Some(head(&a, 5)));
    s.put_audit_head(&head(&a, 1005)).await.unwrap();
    assert_eq!(s.audit_head(&a).await.unwrap(), Some(head(&a, 1005)));
    // Each log (replica) has its own head.
    assert_eq!(s.audit_head(&b).await.unwrap(), None);
    s.put_audit_head(&head(&b, 2)).await.unwrap();
    assert_eq!(s.audit_head(&b).await.unwrap(), Some(head(&b, 2)));
    assert_eq!(s.audit_head(&a).await.unwrap(), Some(head(&a, 1005)));
}

async fn counters_and_claims(s: Arc<dyn Store>) {
    let w = Duration::from_secs(60);
    for i in 1..=5 {
        assert_eq!(s.hit("denials:a", NOW + i, w, 100).await.unwrap(), i as u64);
    }
    assert_eq!(
        s.hit("denials:b", NOW + 5, w, 100).await.unwrap(),
        1,
        "keys are separate"
    );
    // Sliding: at NOW+62 the hits at NOW+1 and NOW+2 have left the window.
    assert_eq!(s.hit("denials:a", NOW + 62, w, 100).await.unwrap(), 4);
    // Capped: beyond the cap the count stays at cap + 1 and nothing more is kept.
    for _ in 0..10 {
        s.hit("rate:c", NOW, w, 3).await.unwrap();
    }
    assert_eq!(s.hit("rate:c", NOW, w, 3).await.unwrap(), 4);
    assert_eq!(
        s.hit("rate:c", NOW + 61, w, 3).await.unwrap(),
        1,
        "the window slid past them all"
    );
    assert!(s.claim("reeval:v1", Duration::from_secs(5)).await.unwrap());
    assert!(!s.claim("reeval:v1", Duration::from_secs(5)).await.unwrap());
    assert!(
        s.claim("reeval:v2", Duration::from_millis(100))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        s.claim("reeval:v2", Duration::from_secs(5)).await.unwrap(),
        "an expired claim can be taken again"
    );
    assert!(!s.flag("done:v1").await.unwrap());
    s.set_flag("done:v1", Duration::from_secs(5)).await.unwrap();
    assert!(s.flag("done:v1").await.unwrap());
}

async fn tasks_roundtrip(s: Arc<dyn Store>) {
    s.ping().await.unwrap();
    let t = task("spiffe://example.org/a", NOW);
    s.create_task(&t, &tok("j1", NOW + 300)).await.unwrap();
    let got = s.get_task(&t.id).await.unwrap().unwrap();
    assert_eq!(got, t);
    assert!(
        s.get_task(&TaskId::generate().unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        s.task_tokens(&t.id).await.unwrap(),
        vec![tok("j1", NOW + 300)]
    );
}

async fn minting(s: Arc<dyn Store>) {
    let owner = Subject::from_trusted("spiffe://example.org/a".into());
    let t = task(owner.as_str(), NOW);
    s.create_task(&t, &tok("j1", NOW + 300)).await.unwrap();
    match s
        .mint_into_task(&t.id, &owner, &tok("j2", NOW + 300), 3, NOW + 1)
        .await
        .unwrap()
    {
        MintOutcome::Minted(r) => assert_eq!(r.tokens_issued, 2),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.mint_into_task(&t.id, &owner, &tok("j3", NOW), 3, NOW)
            .await
            .unwrap(),
        MintOutcome::Minted(_)
    ));
    assert!(matches!(
        s.mint_into_task(&t.id, &owner, &tok("j4", NOW), 3, NOW).await.unwrap(),
        MintOutcome::OverBudget(r) if r.tokens_issued == 3
    ));
    let other = Subject::from_trusted("spiffe://example.org/b".into());
    assert_eq!(
        s.mint_into_task(&t.id, &other, &tok("x", NOW), 9, NOW)
            .await
            .unwrap(),
        MintOutcome::NotOwner
    );
    assert_eq!(
        s.mint_into_task(&TaskId::generate().unwrap(), &owner, &tok("x", NOW), 9, NOW)
            .await
            .unwrap(),
        MintOutcome::NotFound
    );
    // Past the deadline the task is closed.
    assert!(matches!(
        s.mint_into_task(&t.id, &owner, &tok("x", NOW), 9, t.deadline)
            .await
            .unwrap(),
        MintOutcome::Closed(_)
    ));
    let jtis: Vec<String> = s
        .task_tokens(&t.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.jti)
        .collect();
    assert_eq!(jtis, vec!["j1", "j2", "j3"]);
}

async fn concurrent_mints_respect_the_budget(s: Arc<dyn Store>) {
    let owner = Subject::from_trusted("spiffe://example.org/a".into());
    let t = task(owner.as_str(), NOW);
    s.create_task(&t, &tok("j0", NOW + 300)).await.unwrap();
    let mut handles = Vec::new();
    for i in 0..30 {
        let (s, id, owner) = (s.clone(), t.id.clone(), owner.clone());
        handles.push(tokio::spawn(async move {
            s.mint_into_task(&id, &owner, &tok(&format!("c{i}"), NOW + 300), 10, NOW)
                .await
                .unwrap()
        }));
    }
    let mut minted = 0;
    for h in handles {
        if matches!(h.await.unwrap(), MintOutcome::Minted(_)) {
            minted += 1;
        }
    }
    assert_eq!(minted, 9, "exactly the budget (10, one already minted)");
    assert_eq!(s.get_task(&t.id).await.unwrap().unwrap().tokens_issued, 10);
}

async fn closing(s: Arc<dyn Store>) {
    let t = task("spiffe://example.org/a", NOW);
    s.create_task(&t, &tok("j", NOW + 300)).await.unwrap();
    let closed = s
        .close_task(&t.id, TaskState::Ended, "done", NOW + 5)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (closed.state, closed.ended_at, closed.end_reason.as_deref()),
        (TaskState::Ended, Some(NOW + 5), Some("done"))
    );
    // Closing again changes nothing.
    let again = s
        .close_task(&t.id, TaskState::Revoked, "later", NOW + 9)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.state, again.ended_at),
        (TaskState::Ended, Some(NOW + 5))
    );
    assert!(
        s.close_task(&TaskId::generate().unwrap(), TaskState::Ended, "x", NOW)
            .await
            .unwrap()
            .is_none()
    );
    let owner = Subject::from_trusted("spiffe://example.org/a".into());
    assert!(matches!(
        s.mint_into_task(&t.id, &owner, &tok("k", NOW), 9, NOW)
            .await
            .unwrap(),
        MintOutcome::Closed(_)
    ));
}

async fn children_and_listing(s: Arc<dyn Store>) {
    let parent = task("spiffe://example.org/agent/a", NOW);
    s.create_task(&parent, &tok("p", NOW + 300)).await.unwrap();
    let mut child = task("spiffe://example.org/agent/a", NOW + 1);
    child.parent = Some(parent.id.clone());
    child.depth = 1;
    s.create_task(&child, &tok("c", NOW + 300)).await.unwrap();
    assert_eq!(
        s.task_children(&parent.id).await.unwrap(),
        vec![child.id.clone()]
    );
    let other = task("spiffe://example.org/ci/b", NOW + 2);
    s.create_task(&other, &tok("o", NOW + 300)).await.unwrap();
    s.close_task(&other.id, TaskState::Revoked, "x", NOW + 3)
        .await
        .unwrap();

    let all = s
        .list_tasks(&TaskFilter {
            limit: 100,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].id, other.id, "newest first");
    let agents = s
        .list_tasks(&TaskFilter {
            subject: Some("spiffe://example.org/agent/*".into()),
            limit: 100,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(agents.len(), 2);
    let revoked = s
        .list_tasks(&TaskFilter {
            state: Some(TaskState::Revoked),
            limit: 100,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        revoked.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        vec![other.id.clone()]
    );
    let one = s
        .list_tasks(&TaskFilter {
            limit: 1,
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
}

async fn feed(s: Arc<dyn Store>) {
    // Stream ids follow the server's clock, so the feed runs on real time.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (events, cursor) = s.feed_snapshot(now).await.unwrap();
    assert!(events.is_empty());
    let block = BlockRecord {
        id: "rev_1".into(),
        selector: BlockSelector::Subject("spiffe://example.org/agent/*".into()),
        reason: "r".into(),
        actor: "admin".into(),
        created_at: now,
        until: now + 900,
        lifted_at: None,
        kind: Default::default(),
        expires_at: None,
    };
    let e1 = FeedEvent::Token {
        jti: "j".into(),
        until: now + 300,
    };
    let e2 = FeedEvent::Block {
        record: block.clone(),
    };
    let e3 = FeedEvent::Task {
        task_id: "tsk_x".into(),
        until: now + 3600,
    };
    s.publish(&e1, now).await.unwrap();
    s.publish(&e2, now).await.unwrap();
    let (got, c2) = s
        .read_feed(&cursor, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(got, vec![e1.clone(), e2.clone()]);
    // Nothing new: the read waits, then returns empty at the same place.
    let started = std::time::Instant::now();
    let (got, c3) = s.read_feed(&c2, Duration::from_millis(300)).await.unwrap();
    assert!(got.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(200));
    // A reader waiting when an event arrives gets it promptly.
    let reader = {
        let (s, c) = (s.clone(), c3.clone());
        tokio::spawn(async move { s.read_feed(&c, Duration::from_secs(5)).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    s.publish(&e3, now).await.unwrap();
    let (got, c4) = reader.await.unwrap();
    assert_eq!(got, vec![e3.clone()]);
    assert!(started.elapsed() < Duration::from_secs(2));
    // Lift: the block is kept (lifted) while it still cuts off old tokens.
    s.publish(
        &FeedEvent::Lift {
            id: "rev_1".into(),
            at: now + 10,
        },
        now + 10,
    )
    .await
    .unwrap();
    let blocks = s.list_blocks().await.unwrap();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].lifted_at, Some(now + 10));
    let (got, _) = s.read_feed(&c4, Duration::from_millis(500)).await.unwrap();
    assert_eq!(
        got,
        vec![FeedEvent::Lift {
            id: "rev_1".into(),
            at: now + 10
        }]
    );
    // A snapshot holds the blocks and the events that still matter.
    let (snap, _) = s.feed_snapshot(now + 20).await.unwrap();
    assert!(snap.contains(&e1) && snap.contains(&e3));
    assert!(snap.iter().any(|e| matches!(e, FeedEvent::Block { record } if record.id == "rev_1" && record.lifted_at.is_some())));
    // Later, what has expired is gone from the snapshot.
    let (snap, _) = s.feed_snapshot(now + 1000).await.unwrap();
    assert!(!snap.contains(&e1));
    assert!(snap.contains(&e3));
    assert!(!snap.iter().any(|e| matches!(e, FeedEvent::Block { .. })));
    let _ = FeedCursor::default();
}

async fn policy_transitions(s: Arc<dyn Store>) {
    let t = s.advance_policy("A").await.unwrap();
    assert_eq!(
        (t.previous.as_str(), t.generation, t.changed),
        ("", 1, true)
    );
    let again = s.advance_policy("A").await.unwrap();
    assert_eq!(
        again,
        PolicyTransition {
            changed: false,
            ..t.clone()
        },
        "no change, same transition"
    );
    let ab = s.advance_policy("B").await.unwrap();
    assert_eq!(
        (ab.previous.as_str(), ab.generation, ab.changed),
        ("A", 2, true)
    );
    s.advance_policy("A").await.unwrap();
    let ab2 = s.advance_policy("B").await.unwrap();
    assert_eq!((ab2.previous.as_str(), ab2.generation), ("A", 4));
    assert_ne!(
        ab.key(),
        ab2.key(),
        "a version that comes back is a new transition"
    );
    assert_eq!(s.advance_policy("B").await.unwrap().key(), ab2.key());
}

/// Status lists (SPEC §4.6): indexes in order within a list, a new list when full, bits
/// set only for tokens with a slot (most significant bit first), lists gone once their last
/// token has expired.
async fn status_lists(s: Arc<dyn Store>) {
    let mut slots = Vec::new();
    for i in 0..5 {
        let exp = NOW + 100 + i;
        slots.push(
            s.status_allocate(&format!("j{i}"), exp, 4, &format!("sl_fresh{i}"), NOW)
                .await
                .unwrap(),
        );
    }
    let first = slots[0].list.clone();
    assert_eq!(
        first, "sl_fresh0",
        "the first list is the fresh name offered"
    );
    let got: Vec<(String, u64)> = slots.iter().map(|x| (x.list.clone(), x.idx)).collect();
    assert_eq!(
        got,
        vec![
            (first.clone(), 0),
            (first.clone(), 1),
            (first.clone(), 2),
            (first.clone(), 3),
            ("sl_fresh4".to_string(), 0),
        ],
        "a full list rolls over to the fresh name"
    );
    let list = s.status_list(&first, NOW).await.unwrap().unwrap();
    assert_eq!((list.size, list.last_exp), (4, NOW + 103));
    assert!(list.bits.iter().all(|b| *b == 0));
    assert_eq!(
        s.status_revoke(&["j1".into(), "j3".into(), "unknown".into()])
            .await
            .unwrap(),
        2
    );
    // Again: harmless.
    assert_eq!(s.status_revoke(&["j1".into()]).await.unwrap(), 1);
    let list = s.status_list(&first, NOW).await.unwrap().unwrap();
    assert_eq!(list.bits, vec![0b0101_0000]);
    let second = s.status_list("sl_fresh4", NOW).await.unwrap().unwrap();
    assert!(second.bits.iter().all(|b| *b == 0), "other lists untouched");
    assert_eq!(s.status_list("sl_unknown", NOW).await.unwrap(), None);
    // Served until its last token has expired.
    assert!(s.status_list(&first, NOW + 103).await.unwrap().is_some());
    assert_eq!(s.status_list(&first, NOW + 104).await.unwrap(), None);
}

/// Indexes handed out at the same time never collide.
async fn status_concurrent_allocation(s: Arc<dyn Store>) {
    let mut handles = Vec::new();
    for i in 0..60 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let slot = s
                .status_allocate(&format!("c{i}"), NOW + 300, 16, &format!("sl_c{i}"), NOW)
                .await
                .unwrap();
            (slot.list, slot.idx)
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for h in handles {
        let (list, idx) = h.await.unwrap();
        assert!(idx < 16);
        assert!(seen.insert((list, idx)), "an index was handed out twice");
    }
    let lists: std::collections::HashSet<_> = seen.iter().map(|(l, _)| l.clone()).collect();
    assert_eq!(lists.len(), 4, "60 indexes fill four lists of 16");
}

/// The DPoP replay cache is a claim: of proofs with one name sent at once, one is fresh.
async fn dpop_replay_claims(s: Arc<dyn Store>) {
    let mut handles = Vec::new();
    for _ in 0..20 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            s.claim("dpop:proof-a", Duration::from_secs(121))
                .await
                .unwrap()
        }));
    }
    let mut fresh = 0;
    for h in handles {
        fresh += usize::from(h.await.unwrap());
    }
    assert_eq!(fresh, 1);
    assert!(
        s.claim("dpop:proof-b", Duration::from_secs(121))
            .await
            .unwrap()
    );
}

fn memory_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

/// A key prefix of its own for each test, so the tests can share one server.
/// Expired quarantines and lifted blocks past their cut-off leave the store; tasks leave it
/// once past their deadline and the retention after it. Counted by what the store lists.
async fn pruning(s: Arc<dyn Store>) {
    let block = |id: &str, created_at: i64, until: i64, expires_at: Option<i64>| BlockRecord {
        id: id.into(),
        selector: BlockSelector::Exact("spiffe://example.org/agent/a".into()),
        reason: "trip:denials".into(),
        actor: "writ".into(),
        created_at,
        until,
        lifted_at: None,
        kind: writ::store::BlockKind::Quarantine,
        expires_at,
    };
    // Expired a day ago, its cut-off long passed.
    let old = block("qtn_old", NOW - 90_000, NOW - 89_000, Some(NOW - 86_400));
    // Still refusing exchanges.
    let live = block("qtn_live", NOW - 10, NOW + 900, Some(NOW + 600));
    for record in [old, live] {
        s.publish(&FeedEvent::Block { record }, NOW - 100_000)
            .await
            .unwrap();
    }
    assert_eq!(s.list_blocks().await.unwrap().len(), 2);
    let removed = s.prune(NOW).await.unwrap();
    assert!(removed >= 1, "nothing pruned");
    let left: Vec<String> = s
        .list_blocks()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(left, vec!["qtn_live".to_string()]);
    // Idempotent.
    s.prune(NOW).await.unwrap();
    assert_eq!(s.list_blocks().await.unwrap().len(), 1);
}

/// The memory store forgets a task once its deadline and the retention after it have passed
/// (Redis does the same by key expiry).
#[tokio::test]
async fn memory_store_forgets_tasks_after_retention() {
    let s = memory_store();
    let t = task("spiffe://example.org/agent/a", NOW - 7200);
    s.create_task(&t, &tok("j1", NOW - 3600)).await.unwrap();
    let recent = task("spiffe://example.org/agent/a", NOW - 600);
    s.create_task(&recent, &tok("j2", NOW)).await.unwrap();
    // Deadline NOW - 3600: past the retention (15 min) at NOW.
    s.prune(NOW).await.unwrap();
    assert!(s.get_task(&t.id).await.unwrap().is_none());
    assert!(s.get_task(&recent.id).await.unwrap().is_some());
}

fn prefix(case: &str) -> String {
    format!("{case}:{}:", TaskId::generate().unwrap().as_str())
}

async fn redis_store(case: &str) -> Arc<dyn Store> {
    let url = shared_server_url();
    Arc::new(
        RedisStore::connect(
            Some(&url),
            &[],
            Some(&prefix(case)),
            Duration::from_secs(3600),
        )
        .await
        .unwrap(),
    )
}

async fn redis_cluster_store(case: &str) -> Arc<dyn Store> {
    let nodes = shared_cluster_urls();
    Arc::new(
        RedisStore::connect(None, &nodes, Some(&prefix(case)), Duration::from_secs(3600))
            .await
            .unwrap(),
    )
}

/// One test per case and backend (`memory::minting`, `redis_cluster::feed`, ...), so a run
/// reports every case that fails rather than the first of each backend.
macro_rules! contract {
    ($($case:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::memory_store()).await;
                }
            )+
        }

        mod redis_standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::redis_store(stringify!($case)).await).await;
                }
            )+
        }

        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::redis_cluster_store(stringify!($case)).await).await;
                }
            )+
        }
    };
}

contract!(
    delegating,
    closing_a_subtree,
    revoking_a_grant,
    delegations_racing_an_end,
    tasks_roundtrip,
    minting,
    concurrent_mints_respect_the_budget,
    closing,
    children_and_listing,
    feed,
    counters_and_claims,
    pruning,
    audit_heads,
    policy_transitions,
    approvals,
    concurrent_approval_writes_one_wins,
    status_lists,
    status_concurrent_allocation,
    dpop_replay_claims,
);

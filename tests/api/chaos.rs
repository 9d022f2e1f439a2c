//! Ending tasks while Redis misbehaves: connections killed, writes paused past the client's
//! timeout, the server restarted. Every end that answers `ended` must leave no token of the
//! task active on another replica; every end that answers 503 must be finished by a retry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::json;

use crate::helpers::*;
use crate::redis_support::RedisServer;

const TASKS: usize = 30;
const CHAOS_ROUNDS: u32 = 24;

/// Kills clients, pauses writes for longer than the store's 2 s response timeout, and
/// restarts the server once: a bounded schedule of rounds, stopping early when told to.
fn chaos(redis: Arc<Mutex<RedisServer>>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut round = 0u32;
        while !stop.load(Ordering::SeqCst)
            && round < CHAOS_ROUNDS
            && started.elapsed() < Duration::from_secs(90)
        {
            round += 1;
            {
                let r = redis.lock();
                let _ = r.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
                if round.is_multiple_of(4) {
                    let _ = r.cli(&["CLIENT", "PAUSE", "2500", "WRITE"]);
                }
            }
            if round == 7 {
                redis.lock().restart();
            }
            std::thread::sleep(Duration::from_millis(400));
        }
        let _ = redis.lock().cli(&["CLIENT", "UNPAUSE"]);
        round
    })
}

/// Ends a task, retrying every 503; the final answer.
async fn end_with_retries(
    app: &TestApp,
    task: &str,
    token: &str,
    retried: &mut u32,
) -> (u16, serde_json::Value) {
    let started = Instant::now();
    loop {
        let (s, v) = app.end_task(task, token).await;
        if s != 503 || started.elapsed() > Duration::from_secs(90) {
            return (s, v);
        }
        *retried += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_tasks_stay_ended_through_killed_paused_and_restarted_redis() {
    // Persistent, so that a restart keeps what was written (as a production Redis must).
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let a = spawn_on_redis(&redis.url()).await;
    let b = spawn_replica(&a).await;
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let (token, task) = a
            .task_token(&format!("spiffe://example.org/agent/chaos{i}"), "repo:read")
            .await;
        tasks.push((token, task));
    }

    let redis = Arc::new(Mutex::new(redis));
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = chaos(redis.clone(), stop.clone());
    let mut retried = 0u32;
    let mut ended = Vec::new();
    for (token, task) in &tasks {
        let (s, v) = end_with_retries(&a, task, token, &mut retried).await;
        assert_eq!(
            (s, v["state"].as_str()),
            (200, Some("ended")),
            "task {task}: {v}"
        );
        ended.push(token.clone());
        // Spread the ends over the chaos schedule.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = chaos.join().unwrap();

    // Every token of every task reported ended is inactive on the other replica, once it
    // has caught up with the feed.
    let mut active = 0;
    for token in &ended {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, v) = b.introspect_as(ADMIN_TOKEN, token).await;
            if s == 200 && v == json!({"active": false}) {
                break;
            }
            if Instant::now() > deadline {
                active += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "chaos: tasks_ended={} retried_503={retried} chaos_rounds={rounds} tokens_checked={} active_found={active}",
        ended.len(),
        ended.len()
    );
    assert_eq!(
        active, 0,
        "tokens of ended tasks still active on the other replica"
    );
}

/// The store fails between the two writes of an end (the feed refuses the append while task
/// records still take writes): the end answers 503, and its retry must leave the task's tokens
/// inactive on every replica before it says `ended`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_cut_between_its_writes_is_finished_by_its_retry() {
    let redis = RedisServer::start();
    let a = spawn_on_redis(&redis.url()).await;
    let b = spawn_replica(&a).await;
    let (token, task) = a.task_token(AGENT, "repo:read").await;
    assert_eq!(b.introspect(&token).await["active"], true);

    // Appends to the feed fail; reads (the replicas' feed followers) and task writes work.
    redis.cli(&["ACL", "SETUSER", "default", "-xadd"]).unwrap();
    let (s, v) = a.end_task(&task, &token).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (503, Some("temporarily_unavailable")),
        "{v}"
    );
    redis.cli(&["ACL", "SETUSER", "default", "+xadd"]).unwrap();

    let mut retried = 0;
    let (s, v) = end_with_retries(&a, &task, &token, &mut retried).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("ended")), "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.introspect(&token).await != json!({"active": false}) {
        assert!(
            Instant::now() < deadline,
            "`ended` was answered while the task's token is active on the other replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.introspect(&token).await, json!({"active": false}));
}

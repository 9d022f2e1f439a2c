//! The Redis store: standalone or Cluster, behind the same contract as the memory store.
//!
//! Keys (prefix `writ:` by default). A task's keys share the hash tag `{<task id>}`, so they
//! live on one cluster slot and the mint script can touch them atomically:
//!
//! | key | type | what |
//! |---|---|---|
//! | `writ:{tsk_…}:r` | string | what never changes of the record (compact JSON), a newline, then `<jti> <exp>;` per token, appended |
//! | `writ:{tsk_…}:h` | hash | `o` (owner digest), `s` (state), `d` (deadline), `n` (tokens minted), `e` (ended at), `r` (end reason, cut to 60 bytes) |
//! | `writ:{tsk_…}:children` | set | tasks delegated from it |
//! | `writ:{idx}:tasks` | sorted set | task ids by deadline, for listings |
//! | `writ:{feed}:stream` | stream | revocation events (`e` = JSON), trimmed by age |
//! | `writ:{feed}:blocks` | hash | standing blocks by id |
//! | `writ:{feed}:p:j:<jti>`, `writ:{feed}:p:t:<task id>` | string | the revocation was published (expires with it) |
//! | `writ:{feed}:probe` | string | written by the readiness check after a failed publish (expires in 10 s) |
//! | `writ:{feed}:epoch` | string | the store's generation: random, set once, never expires |
//! | `writ:{audit:<log id>}:head` | hash | a decision log's latest signed head: `seq`, `v` (JSON); never expires |
//! | `writ:{apr}:all` | hash | approvals by id: `<revision> <JSON>`; pruned past their retention |
//!
//! Every task key expires 15 minutes after the task's deadline (its tokens expire by the
//! deadline), so memory stays bounded by live tasks. The mutable hash holds only short
//! values so that Redis keeps it in its compact (listpack) encoding: about 0.9 KiB per open
//! task in all (`scripts/bench.sh` measures it).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisFuture, Script,
    ScriptInvocation, ServerErrorKind, Value,
};

use super::{
    ApprovalRecord, AuditHead, BlockRecord, DelegateOutcome, FeedCursor, FeedEvent, MintOutcome,
    PolicyTransition, StatusSlot, Store, StoreError, StoredList, SubtreeClose, TaskFilter,
    TaskRecord, TaskState, TokenEntry,
};
use crate::domain::{Subject, TaskId};

/// How long task keys outlive the task's deadline.
pub use super::RETAIN_AFTER_DEADLINE;
const TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// One connection kind or the other.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Feed(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Feed(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        p: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(p, offset, count),
            Conn::Feed(c) => c.req_packed_commands(p, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(p, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Feed(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

enum Target {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

pub struct RedisStore {
    conn: Conn,
    target: Target,
    /// The connection that blocks on XREAD: never shared with requests.
    feed: tokio::sync::Mutex<Option<Conn>>,
    prefix: String,
    /// How long feed entries are kept: longer than any token or task lives.
    horizon_secs: i64,
    create: Script,
    delegate: Script,
    subtree: Script,
    grant: Script,
    mint: Script,
    close: Script,
    lift: Script,
    hit: Script,
    publish: Script,
    advance: Script,
    head: Script,
    approval: Script,
    status_alloc: Script,
    status_revoke: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e)
}

/// How often a script is tried while its slot moves between cluster nodes, and the first
/// pause between tries (doubled each time, at most [`SLOT_MOVE_MAX_PAUSE`]): about 2 s in all.
const SLOT_MOVE_TRIES: u32 = 8;
const SLOT_MOVE_FIRST_PAUSE: Duration = Duration::from_millis(25);
const SLOT_MOVE_MAX_PAUSE: Duration = Duration::from_millis(500);

/// An answer of a cluster whose slot is moving or just moved: trying again after a moment
/// reaches the slot's owner (the client refreshes its slot map on MOVED).
fn slot_moving(e: &redis::RedisError) -> bool {
    let moving = |k: &ServerErrorKind| {
        matches!(
            k,
            ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
        )
    };
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ExecAbort) => {
            e.clone().into_server_errors().is_some_and(|errs| {
                errs.iter()
                    .any(|(_, se)| se.kind().is_some_and(|k| moving(&k)))
            })
        }
        ErrorKind::Server(k) => moving(&k),
        _ => false,
    }
}

/// A new task: its record with the first token (KEYS[1]) and its mutable hash (KEYS[2]), both
/// expiring after ARGV[2] seconds. A script rather than MULTI/EXEC: the cluster client follows
/// a MOVED or ASK answer for a script, while a transaction it cannot re-route fails whole.
const CREATE_LUA: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[2], 'o', ARGV[3], 's', 'open', 'd', ARGV[4], 'n', '1')
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
";

/// KEYS[1] the task's hash, KEYS[2] its record and token index, KEYS[3] its tree root's hash
/// (KEYS[1] itself for a root): the budget is the tree's, counted at the root.
const MINT_LUA: &str = r"
local f = redis.call('HMGET', KEYS[1], 'o', 's', 'd', 'n')
if not f[1] then return 'not_found' end
if f[1] ~= ARGV[1] then return 'not_owner' end
if f[2] ~= 'open' or tonumber(ARGV[3]) >= tonumber(f[3]) then return 'closed' end
local n = redis.call('HGET', KEYS[3], 'n')
if not n then return 'closed' end
if tonumber(n) >= tonumber(ARGV[4]) then return 'over_budget' end
redis.call('HINCRBY', KEYS[1], 'n', 1)
if KEYS[3] ~= KEYS[1] then redis.call('HINCRBY', KEYS[3], 'n', 1) end
redis.call('APPEND', KEYS[2], ARGV[2])
return 'minted'
";

/// A delegated task, on its tree's slot: KEYS[1] its record, KEYS[2] its hash, KEYS[3] the
/// parent's hash, KEYS[4] the root's hash, KEYS[5] the parent's children, KEYS[6] the mark
/// of the grant's revocation. The parent is checked open in the same step that records the
/// child, so a delegation racing the parent's end is refused or closed with it.
const DELEGATE_LUA: &str = r"
if redis.call('EXISTS', KEYS[6]) == 1 then return 'grant_revoked' end
local p = redis.call('HMGET', KEYS[3], 's', 'd')
if not p[1] or p[1] ~= 'open' or tonumber(ARGV[5]) >= tonumber(p[2]) then
  return 'parent_closed'
end
local n = redis.call('HGET', KEYS[4], 'n')
if not n then return 'parent_closed' end
if tonumber(n) >= tonumber(ARGV[6]) then return 'over_budget' end
redis.call('HINCRBY', KEYS[4], 'n', 1)
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[2], 'o', ARGV[3], 's', 'open', 'd', ARGV[4], 'n', '1', 'g', ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[7])
if redis.call('TTL', KEYS[5]) < tonumber(ARGV[2]) then
  redis.call('EXPIRE', KEYS[5], ARGV[2])
end
return 'created'
";

/// Closes a subtree in one step, on its tree's slot (KEYS[1] the hash of the subtree's top,
/// for routing). ARGV: key prefix, state, now, reason, force (`1`/`0`), the top's id, then
/// the ids whose revocation the caller published. Keys of a tree's tasks are derived from
/// their ids (`<prefix>{<root id>}<rest>:h`): all on the slot of KEYS[1].
const SUBTREE_LUA: &str = r"
local function key(id, suffix)
  return ARGV[1] .. '{' .. string.sub(id, 1, 26) .. '}' .. string.sub(id, 27) .. suffix
end
local known = {}
for i = 7, #ARGV do known[ARGV[i]] = true end
local queue = {ARGV[6]}
local open = {}
local unknown = {}
local seen = 0
while #queue > 0 and seen < 10000 do
  local id = table.remove(queue)
  seen = seen + 1
  local f = redis.call('HMGET', key(id, ':h'), 's', 'd')
  if f[1] == 'open' then
    table.insert(open, id)
    if not known[id] then
      table.insert(unknown, id)
      table.insert(unknown, f[2] or '0')
    end
  end
  for _, c in ipairs(redis.call('SMEMBERS', key(id, ':children'))) do
    table.insert(queue, c)
  end
end
if #unknown > 0 and ARGV[5] ~= '1' then
  table.insert(unknown, 1, 'unknown')
  return unknown
end
for _, id in ipairs(open) do
  redis.call('HSET', key(id, ':h'), 's', ARGV[2], 'e', ARGV[3], 'r', ARGV[4])
end
table.insert(open, 1, 'closed')
return open
";

/// Marks a grant revoked in its tree (KEYS[1], expiring after ARGV[2] seconds) and lists the
/// open tasks delegated from it among the children (KEYS[2]) of its task. ARGV[1] the grant's
/// `jti`, ARGV[3] the key prefix.
const GRANT_LUA: &str = r"
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
local out = {}
for _, c in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local k = ARGV[3] .. '{' .. string.sub(c, 1, 26) .. '}' .. string.sub(c, 27) .. ':h'
  local f = redis.call('HMGET', k, 's', 'g')
  if f[1] == 'open' and f[2] == ARGV[1] then table.insert(out, c) end
end
return out
";

/// What never changes of a task, with short names: it is most of a task's memory.
#[derive(serde::Serialize, serde::Deserialize)]
struct Rec {
    i: TaskId,
    o: Subject,
    p: String,
    c: i64,
    d: i64,
    v: String,
    sc: Vec<String>,
    a: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pa: Option<TaskId>,
    #[serde(default, skip_serializing_if = "is_zero")]
    dp: u32,
    #[serde(default)]
    so: String,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    cl: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    g: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ob: Option<Subject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ac: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x5: Option<String>,
}

impl Rec {
    fn of(task: &TaskRecord) -> Rec {
        Rec {
            i: task.id.clone(),
            o: task.owner.clone(),
            p: task.purpose.clone(),
            c: task.created_at,
            d: task.deadline,
            v: task.policy_version.clone(),
            sc: task.scopes.clone(),
            a: task.audience.clone(),
            pa: task.parent.clone(),
            dp: task.depth,
            so: task.source.clone(),
            cl: task.claims.clone(),
            g: task.grant.clone(),
            ob: task.on_behalf_of.clone(),
            ac: task.act.clone(),
            ap: task.approval.clone(),
            jk: task.jkt.clone(),
            x5: task.x5t.clone(),
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A short digest of the owner, compared by the mint script.
fn owner_digest(owner: &Subject) -> String {
    crate::domain::sha256_hex(owner.as_str().as_bytes())[..32].to_string()
}

/// Hash values stay short (compact encoding); the full reason is in the decision log.
fn short(reason: &str) -> &str {
    let mut end = reason.len().min(60);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

const HIT_LUA: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local n = redis.call('ZCARD', KEYS[1])
if n < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
  n = n + 1
else
  n = tonumber(ARGV[3]) + 1
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return n
";

/// KEYS[1] `policy:current` (version `v`, previous `p`), KEYS[2] the generation counter.
const ADVANCE_LUA: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'v', 'p')
if cur[1] == ARGV[1] then
  return {0, cur[2] or '', tonumber(redis.call('GET', KEYS[2]) or '0')}
end
local g = redis.call('INCR', KEYS[2])
local prev = cur[1] or ''
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'p', prev)
return {1, prev, g}
";

const CLOSE_LUA: &str = r"
local state = redis.call('HGET', KEYS[1], 's')
if not state then return 0 end
if state == 'open' then
  redis.call('HSET', KEYS[1], 's', ARGV[1], 'e', ARGV[2], 'r', ARGV[3])
end
return 1
";

const LIFT_LUA: &str = r"
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[4], '*', 'e', ARGV[3])
return 1
";

/// Publishes a revocation event. A token or task revocation has a marker (KEYS[3],
/// expiring when the revocation no longer matters): if it is there the event was published
/// before and nothing is appended, so repeats cannot grow the stream. The marker is set
/// last: a script that fails half-way is not rolled back, and a marker without its entry
/// would make every retry a no-op. A block is stored in the blocks hash (KEYS[2]) with its
/// event. One script, so the cluster client routes it to the feed's slot and follows
/// redirects.
const PUBLISH_LUA: &str = r"
if ARGV[3] ~= '0' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], ARGV[4], ARGV[5]) end
redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[2], '*', 'e', ARGV[1])
if ARGV[3] ~= '0' then redis.call('SET', KEYS[3], '1', 'EX', ARGV[3]) end
return 1
";

/// Feed entries read per call when loading a snapshot: each call stays short, however long
/// the stream.
const SNAPSHOT_PAGE: usize = 10_000;

/// A head only moves forward: it is replaced by one with a higher `seq` only.
const HEAD_LUA: &str = r"
local cur = redis.call('HGET', KEYS[1], 'seq')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'v', ARGV[2])
return 1
";

/// Replaces approval ARGV[1] (KEYS[1] holds `<revision> <JSON>` by id) with ARGV[3] only
/// when it is at revision ARGV[2].
const APPROVAL_LUA: &str = r"
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
if string.match(raw, '^(%d+) ') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
";

/// An approval as the approvals hash holds it: its revision, a space, its JSON.
fn approval_value(a: &ApprovalRecord) -> Result<String, StoreError> {
    let json = serde_json::to_string(a).map_err(|e| StoreError::corrupt("approval", e))?;
    Ok(format!("{} {json}", a.rev))
}

fn parse_approval(id: &str, raw: &str) -> Result<ApprovalRecord, StoreError> {
    let json = raw
        .split_once(' ')
        .map(|(_, j)| j)
        .ok_or_else(|| StoreError::invalid(format!("approval `{id}` has no revision")))?;
    serde_json::from_str(json).map_err(|e| StoreError::corrupt(format!("approval `{id}`"), e))
}

/// Allocates a status index (SPEC §4.6). All status keys share the `{status}` hash tag, so
/// the script runs on one slot: KEYS[1] is the current list's name; the others are built
/// from ARGV[1] (the tagged prefix) and the list name. A list is a hash `m:<list>` (`n`
/// indexes handed out, `s` size, `e` the last token expiry) kept until that expiry; a token's
/// slot is `j:<jti>` = `<list> <idx>`, kept until the token expires. The current list is
/// replaced by ARGV[2] when it is full or has expired.
/// ARGV: 1 prefix, 2 fresh list, 3 size, 4 jti, 5 exp, 6 now.
const STATUS_ALLOC_LUA: &str = r"
local p = ARGV[1]
local size = tonumber(ARGV[3])
local exp = tonumber(ARGV[5])
local now = tonumber(ARGV[6])
local cur = redis.call('GET', KEYS[1])
local n = nil
if cur and redis.call('EXISTS', p .. 'm:' .. cur) == 1 then
  n = redis.call('HINCRBY', p .. 'm:' .. cur, 'n', 1)
  if n > tonumber(redis.call('HGET', p .. 'm:' .. cur, 's') or '0') then n = nil end
end
if not n then
  cur = ARGV[2]
  redis.call('SET', KEYS[1], cur)
  redis.call('HSET', p .. 'm:' .. cur, 's', size, 'e', exp)
  n = redis.call('HINCRBY', p .. 'm:' .. cur, 'n', 1)
end
local m = p .. 'm:' .. cur
local e = tonumber(redis.call('HGET', m, 'e') or '0')
if exp > e then
  e = exp
  redis.call('HSET', m, 'e', exp)
end
local keep = math.max(e - now, 1) + 60
redis.call('EXPIRE', m, keep)
if redis.call('EXISTS', p .. 'b:' .. cur) == 1 then redis.call('EXPIRE', p .. 'b:' .. cur, keep) end
redis.call('SET', p .. 'j:' .. ARGV[4], cur .. ' ' .. (n - 1), 'EX', math.max(exp - now, 1) + 60)
return {cur, n - 1}
";

/// Sets the revoked bit of each token (ARGV[2..]) that has a slot, in its list's bitmap
/// `b:<list>`, kept as long as the list. KEYS[1] (the current list's name) only routes the
/// script to the `{status}` slot. ARGV[1] is the tagged prefix.
const STATUS_REVOKE_LUA: &str = r"
local p = ARGV[1]
local set = 0
for i = 2, #ARGV do
  local slot = redis.call('GET', p .. 'j:' .. ARGV[i])
  if slot then
    local sp = string.find(slot, ' ', 1, true)
    local list = string.sub(slot, 1, sp - 1)
    local idx = tonumber(string.sub(slot, sp + 1))
    local ttl = redis.call('TTL', p .. 'm:' .. list)
    if ttl > 0 then
      redis.call('SETBIT', p .. 'b:' .. list, idx, 1)
      redis.call('EXPIRE', p .. 'b:' .. list, ttl)
      set = set + 1
    end
  end
end
return set
";

/// Most tokens one status script marks: a cascade of thousands is split into several.
const STATUS_REVOKE_BATCH: usize = 500;

impl RedisStore {
    /// Connects to a standalone server (`url`) or a cluster (`nodes`).
    pub async fn connect(
        url: Option<&str>,
        nodes: &[String],
        key_prefix: Option<&str>,
        horizon: Duration,
    ) -> Result<Self, StoreError> {
        let (conn, target) = if nodes.is_empty() {
            let url = url.ok_or_else(|| StoreError::NotConfigured("no Redis URL"))?;
            let client = redis::Client::open(url).map_err(unavailable)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            // Lazy: a broker starts (not ready) while Redis is down, and connects when it can.
            let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
                .map_err(unavailable)?;
            (Conn::Single(manager), Target::Single(client))
        } else {
            let client = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(TIMEOUT)
                .retries(2)
                // The client's own pause before retrying TRYAGAIN or CLUSTERDOWN (milliseconds;
                // 1.28 s at least by default): short, since `run` tries again itself.
                .min_retry_wait(25)
                .max_retry_wait(500)
                .build()
                .map_err(unavailable)?;
            let conn = client.get_async_connection().await.map_err(unavailable)?;
            (Conn::Cluster(conn), Target::Cluster(Box::new(client)))
        };
        Ok(RedisStore {
            conn,
            target,
            feed: tokio::sync::Mutex::new(None),
            prefix: key_prefix.unwrap_or("writ:").to_string(),
            horizon_secs: crate::domain::duration_secs(horizon).saturating_add(60),
            create: Script::new(CREATE_LUA),
            delegate: Script::new(DELEGATE_LUA),
            subtree: Script::new(SUBTREE_LUA),
            grant: Script::new(GRANT_LUA),
            mint: Script::new(MINT_LUA),
            close: Script::new(CLOSE_LUA),
            lift: Script::new(LIFT_LUA),
            hit: Script::new(HIT_LUA),
            publish: Script::new(PUBLISH_LUA),
            advance: Script::new(ADVANCE_LUA),
            head: Script::new(HEAD_LUA),
            approval: Script::new(APPROVAL_LUA),
            status_alloc: Script::new(STATUS_ALLOC_LUA),
            status_revoke: Script::new(STATUS_REVOKE_LUA),
        })
    }

    /// A task's key: hash-tagged with its tree's root id, so that a tree lives on one
    /// Cluster slot (`<prefix>{<root>}<rest of the id>:<suffix>`; the same rule as
    /// `SUBTREE_LUA`'s). The keys of a root task are what they always were.
    fn k_of(&self, id: &str, suffix: &str) -> String {
        let (root, rest) = match TaskId::parse(id) {
            Some(t) => (t.root_str().to_string(), t.within_root().to_string()),
            None => (id.to_string(), String::new()),
        };
        format!("{}{{{root}}}{rest}:{suffix}", self.prefix)
    }
    fn k_task(&self, id: &str) -> String {
        self.k_of(id, "h")
    }
    /// The record and, after it, the token index.
    fn k_tokens(&self, id: &str) -> String {
        self.k_of(id, "r")
    }
    fn k_children(&self, id: &str) -> String {
        self.k_of(id, "children")
    }
    /// The mark that grant `jti` was revoked, in the slot of the tree `root`.
    fn k_grant_revoked(&self, root: &str, jti: &str) -> String {
        format!("{}{{{root}}}:rg:{jti}", self.prefix)
    }
    /// Which task a grant belongs to once used, or `revoked`.
    fn k_grant(&self, jti: &str) -> String {
        format!("{}grant:{jti}", self.prefix)
    }
    fn k_index(&self) -> String {
        format!("{}{{idx}}:tasks", self.prefix)
    }
    fn k_stream(&self) -> String {
        format!("{}{{feed}}:stream", self.prefix)
    }
    fn k_blocks(&self) -> String {
        format!("{}{{feed}}:blocks", self.prefix)
    }
    fn k_epoch(&self) -> String {
        format!("{}{{feed}}:epoch", self.prefix)
    }
    /// The marker that a token (`j`) or task (`t`) revocation was published.
    fn k_published(&self, kind: &str, id: &str) -> String {
        format!("{}{{feed}}:p:{kind}:{id}", self.prefix)
    }

    /// Every field of the hash `key`.
    async fn hash_all(&self, key: String) -> Result<HashMap<String, String>, StoreError> {
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    fn k_approvals(&self) -> String {
        format!("{}{{apr}}:all", self.prefix)
    }

    /// Forgets the approvals past their retention.
    async fn prune_approvals(&self, now: i64) -> Result<u64, StoreError> {
        let stale: Vec<String> = self
            .list_approvals()
            .await?
            .into_iter()
            .filter(|a| a.forget_at() <= now)
            .map(|a| a.id)
            .collect();
        if stale.is_empty() {
            return Ok(0);
        }
        redis::cmd("HDEL")
            .arg(self.k_approvals())
            .arg(&stale)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    fn k_audit_head(&self, log_id: &str) -> String {
        format!("{}{{audit:{log_id}}}:head", self.prefix)
    }

    /// The prefix of every status key: one hash tag, one slot.
    fn k_status(&self) -> String {
        format!("{}{{status}}:", self.prefix)
    }

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Runs a script, trying again (a bounded number of times) while its slot moves between
    /// cluster nodes: a write is never lost to a reshard. A script is loaded again on a node
    /// that does not know it (NOSCRIPT).
    async fn run<T: FromRedisValue>(
        &self,
        script: &ScriptInvocation<'_>,
        conn: &mut Conn,
    ) -> Result<T, StoreError> {
        let mut pause = SLOT_MOVE_FIRST_PAUSE;
        let mut tries = 1;
        loop {
            match script.invoke_async(conn).await {
                Ok(v) => return Ok(v),
                Err(e) if tries < SLOT_MOVE_TRIES && slot_moving(&e) => {
                    tracing::debug!(error = %e, tries, "the slot is moving; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(SLOT_MOVE_MAX_PAUSE);
                    tries += 1;
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
    }

    async fn feed_conn(&self) -> Result<Conn, StoreError> {
        let mut slot = self.feed.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        // Blocking reads need a response timeout longer than the block.
        let c = match &self.target {
            Target::Single(client) => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(TIMEOUT));
                Conn::Feed(
                    client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await
                        .map_err(unavailable)?,
                )
            }
            Target::Cluster(client) => {
                Conn::Cluster(client.get_async_connection().await.map_err(unavailable)?)
            }
        };
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Appends a token, task or block event to the feed (once for a token or task).
    async fn append(
        &self,
        event: &FeedEvent,
        json: &str,
        now: i64,
        conn: &mut Conn,
    ) -> Result<(), StoreError> {
        // A marker lasts one second past `until` (never less than a second); none for blocks.
        let ttl = |until: i64| until.saturating_sub(now).saturating_add(1).max(1);
        let (marker, ttl) = match event {
            FeedEvent::Token { jti, until } => (self.k_published("j", jti), ttl(*until)),
            FeedEvent::Task { task_id, until } => (self.k_published("t", task_id), ttl(*until)),
            _ => (self.k_published("-", "-"), 0),
        };
        let (block_id, block) = match event {
            FeedEvent::Block { record } => (
                record.id.clone(),
                serde_json::to_string(record).map_err(|e| StoreError::corrupt("feed record", e))?,
            ),
            _ => (String::new(), String::new()),
        };
        let _: i64 = self
            .run(
                self.publish
                    .key(self.k_stream())
                    .key(self.k_blocks())
                    .key(marker)
                    .arg(json)
                    .arg(self.min_stream_id(now))
                    .arg(ttl)
                    .arg(block_id)
                    .arg(block),
                conn,
            )
            .await?;
        Ok(())
    }

    /// The listing index lives on another slot: not part of the atomic write.
    async fn index_task(
        &self,
        task: &TaskRecord,
        first: &TokenEntry,
        conn: &mut Conn,
    ) -> Result<(), StoreError> {
        let id = task.id.as_str();
        let mut idx = redis::pipe();
        idx.zadd(self.k_index(), id, task.deadline).ignore();
        if first.jti.as_bytes().first().is_some_and(|b| b % 64 == 0) {
            idx.zrembyscore(
                self.k_index(),
                "-inf",
                task.created_at - RETAIN_AFTER_DEADLINE,
            )
            .ignore();
        }
        idx.query_async::<()>(conn).await.map_err(unavailable)?;
        Ok(())
    }

    fn min_stream_id(&self, now: i64) -> String {
        format!("{}-0", (now - self.horizon_secs).max(0) * 1000)
    }

    fn record_from(
        &self,
        rec: Option<String>,
        fields: HashMap<String, String>,
    ) -> Result<Option<TaskRecord>, StoreError> {
        let (Some(rec), false) = (rec, fields.is_empty()) else {
            return Ok(None);
        };
        let r: Rec =
            serde_json::from_str(&rec).map_err(|e| StoreError::corrupt("task record", e))?;
        let mut task = TaskRecord {
            id: r.i,
            issuer: crate::domain::issuer_of(r.o.as_str()).to_string(),
            owner: r.o,
            purpose: r.p,
            created_at: r.c,
            deadline: r.d,
            state: TaskState::Open,
            ended_at: None,
            end_reason: None,
            policy_version: r.v,
            scopes: r.sc,
            audience: r.a,
            tokens_issued: 1,
            parent: r.pa,
            depth: r.dp,
            source: r.so,
            claims: r.cl,
            grant: r.g,
            on_behalf_of: r.ob,
            act: r.ac,
            approval: r.ap,
            jkt: r.jk,
            x5t: r.x5,
        };
        task.state = match fields.get("s").map(String::as_str) {
            Some("open") | None => TaskState::Open,
            Some("ended") => TaskState::Ended,
            Some("revoked") => TaskState::Revoked,
            Some(other) => return Err(StoreError::invalid(format!("task state `{other}`"))),
        };
        if let Some(n) = fields.get("n").and_then(|n| n.parse().ok()) {
            task.tokens_issued = n;
        }
        task.ended_at = fields.get("e").and_then(|v| v.parse().ok());
        task.end_reason = fields.get("r").cloned();
        Ok(Some(task))
    }
}

/// A feed entry; one that does not parse (corrupt, or of a version this broker does not
/// know) is an error, never skipped: the replica's view is then stale until it is resolved.
fn parse_event(id: &redis::streams::StreamId) -> Result<FeedEvent, StoreError> {
    let raw: String = id
        .get("e")
        .ok_or_else(|| StoreError::invalid(format!("feed entry {} has no event", id.id)))?;
    serde_json::from_str(&raw).map_err(|e| StoreError::corrupt(format!("feed entry {}", id.id), e))
}

#[async_trait]
impl Store for RedisStore {
    async fn prune(&self, now: i64) -> Result<u64, StoreError> {
        let approvals = self.prune_approvals(now).await?;
        let stale: Vec<String> = self
            .list_blocks()
            .await?
            .into_iter()
            .filter(|b| !b.relevant_at(now))
            .map(|b| b.id)
            .collect();
        if stale.is_empty() {
            return Ok(approvals);
        }
        let removed: u64 = redis::cmd("HDEL")
            .arg(self.k_blocks())
            .arg(&stale)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(removed.saturating_add(approvals))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn create_task(&self, task: &TaskRecord, first: &TokenEntry) -> Result<(), StoreError> {
        let id = task.id.as_str();
        let ttl = (task.deadline - task.created_at + RETAIN_AFTER_DEADLINE).max(60);
        let rec = serde_json::to_string(&Rec::of(task))
            .map_err(|e| StoreError::corrupt("task record", e))?;
        let mut conn = self.conn();
        let _: i64 = self
            .run(
                self.create
                    .key(self.k_tokens(id))
                    .key(self.k_task(id))
                    .arg(format!("{rec}\n{} {};", first.jti, first.exp))
                    .arg(ttl)
                    .arg(owner_digest(&task.owner))
                    .arg(task.deadline),
                &mut conn,
            )
            .await?;
        self.index_task(task, first, &mut conn).await?;
        if let Some(parent) = &task.parent {
            let mut c = redis::pipe();
            c.sadd(self.k_children(parent.as_str()), id)
                .ignore()
                .expire(self.k_children(parent.as_str()), ttl)
                .ignore();
            c.query_async::<()>(&mut conn).await.map_err(unavailable)?;
        }
        Ok(())
    }

    async fn create_delegated_task(
        &self,
        task: &TaskRecord,
        first: &TokenEntry,
        max_tokens: u32,
        now: i64,
    ) -> Result<DelegateOutcome, StoreError> {
        let (Some(parent), Some(root)) = (&task.parent, TaskId::parse(task.id.root_str())) else {
            return Err(StoreError::invalid("a delegated task without a parent"));
        };
        let id = task.id.as_str();
        let jti = task.grant.clone().unwrap_or_default();
        let ttl = (task.deadline - task.created_at + RETAIN_AFTER_DEADLINE).max(60);
        let mut conn = self.conn();
        // Which task the grant belongs to, unless it is revoked already: set before the task
        // is recorded, so that a revocation of the grant that does not see it here has already
        // left its mark where the script below looks.
        if !jti.is_empty() {
            let before: Option<String> = redis::cmd("SET")
                .arg(self.k_grant(&jti))
                .arg(parent.as_str())
                .arg("NX")
                .arg("GET")
                .arg("EX")
                .arg(ttl)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if before.as_deref() == Some("revoked") {
                return Ok(DelegateOutcome::GrantRevoked);
            }
        }
        let rec = serde_json::to_string(&Rec::of(task))
            .map_err(|e| StoreError::corrupt("task record", e))?;
        let status: String = self
            .run(
                self.delegate
                    .key(self.k_tokens(id))
                    .key(self.k_task(id))
                    .key(self.k_task(parent.as_str()))
                    .key(self.k_task(root.as_str()))
                    .key(self.k_children(parent.as_str()))
                    .key(self.k_grant_revoked(root.as_str(), &jti))
                    .arg(format!("{rec}\n{} {};", first.jti, first.exp))
                    .arg(ttl)
                    .arg(owner_digest(&task.owner))
                    .arg(task.deadline)
                    .arg(now)
                    .arg(max_tokens)
                    .arg(id)
                    .arg(&jti),
                &mut conn,
            )
            .await?;
        match status.as_str() {
            "created" => {}
            "grant_revoked" => return Ok(DelegateOutcome::GrantRevoked),
            "parent_closed" => return Ok(DelegateOutcome::ParentClosed),
            "over_budget" => {
                let root = self
                    .get_task(&root)
                    .await?
                    .ok_or_else(|| StoreError::invalid("root task vanished while delegating"))?;
                return Ok(DelegateOutcome::OverBudget(Box::new(root)));
            }
            other => {
                return Err(StoreError::invalid(format!(
                    "delegation answered `{other}`"
                )));
            }
        }
        self.index_task(task, first, &mut conn).await?;
        Ok(DelegateOutcome::Created)
    }

    async fn close_subtree(
        &self,
        id: &TaskId,
        state: TaskState,
        reason: &str,
        now: i64,
        known: &[TaskId],
        force: bool,
    ) -> Result<SubtreeClose, StoreError> {
        let mut call = self.subtree.key(self.k_task(id.as_str()));
        call.arg(&self.prefix)
            .arg(state.as_str())
            .arg(now)
            .arg(short(reason))
            .arg(if force { "1" } else { "0" })
            .arg(id.as_str());
        for k in known {
            call.arg(k.as_str());
        }
        let answer: Vec<String> = self.run(&call, &mut self.conn()).await?;
        let mut answer = answer.into_iter();
        match answer.next().as_deref() {
            Some("closed") => {
                let mut closed = Vec::new();
                for t in answer.filter_map(|t| TaskId::parse(&t)) {
                    if let Some(task) = self.get_task(&t).await? {
                        closed.push(task);
                    }
                }
                Ok(SubtreeClose::Closed(closed))
            }
            Some("unknown") => {
                let rest: Vec<String> = answer.collect();
                Ok(SubtreeClose::Unknown(
                    rest.chunks(2)
                        .filter_map(|pair| match pair {
                            [t, d] => Some((TaskId::parse(t)?, d.parse().unwrap_or(0))),
                            _ => None,
                        })
                        .collect(),
                ))
            }
            other => Err(StoreError::invalid(format!(
                "subtree close answered `{}`",
                other.unwrap_or("")
            ))),
        }
    }

    async fn revoke_grant(
        &self,
        jti: &str,
        task: Option<&TaskId>,
        until: i64,
        now: i64,
    ) -> Result<Vec<TaskId>, StoreError> {
        let ttl = until.saturating_sub(now).saturating_add(1).max(1);
        let mut conn = self.conn();
        let before: Option<String> = redis::cmd("SET")
            .arg(self.k_grant(jti))
            .arg("revoked")
            .arg("GET")
            .arg("EX")
            .arg(ttl)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some(parent) = before
            .as_deref()
            .and_then(TaskId::parse)
            .or_else(|| task.cloned())
        else {
            return Ok(Vec::new());
        };
        let ids: Vec<String> = self
            .run(
                self.grant
                    .key(self.k_grant_revoked(parent.root_str(), jti))
                    .key(self.k_children(parent.as_str()))
                    .arg(jti)
                    .arg(ttl)
                    .arg(&self.prefix),
                &mut conn,
            )
            .await?;
        Ok(ids.iter().filter_map(|t| TaskId::parse(t)).collect())
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let mut p = redis::pipe();
        p.get(self.k_tokens(id.as_str()))
            .hgetall(self.k_task(id.as_str()));
        let (rec, fields): (Option<String>, HashMap<String, String>) =
            p.query_async(&mut self.conn()).await.map_err(unavailable)?;
        let rec = rec.map(|r| {
            r.split_once('\n')
                .map_or(r.clone(), |(json, _)| json.to_string())
        });
        self.record_from(rec, fields)
    }

    async fn mint_into_task(
        &self,
        id: &TaskId,
        owner: &Subject,
        token: &TokenEntry,
        max_tokens: u32,
        now: i64,
    ) -> Result<MintOutcome, StoreError> {
        let status: String = self
            .run(
                self.mint
                    .key(self.k_task(id.as_str()))
                    .key(self.k_tokens(id.as_str()))
                    .key(self.k_task(id.root_str()))
                    .arg(owner_digest(owner))
                    .arg(format!("{} {};", token.jti, token.exp))
                    .arg(now)
                    .arg(max_tokens),
                &mut self.conn(),
            )
            .await?;
        let task = || async {
            self.get_task(id)
                .await?
                .ok_or_else(|| StoreError::invalid("task vanished while minting"))
        };
        Ok(match status.as_str() {
            "not_found" => MintOutcome::NotFound,
            "not_owner" => MintOutcome::NotOwner,
            "closed" => MintOutcome::Closed(task().await?),
            "over_budget" => match TaskId::parse(id.root_str()) {
                Some(root) if &root != id => MintOutcome::OverBudget(
                    self.get_task(&root)
                        .await?
                        .ok_or_else(|| StoreError::invalid("root vanished while minting"))?,
                ),
                _ => MintOutcome::OverBudget(task().await?),
            },
            "minted" => MintOutcome::Minted(task().await?),
            other => return Err(StoreError::invalid(format!("mint answered `{other}`"))),
        })
    }

    async fn close_task(
        &self,
        id: &TaskId,
        state: TaskState,
        reason: &str,
        now: i64,
    ) -> Result<Option<TaskRecord>, StoreError> {
        let found: i64 = self
            .run(
                self.close
                    .key(self.k_task(id.as_str()))
                    .arg(state.as_str())
                    .arg(now)
                    .arg(short(reason)),
                &mut self.conn(),
            )
            .await?;
        if found == 0 {
            return Ok(None);
        }
        self.get_task(id).await
    }

    async fn task_tokens(&self, id: &TaskId) -> Result<Vec<TokenEntry>, StoreError> {
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.k_tokens(id.as_str()))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let raw = raw.unwrap_or_default();
        let tokens = raw.split_once('\n').map_or("", |(_, t)| t);
        Ok(tokens
            .split(';')
            .filter_map(|r| {
                let (jti, exp) = r.split_once(' ')?;
                Some(TokenEntry {
                    jti: jti.to_string(),
                    exp: exp.parse().ok()?,
                })
            })
            .collect())
    }

    async fn task_children(&self, id: &TaskId) -> Result<Vec<TaskId>, StoreError> {
        let raw: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.k_children(id.as_str()))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(raw.iter().filter_map(|s| TaskId::parse(s)).collect())
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskRecord>, StoreError> {
        const PAGE: isize = 500;
        let mut out = Vec::new();
        let mut start: isize = 0;
        let mut conn = self.conn();
        loop {
            let ids: Vec<String> = redis::cmd("ZREVRANGE")
                .arg(self.k_index())
                .arg(start)
                .arg(start + PAGE - 1)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if ids.is_empty() {
                break;
            }
            let fetches = ids
                .iter()
                .filter_map(|s| TaskId::parse(s))
                .map(|id| async move { self.get_task(&id).await });
            for task in futures_util::future::join_all(fetches).await {
                if let Some(t) = task?
                    && filter.matches(&t)
                {
                    out.push(t);
                }
            }
            if out.len() >= filter.limit {
                break;
            }
            start += PAGE;
        }
        filter.order_and_limit(&mut out);
        Ok(out)
    }

    async fn publish(&self, event: &FeedEvent, now: i64) -> Result<(), StoreError> {
        let json =
            serde_json::to_string(event).map_err(|e| StoreError::corrupt("feed record", e))?;
        let mut conn = self.conn();
        match event {
            FeedEvent::Lift { id, at } => {
                let raw: Option<String> = redis::cmd("HGET")
                    .arg(self.k_blocks())
                    .arg(id)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                let Some(raw) = raw else { return Ok(()) };
                let mut record: BlockRecord = serde_json::from_str(&raw)
                    .map_err(|e| StoreError::corrupt("feed record", e))?;
                record.lifted_at.get_or_insert(*at);
                let updated = serde_json::to_string(&record)
                    .map_err(|e| StoreError::corrupt("feed record", e))?;
                let _: i64 = self
                    .run(
                        self.lift
                            .key(self.k_blocks())
                            .key(self.k_stream())
                            .arg(id)
                            .arg(updated)
                            .arg(&json)
                            .arg(self.min_stream_id(now)),
                        &mut conn,
                    )
                    .await?;
            }
            _ => self.append(event, &json, now, &mut conn).await?,
        }
        Ok(())
    }

    async fn feed_snapshot(&self, now: i64) -> Result<(Vec<FeedEvent>, FeedCursor), StoreError> {
        let mut conn = self.conn();
        let mut events: Vec<FeedEvent> = self
            .list_blocks()
            .await?
            .into_iter()
            .filter(|b| b.relevant_at(now))
            .map(|record| FeedEvent::Block { record })
            .collect();
        let mut start = self.min_stream_id(now);
        let mut cursor = "0-0".to_string();
        loop {
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(self.k_stream())
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(SNAPSHOT_PAGE)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for id in &reply.ids {
                let e = parse_event(id)?;
                if e.until().is_none_or(|u| u >= now) {
                    events.push(e);
                }
            }
            let Some(last) = reply.ids.last() else { break };
            cursor.clone_from(&last.id);
            if reply.ids.len() < SNAPSHOT_PAGE {
                break;
            }
            start = format!("({cursor}");
        }
        Ok((events, FeedCursor(cursor)))
    }

    async fn read_feed(
        &self,
        after: &FeedCursor,
        wait: Duration,
    ) -> Result<(Vec<FeedEvent>, FeedCursor), StoreError> {
        let mut conn = self.feed_conn().await?;
        let from = if after.0.is_empty() {
            "$".to_string()
        } else {
            after.0.clone()
        };
        let reply: Result<Option<redis::streams::StreamReadReply>, _> = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(crate::domain::duration_millis(wait))
            .arg("COUNT")
            .arg(1000)
            .arg("STREAMS")
            .arg(self.k_stream())
            .arg(&from)
            .query_async(&mut conn)
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // Drop the blocking connection; the next read opens a new one.
                *self.feed.lock().await = None;
                return Err(unavailable(e));
            }
        };
        let mut events = Vec::new();
        let mut cursor = from;
        if let Some(reply) = reply {
            for key in reply.keys {
                for id in key.ids {
                    events.push(parse_event(&id)?);
                    cursor = id.id;
                }
            }
        }
        Ok((events, FeedCursor(cursor)))
    }

    async fn hit(
        &self,
        key: &str,
        now: i64,
        window: Duration,
        cap: u64,
    ) -> Result<u64, StoreError> {
        let member = crate::domain::random_id(&format!("{now}:")).map_err(StoreError::Random)?;
        let count: u64 = self
            .run(
                self.hit
                    .key(format!("{}{{c:{key}}}", self.prefix))
                    .arg(now)
                    .arg(now.saturating_sub(crate::domain::duration_secs(window)))
                    .arg(cap)
                    .arg(member)
                    .arg(window.as_secs() + 1),
                &mut self.conn(),
            )
            .await?;
        Ok(count)
    }

    async fn status_allocate(
        &self,
        jti: &str,
        exp: i64,
        size: u32,
        fresh_list: &str,
        now: i64,
    ) -> Result<StatusSlot, StoreError> {
        let p = self.k_status();
        let (list, idx): (String, u64) = self
            .run(
                self.status_alloc
                    .key(format!("{p}cur"))
                    .arg(&p)
                    .arg(fresh_list)
                    .arg(size)
                    .arg(jti)
                    .arg(exp)
                    .arg(now),
                &mut self.conn(),
            )
            .await?;
        Ok(StatusSlot { list, idx })
    }

    async fn status_revoke(&self, jtis: &[String]) -> Result<u64, StoreError> {
        let p = self.k_status();
        let mut set = 0;
        for batch in jtis.chunks(STATUS_REVOKE_BATCH) {
            let mut inv = self.status_revoke.key(format!("{p}cur"));
            inv.arg(&p);
            for jti in batch {
                inv.arg(jti);
            }
            let n: u64 = self.run(&inv, &mut self.conn()).await?;
            set += n;
        }
        Ok(set)
    }

    async fn status_list(&self, list: &str, now: i64) -> Result<Option<StoredList>, StoreError> {
        let p = self.k_status();
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(format!("{p}m:{list}"))
            .arg("s")
            .arg("e")
            .cmd("GET")
            .arg(format!("{p}b:{list}"));
        let ((size, last_exp), bits): ((Option<u32>, Option<i64>), Option<Vec<u8>>) = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let (Some(size), Some(last_exp)) = (size, last_exp) else {
            return Ok(None);
        };
        if last_exp < now {
            return Ok(None);
        }
        Ok(Some(StoredList {
            size,
            bits: bits.unwrap_or_default(),
            last_exp,
        }))
    }

    async fn claim(&self, name: &str, ttl: Duration) -> Result<bool, StoreError> {
        let got: Option<String> = redis::cmd("SET")
            .arg(format!("{}{{f:{name}}}", self.prefix))
            .arg("1")
            .arg("NX")
            .arg("PX")
            .arg(crate::domain::duration_millis(ttl))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(got.is_some())
    }

    async fn set_flag(&self, name: &str, ttl: Duration) -> Result<(), StoreError> {
        let _: () = redis::cmd("SET")
            .arg(format!("{}{{f:{name}}}", self.prefix))
            .arg("1")
            .arg("PX")
            .arg(crate::domain::duration_millis(ttl))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn count_open_tasks(&self, now: i64) -> Result<u64, StoreError> {
        redis::cmd("ZCOUNT")
            .arg(self.k_index())
            .arg(format!("({now}"))
            .arg("+inf")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    async fn advance_policy(&self, version: &str) -> Result<PolicyTransition, StoreError> {
        let (changed, previous, generation): (i64, String, u64) = self
            .run(
                self.advance
                    .key(format!("{}{{policy}}:current", self.prefix))
                    .key(format!("{}{{policy}}:generation", self.prefix))
                    .arg(version),
                &mut self.conn(),
            )
            .await?;
        Ok(PolicyTransition {
            previous,
            current: version.to_string(),
            generation,
            changed: changed == 1,
        })
    }

    async fn flag(&self, name: &str) -> Result<bool, StoreError> {
        let n: i64 = redis::cmd("EXISTS")
            .arg(format!("{}{{f:{name}}}", self.prefix))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    async fn epoch(&self) -> Result<Option<String>, StoreError> {
        redis::cmd("GET")
            .arg(self.k_epoch())
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    async fn init_epoch(&self, fresh: &str) -> Result<String, StoreError> {
        let mut conn = self.conn();
        let _: Option<String> = redis::cmd("SET")
            .arg(self.k_epoch())
            .arg(fresh)
            .arg("NX")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let now: Option<String> = redis::cmd("GET")
            .arg(self.k_epoch())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        now.ok_or_else(|| StoreError::invalid("the store generation vanished as it was set"))
    }

    async fn holds_state(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        for key in [self.k_index(), self.k_stream(), self.k_blocks()] {
            let n: i64 = redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if n > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn probe_feed(&self) -> Result<(), StoreError> {
        let _: () = redis::cmd("SET")
            .arg(format!("{}{{feed}}:probe", self.prefix))
            .arg("1")
            .arg("PX")
            .arg(10_000)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn eviction_policy(&self) -> Result<Option<String>, StoreError> {
        let reply: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(reply.into_iter().nth(1))
    }

    async fn put_audit_head(&self, head: &AuditHead) -> Result<(), StoreError> {
        let json = serde_json::to_string(head).map_err(|e| StoreError::corrupt("audit head", e))?;
        let _: i64 = self
            .run(
                self.head
                    .key(self.k_audit_head(&head.log_id))
                    .arg(head.seq)
                    .arg(json),
                &mut self.conn(),
            )
            .await?;
        Ok(())
    }

    async fn audit_head(&self, log_id: &str) -> Result<Option<AuditHead>, StoreError> {
        let raw: Option<String> = redis::cmd("HGET")
            .arg(self.k_audit_head(log_id))
            .arg("v")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let Some(raw) = raw else { return Ok(None) };
        let head: AuditHead =
            serde_json::from_str(&raw).map_err(|e| StoreError::corrupt("audit head", e))?;
        if head.log_id != log_id {
            return Err(StoreError::invalid(
                "audit head stored under another log's key",
            ));
        }
        Ok(Some(head))
    }

    async fn create_approval(&self, approval: &ApprovalRecord) -> Result<bool, StoreError> {
        let created: i64 = redis::cmd("HSETNX")
            .arg(self.k_approvals())
            .arg(&approval.id)
            .arg(approval_value(approval)?)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(created == 1)
    }

    async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
        let raw: Option<String> = redis::cmd("HGET")
            .arg(self.k_approvals())
            .arg(id)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        raw.map(|r| parse_approval(id, &r)).transpose()
    }

    async fn replace_approval(&self, approval: &ApprovalRecord) -> Result<bool, StoreError> {
        let Some(prev) = approval.rev.checked_sub(1) else {
            return Ok(false);
        };
        let replaced: i64 = self
            .run(
                self.approval
                    .key(self.k_approvals())
                    .arg(&approval.id)
                    .arg(prev.to_string())
                    .arg(approval_value(approval)?),
                &mut self.conn(),
            )
            .await?;
        Ok(replaced == 1)
    }

    async fn list_approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError> {
        let raw = self.hash_all(self.k_approvals()).await?;
        let mut out = Vec::with_capacity(raw.len());
        for (id, v) in &raw {
            out.push(parse_approval(id, v)?);
        }
        out.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }

    async fn list_blocks(&self) -> Result<Vec<BlockRecord>, StoreError> {
        let raw = self.hash_all(self.k_blocks()).await?;
        let mut out = Vec::with_capacity(raw.len());
        for (id, v) in &raw {
            let record: BlockRecord = serde_json::from_str(v)
                .map_err(|e| StoreError::corrupt(format!("block record `{id}`"), e))?;
            out.push(record);
        }
        out.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }
}

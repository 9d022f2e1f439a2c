//! DPoP proofs seen within the replay window, in memory and bounded.

use std::collections::{HashSet, VecDeque};

use parking_lot::Mutex;

use crate::token::dpop::MAX_AGE_SECS;

/// A proof is remembered as long as its `iat` can be within the window: accepted `iat`s are
/// within `MAX_AGE_SECS` of now either way.
const REMEMBER_SECS: i64 = 2 * MAX_AGE_SECS + 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Fresh,
    Seen,
    /// As many proofs as the cache may hold are within the window.
    Full,
}

struct State {
    seen: HashSet<String>,
    /// (forget at, key), in the order of insertion, which is the order of `forget at` while
    /// the clock goes forward.
    order: VecDeque<(i64, String)>,
}

pub(super) struct ReplayCache {
    capacity: usize,
    state: Mutex<State>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            capacity,
            state: Mutex::new(State {
                seen: HashSet::new(),
                order: VecDeque::new(),
            }),
        }
    }

    /// Records `key` at `now`: fresh, seen before within the window, or refused because the
    /// cache is full.
    pub fn insert(&self, key: String, now: i64) -> Outcome {
        let mut state = self.state.lock();
        while let Some((forget_at, _)) = state.order.front() {
            if *forget_at > now {
                break;
            }
            if let Some((_, old)) = state.order.pop_front() {
                state.seen.remove(&old);
            }
        }
        if state.seen.contains(&key) {
            return Outcome::Seen;
        }
        if state.seen.len() >= self.capacity {
            return Outcome::Full;
        }
        state.seen.insert(key.clone());
        state
            .order
            .push_back((now.saturating_add(REMEMBER_SECS), key));
        Outcome::Fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_within_the_window_forgotten_after_and_bounded() {
        let c = ReplayCache::new(2);
        assert_eq!(c.insert("a".into(), 100), Outcome::Fresh);
        assert_eq!(c.insert("a".into(), 100 + REMEMBER_SECS - 1), Outcome::Seen);
        assert_eq!(c.insert("b".into(), 101), Outcome::Fresh);
        // Full: a third proof within the window is refused, not let through unrecorded.
        assert_eq!(c.insert("c".into(), 102), Outcome::Full);
        // Once `a` has left the window there is room again, and `a` is new again.
        assert_eq!(c.insert("c".into(), 100 + REMEMBER_SECS), Outcome::Fresh);
        assert_eq!(c.insert("b".into(), 100 + REMEMBER_SECS), Outcome::Seen);
    }
}

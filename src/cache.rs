//! A bounded cache of verification results keyed by the SHA-256 of what was verified. A
//! signature checked once over the same bytes checks the same way again; expiry is still
//! enforced on every use, and the cache is cleared whenever the keys behind it change.

use std::collections::HashMap;

use parking_lot::Mutex;

const SHARDS: usize = 16;

/// Values with their expiry, by key hash.
type Shard<V> = Mutex<HashMap<[u8; 32], (V, i64)>>;

pub struct VerifiedCache<V> {
    shards: Vec<Shard<V>>,
    per_shard: usize,
}

impl<V: Clone> VerifiedCache<V> {
    /// A cache of at most about `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        VerifiedCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (capacity / SHARDS).max(1),
        }
    }

    pub fn key(bytes: &[u8]) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut k = [0u8; 32];
        k.copy_from_slice(d.as_ref());
        k
    }

    #[expect(
        clippy::indexing_slicing,
        reason = "the index is taken modulo the fixed shard count and the key has 32 bytes"
    )]
    fn shard(&self, key: &[u8; 32]) -> &Shard<V> {
        &self.shards[usize::from(key[0]) % SHARDS]
    }

    /// The cached value, if present and not expired at `now`.
    pub fn get(&self, key: &[u8; 32], now: i64) -> Option<V> {
        let shard = self.shard(key).lock();
        shard
            .get(key)
            .filter(|(_, exp)| *exp > now)
            .map(|(v, _)| v.clone())
    }

    /// Caches `value` until `exp`. A full shard first drops what has expired, then, if still
    /// full, everything (the cache only saves work; losing it is safe).
    pub fn insert(&self, key: [u8; 32], value: V, exp: i64, now: i64) {
        let mut shard = self.shard(&key).lock();
        if shard.len() >= self.per_shard {
            shard.retain(|_, (_, e)| *e > now);
            if shard.len() >= self.per_shard {
                shard.clear();
            }
        }
        shard.insert(key, (value, exp));
    }

    pub fn clear(&self) {
        for s in &self.shards {
            s.lock().clear();
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_and_stays_bounded() {
        let c: VerifiedCache<u32> = VerifiedCache::new(32);
        let k = VerifiedCache::<u32>::key(b"a");
        c.insert(k, 1, 100, 0);
        assert_eq!(c.get(&k, 99), Some(1));
        assert_eq!(c.get(&k, 100), None);
        for i in 0..10_000u32 {
            c.insert(VerifiedCache::<u32>::key(&i.to_le_bytes()), i, 1000, 0);
        }
        assert!(c.len() <= 32);
        c.clear();
        assert!(c.is_empty());
    }
}

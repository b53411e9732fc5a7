//! The server's prefix cache: decoder states kept under the tokens that
//! produced them, so that a prompt which extends an earlier one (the next
//! turn of a conversation, a shared system prompt) starts from that state
//! and runs only its new tokens (docs/DESIGN.md §19.3).
//!
//! A Mamba state has a fixed size whatever the length of the text behind
//! it, and it can be copied at any point: keeping it costs
//! `n_layer × (E·K + E·N)` values and a copy of the logits, not a KV cache
//! that grows with the text. (A Transformer's state here is its KV cache,
//! which the cache keeps the same way, at its larger size.)
//!
//! Lookup finds the longest cached prefix of a prompt: one pass hashes
//! every prefix of the prompt (a rolling FNV-1a over the token ids), then
//! the cached prefix lengths are tried from the longest down, and a hash
//! match counts only when the stored tokens are equal, so a collision can
//! never hand out the wrong state. Eviction is least recently used, within
//! a budget in bytes.

use std::collections::{BTreeMap, HashMap};

/// FNV-1a over the ids' little-endian bytes, continued from `hash`.
fn hash_step(hash: u64, id: u32) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    id.to_le_bytes()
        .iter()
        .fold(hash, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The hash of `ids[..i]` for every i in 0..=ids.len().
fn prefix_hashes(ids: &[u32]) -> Vec<u64> {
    let mut hashes = Vec::with_capacity(ids.len() + 1);
    let mut h = FNV_OFFSET;
    hashes.push(h);
    for &id in ids {
        h = hash_step(h, id);
        hashes.push(h);
    }
    hashes
}

struct Entry<S> {
    tokens: Vec<u32>,
    state: S,
    bytes: usize,
    /// The tick of the last insertion or hit (larger is more recent).
    used: u64,
}

/// What [`PrefixCache::stats`] reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub capacity_bytes: usize,
    pub hits: u64,
    pub misses: u64,
}

/// Decoder states under their token prefixes, least recently used out first.
pub struct PrefixCache<S> {
    capacity_bytes: usize,
    bytes: usize,
    tick: u64,
    /// hash of the tokens → the entries with that hash (almost always one)
    entries: HashMap<u64, Vec<Entry<S>>>,
    /// prefix length → how many entries have it
    lengths: BTreeMap<usize, usize>,
    hits: u64,
    misses: u64,
}

impl<S: Clone> PrefixCache<S> {
    /// A cache of at most `capacity_bytes` (0 keeps nothing).
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            capacity_bytes,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
            lengths: BTreeMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.lengths.values().sum(),
            bytes: self.bytes,
            capacity_bytes: self.capacity_bytes,
            hits: self.hits,
            misses: self.misses,
        }
    }

    /// The state after the longest cached prefix of `ids` (at least one
    /// token), with that prefix's length; the entry becomes the most
    /// recently used.
    pub fn longest_prefix(&mut self, ids: &[u32]) -> Option<(usize, S)> {
        if ids.is_empty() {
            self.misses += 1;
            return None;
        }
        let hashes = prefix_hashes(ids);
        let candidates: Vec<usize> = self.lengths.range(1..=ids.len()).map(|(&l, _)| l).collect();
        for &len in candidates.iter().rev() {
            let Some(bucket) = self.entries.get_mut(&hashes[len]) else {
                continue;
            };
            if let Some(entry) = bucket.iter_mut().find(|e| e.tokens == ids[..len]) {
                self.tick += 1;
                entry.used = self.tick;
                self.hits += 1;
                return Some((len, entry.state.clone()));
            }
        }
        self.misses += 1;
        None
    }

    /// Keeps `state`, the state after `tokens`, taking `bytes` of the
    /// budget; replaces an entry for the same tokens, then evicts the least
    /// recently used entries until the budget holds. A state larger than
    /// the whole budget is not kept.
    pub fn insert(&mut self, tokens: &[u32], state: S, bytes: usize) {
        if tokens.is_empty() || bytes > self.capacity_bytes {
            return;
        }
        self.remove(tokens);
        self.tick += 1;
        let hash = *prefix_hashes(tokens).last().expect("one hash per prefix");
        self.entries.entry(hash).or_default().push(Entry {
            tokens: tokens.to_vec(),
            state,
            bytes,
            used: self.tick,
        });
        *self.lengths.entry(tokens.len()).or_default() += 1;
        self.bytes += bytes;
        while self.bytes > self.capacity_bytes {
            self.evict_least_recent();
        }
    }

    fn remove(&mut self, tokens: &[u32]) {
        let hash = *prefix_hashes(tokens).last().expect("one hash per prefix");
        let Some(bucket) = self.entries.get_mut(&hash) else {
            return;
        };
        if let Some(at) = bucket.iter().position(|e| e.tokens == tokens) {
            let entry = bucket.swap_remove(at);
            self.forget(hash, &entry);
        }
    }

    fn evict_least_recent(&mut self) {
        // A scan over the entries: a cache holds tens to thousands of
        // states of megabytes each, and eviction follows a whole request.
        let oldest = self
            .entries
            .iter()
            .flat_map(|(&h, bucket)| bucket.iter().enumerate().map(move |(i, e)| (e.used, h, i)))
            .min();
        if let Some((_, hash, i)) = oldest {
            let entry = self
                .entries
                .get_mut(&hash)
                .expect("found above")
                .swap_remove(i);
            self.forget(hash, &entry);
        }
    }

    /// Book-keeping after `entry` (hash `hash`) left its bucket.
    fn forget(&mut self, hash: u64, entry: &Entry<S>) {
        self.bytes -= entry.bytes;
        if self.entries.get(&hash).is_some_and(Vec::is_empty) {
            self.entries.remove(&hash);
        }
        let len = entry.tokens.len();
        let count = self
            .lengths
            .get_mut(&len)
            .expect("every entry's length is counted");
        *count -= 1;
        if *count == 0 {
            self.lengths.remove(&len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_cached_prefix_is_found_and_only_with_equal_tokens() {
        let mut cache = PrefixCache::new(1000);
        cache.insert(&[1, 2], "a", 10);
        cache.insert(&[1, 2, 3, 4], "b", 10);
        cache.insert(&[9, 9, 9], "c", 10);
        assert_eq!(cache.longest_prefix(&[1, 2, 3, 4, 5]), Some((4, "b")));
        assert_eq!(cache.longest_prefix(&[1, 2, 3]), Some((2, "a")));
        assert_eq!(cache.longest_prefix(&[1, 2]), Some((2, "a")));
        assert_eq!(cache.longest_prefix(&[9, 9, 8, 1]), None);
        assert_eq!(cache.longest_prefix(&[2, 1, 3, 4, 5]), None);
        assert_eq!(cache.longest_prefix(&[]), None);
        let stats = cache.stats();
        assert_eq!(
            (stats.entries, stats.bytes, stats.hits, stats.misses),
            (3, 30, 3, 3)
        );
    }

    #[test]
    fn eviction_takes_the_least_recently_used_within_the_budget() {
        let mut cache = PrefixCache::new(30);
        cache.insert(&[1], 1, 10);
        cache.insert(&[2], 2, 10);
        cache.insert(&[3], 3, 10);
        // a hit makes [1] the most recent: [2] goes first
        assert_eq!(cache.longest_prefix(&[1, 7]), Some((1, 1)));
        cache.insert(&[4], 4, 10);
        assert_eq!(cache.longest_prefix(&[2]), None);
        assert_eq!(cache.longest_prefix(&[1]), Some((1, 1)));
        assert_eq!(cache.longest_prefix(&[3]), Some((1, 3)));
        assert_eq!(cache.longest_prefix(&[4]), Some((1, 4)));
        // a bigger entry evicts as many as it needs
        cache.insert(&[5, 5], 5, 25);
        assert_eq!(cache.stats().entries, 1);
        assert_eq!(cache.stats().bytes, 25);
        // replacing keeps one entry per prefix; too big for the budget: not kept
        cache.insert(&[5, 5], 6, 20);
        assert_eq!(cache.longest_prefix(&[5, 5]), Some((2, 6)));
        assert_eq!(cache.stats().bytes, 20);
        cache.insert(&[7], 7, 31);
        assert_eq!(cache.longest_prefix(&[7]), None);
        let mut none = PrefixCache::new(0);
        none.insert(&[1], 1, 1);
        assert_eq!(none.stats().entries, 0);
    }

    #[test]
    fn colliding_hashes_are_told_apart_by_their_tokens() {
        // Force a collision by putting two entries in one bucket by hand.
        let mut cache = PrefixCache::new(100);
        cache.insert(&[1, 2], "x", 1);
        let hash = *prefix_hashes(&[1, 2]).last().unwrap();
        cache.entries.get_mut(&hash).unwrap().push(Entry {
            tokens: vec![3, 4],
            state: "y",
            bytes: 1,
            used: 0,
        });
        // [3, 4] hashes elsewhere, so only the true [1, 2] entry is found by lookup
        assert_eq!(cache.longest_prefix(&[1, 2, 5]), Some((2, "x")));
        // and an entry whose tokens differ from the prompt's is never returned
        cache
            .entries
            .get_mut(&hash)
            .unwrap()
            .retain(|e| e.tokens == [3, 4]);
        assert_eq!(cache.longest_prefix(&[1, 2, 5]), None);
    }
}

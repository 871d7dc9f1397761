//! A bounded, sharded LRU of classifications keyed by normalised SQL text.
//!
//! This module owns the cache in front of the [`Classifier`]: the key is
//! [`normalize`]'s output (literals folded, comments dropped), so `WHERE aid = 17`
//! and `WHERE aid = 42` share one entry. That is sound because classification is
//! a pure function of the normalised text: the only literal-dependent cases
//! (`SET default_transaction_read_only = on|off` and friends) keep their literals
//! in the key (see [`normalize`]), `set_config` is judged without looking at its
//! string arguments, and `EXPLAIN (ANALYZE <literal>)` counts as ANALYZE.
//!
//! Comments are not in the key, so a `/* pgpilot:... */` hint must be applied by
//! the caller from the raw text ([`super::normalize::hint`]), not from the cache.
//!
//! The hit path is: normalise into a thread-local buffer, hash once, lock one of
//! 16 shards, look up, relink, count, clone an `Arc`. Hit/miss counters live in
//! the shards (under the lock already held), not in one contended atomic. Keys longer than
//! [`MAX_KEY_BYTES`] are never cached (classified every time).
//!
//! A reload that changes the function lists swaps the classifier and then
//! [`ClassifyCache::clear`]s the cache. A classification still running with the
//! old classifier is not stored afterwards (a generation counter, read before
//! the classifier is loaded, says it is stale).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::classify::{Classification, Classifier};
use super::memo::StatementMemo;
use super::normalize::normalize;
use super::normalize_fast::normalize_plain_literals;

/// Normalised statements longer than this are not cached (bounds memory use).
pub(crate) const MAX_KEY_BYTES: usize = 8 * 1024;

/// Number of independently locked shards (for capacities of at least 64).
const SHARDS: usize = 16;

/// The thread-local key buffer is shrunk back if a huge statement grew it past this.
const BUFFER_KEEP: usize = 64 * 1024;

/// The key being built, and where the statement's literals are.
type Buffers = (Vec<u8>, Vec<(usize, usize)>);

thread_local! {
    static KEY: RefCell<Buffers> =
        RefCell::new((Vec::with_capacity(512), Vec::with_capacity(16)));
}

/// A key looked up: found, not found (with the entry to insert, if cacheable),
/// or not UTF-8 (never classified). `plain`: the plain-statement fast path
/// built the key (and found the literals).
enum Keyed {
    Hit {
        class: Arc<Classification>,
        plain: bool,
    },
    Miss {
        entry: Option<(u64, Arc<[u8]>)>,
        plain: bool,
    },
    NotUtf8,
}

/// A bounded LRU cache of classifications with hit/miss counters.
pub struct ClassifyCache {
    shards: Box<[Mutex<Lru>]>,
    enabled: bool,
    /// Seeded per process (keys come from clients); fast on short keys, where
    /// SipHash was a visible part of every query's cost.
    hasher: foldhash::fast::RandomState,
    /// Misses not counted by a shard (caching disabled, key too long).
    uncached: AtomicU64,
    /// Hits answered by a session's [`StatementMemo`] (never reached a shard).
    memo_hits: AtomicU64,
    /// Bumped by [`ClassifyCache::clear`]. A miss classified with a classifier
    /// loaded before a reload must not be stored after that reload emptied the
    /// cache: it is stored only if the generation read before the classifier was
    /// loaded is still current.
    generation: AtomicU64,
}

impl std::fmt::Debug for ClassifyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifyCache")
            .field("len", &self.len())
            .field("hits", &self.hits())
            .field("misses", &self.misses())
            .finish()
    }
}

impl ClassifyCache {
    /// A cache holding at most `capacity` classifications (0 disables caching).
    pub fn new(capacity: usize) -> Self {
        let shards = if capacity >= 4 * SHARDS { SHARDS } else { 1 };
        let per_shard = capacity.div_ceil(shards);
        Self {
            shards: (0..shards)
                .map(|_| Mutex::new(Lru::new(per_shard)))
                .collect(),
            enabled: capacity > 0,
            hasher: foldhash::fast::RandomState::default(),
            uncached: AtomicU64::new(0),
            memo_hits: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// Classify `sql` (raw bytes as the client sent them): normalise it (into a
    /// thread-local buffer), look the key up, and on a miss classify it with
    /// the classifier `classifier()` returns (loaded only then) and remember the
    /// result. `None` if `sql` is not UTF-8 (a client encoding pgpilot does not
    /// parse).
    pub fn classify<C, G>(
        &self,
        sql: &[u8],
        classifier: impl FnOnce() -> G,
    ) -> Option<Arc<Classification>>
    where
        C: Classifier + ?Sized,
        G: std::ops::Deref<Target = C>,
    {
        self.classify_remembering(None, sql, classifier)
    }

    /// [`ClassifyCache::classify`] for a session: first ask the session's
    /// `memo` (a statement of the same shape as a recent one is answered
    /// without building its key), and teach it the statements it did not know.
    /// With caching off the memo is not used either.
    pub(crate) fn classify_remembering<C, G>(
        &self,
        memo: Option<&mut StatementMemo>,
        sql: &[u8],
        classifier: impl FnOnce() -> G,
    ) -> Option<Arc<Classification>>
    where
        C: Classifier + ?Sized,
        G: std::ops::Deref<Target = C>,
    {
        // Before the classifier is loaded: see `generation`.
        let generation = self.generation.load(Ordering::SeqCst);
        let mut memo = memo.filter(|_| self.enabled);
        if let Some(class) = memo.as_mut().and_then(|m| m.find(sql, generation)) {
            self.memo_hits.fetch_add(1, Ordering::Relaxed);
            return Some(class);
        }
        let mut classifier = Some(classifier);
        // Run once, with the thread's buffers or (rarely) fresh ones.
        let mut keyed = |(key, literals): &mut Buffers| {
            let keyed = self.key_and_lookup(sql, key, literals);
            let plain = matches!(
                keyed,
                Keyed::Hit { plain: true, .. } | Keyed::Miss { plain: true, .. }
            );
            let class = match keyed {
                Keyed::NotUtf8 => return None,
                Keyed::Hit { class, .. } => class,
                Keyed::Miss { entry, .. } => {
                    let text = std::str::from_utf8(sql).ok()?;
                    let classifier = classifier.take()?;
                    let class = Arc::new(classifier().classify(text));
                    if let Some((hash, key)) = entry {
                        let mut shard = self.shard(hash);
                        // Checked under the shard's lock: `clear` bumps the
                        // generation before it empties the shards.
                        if self.generation.load(Ordering::SeqCst) == generation {
                            shard.insert(hash, key, class.clone());
                        }
                    }
                    class
                }
            };
            if let Some(memo) = memo.take().filter(|_| plain) {
                memo.remember(sql, literals, class.clone(), generation);
            }
            Some(class)
        };
        KEY.try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut buffers) => {
                let class = keyed(&mut buffers);
                if buffers.0.capacity() > BUFFER_KEEP {
                    *buffers = (Vec::with_capacity(512), Vec::with_capacity(16));
                }
                class
            }
            // Re-entered: buffers of its own.
            Err(_) => keyed(&mut Default::default()),
        })
        // The thread is exiting.
        .unwrap_or_else(|_| keyed(&mut Default::default()))
    }

    /// Build `sql`'s key in `key` and look it up.
    fn key_and_lookup(
        &self,
        sql: &[u8],
        key: &mut Vec<u8>,
        literals: &mut Vec<(usize, usize)>,
    ) -> Keyed {
        // The plain-statement path accepts only valid UTF-8: no separate check.
        let plain = normalize_plain_literals(sql, key, Some(literals));
        if !plain {
            let Ok(text) = std::str::from_utf8(sql) else {
                return Keyed::NotUtf8;
            };
            key.clear();
            let mut k = String::from_utf8(std::mem::take(key)).unwrap_or_default();
            normalize(text, &mut k);
            *key = k.into_bytes();
        }
        match self.lookup(key) {
            Ok(class) => Keyed::Hit { class, plain },
            Err(entry) => Keyed::Miss { entry, plain },
        }
    }

    /// Look `key` up (counting the hit or miss): `Ok(hit)`, or
    /// `Err((hash, key) to insert after classifying)` (`None` if not to be cached).
    #[allow(clippy::type_complexity)]
    fn lookup(&self, key: &[u8]) -> Result<Arc<Classification>, Option<(u64, Arc<[u8]>)>> {
        if key.len() > MAX_KEY_BYTES || !self.enabled {
            self.uncached.fetch_add(1, Ordering::Relaxed);
            return Err(None);
        }
        let hash = self.hasher.hash_one(key);
        match self.shard(hash).get(hash, key) {
            Some(hit) => Ok(hit),
            None => Err(Some((hash, Arc::from(key)))),
        }
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Lru> {
        // The high bits pick the shard; the map inside uses all of them.
        lock(&self.shards[(hash >> 60) as usize % self.shards.len()])
    }

    /// Forget every cached classification (after the function lists changed on a
    /// reload). Counters keep counting; the capacity stays as built.
    pub(crate) fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        for shard in self.shards.iter() {
            let mut lru = lock(shard);
            let fresh = Lru::new(lru.capacity);
            lru.map = fresh.map;
            lru.nodes = fresh.nodes;
            lru.head = NIL;
            lru.tail = NIL;
        }
    }

    /// Lookups answered from the cache.
    pub(crate) fn hits(&self) -> u64 {
        let counted: u64 = self.shards.iter().map(|s| lock(s).hits).sum();
        counted + self.memo_hits.load(Ordering::Relaxed)
    }

    /// Lookups that had to classify.
    pub(crate) fn misses(&self) -> u64 {
        let counted: u64 = self.shards.iter().map(|s| lock(s).misses).sum();
        counted + self.uncached.load(Ordering::Relaxed)
    }

    /// Classifications currently cached.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }
}

/// Lock a shard; a poisoned shard (a panic while held) is still consistent enough
/// to use, since every operation leaves the structure valid between statements.
fn lock(m: &Mutex<Lru>) -> MutexGuard<'_, Lru> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const NIL: u32 = u32::MAX;

/// One cached entry, linked into the recency list.
struct Node {
    key: Arc<[u8]>,
    hash: u64,
    value: Arc<Classification>,
    prev: u32,
    next: u32,
}

/// A small LRU: a hash map from key hash to slot(s), slots in a vector linked
/// most- to least-recently used. The map is keyed by the precomputed 64-bit hash
/// (so the key is hashed once per lookup); keys are compared on every hit, and
/// the rare 64-bit collision keeps several slots under one hash.
struct Lru {
    map: HashMap<u64, Slots, IdentityHash>,
    nodes: Vec<Node>,
    head: u32,
    tail: u32,
    capacity: usize,
    /// Counted under the shard's lock (no shared atomic on the hit path).
    hits: u64,
    misses: u64,
}

/// The slots whose keys share one 64-bit hash (almost always exactly one).
enum Slots {
    One(u32),
    Many(Vec<u32>),
}

impl Slots {
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let (one, many) = match self {
            Slots::One(s) => (Some(*s), &[][..]),
            Slots::Many(v) => (None, &v[..]),
        };
        one.into_iter().chain(many.iter().copied())
    }

    fn push(&mut self, slot: u32) {
        *self = match std::mem::replace(self, Slots::Many(Vec::new())) {
            Slots::One(s) => Slots::Many(vec![s, slot]),
            Slots::Many(mut v) => {
                v.push(slot);
                Slots::Many(v)
            }
        };
    }

    /// Remove `slot`; true if no slot is left.
    fn remove(&mut self, slot: u32) -> bool {
        match self {
            Slots::One(s) => *s == slot,
            Slots::Many(v) => {
                v.retain(|&s| s != slot);
                v.is_empty()
            }
        }
    }
}

/// The keys of [`Lru::map`] are already hashes.
#[derive(Default, Clone, Copy)]
struct IdentityHash;

impl BuildHasher for IdentityHash {
    type Hasher = IdentityHasher;
    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher(0)
    }
}

struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::with_hasher(IdentityHash),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity: capacity.min(NIL as usize - 1),
            hits: 0,
            misses: 0,
        }
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        self.map
            .get(&hash)?
            .iter()
            .find(|&s| &*self.nodes[s as usize].key == key)
    }

    /// Look up and count a hit or a miss.
    fn get(&mut self, hash: u64, key: &[u8]) -> Option<Arc<Classification>> {
        let Some(slot) = self.find(hash, key) else {
            self.misses += 1;
            return None;
        };
        self.hits += 1;
        self.move_to_front(slot);
        Some(self.nodes[slot as usize].value.clone())
    }

    fn insert(&mut self, hash: u64, key: Arc<[u8]>, value: Arc<Classification>) {
        if self.capacity == 0 {
            return;
        }
        if let Some(slot) = self.find(hash, &key) {
            self.nodes[slot as usize].value = value;
            self.move_to_front(slot);
            return;
        }
        let slot = if self.nodes.len() < self.capacity {
            self.nodes.push(Node {
                key,
                hash,
                value,
                prev: NIL,
                next: NIL,
            });
            (self.nodes.len() - 1) as u32
        } else {
            // Evict the least recently used entry and reuse its slot.
            let slot = self.tail;
            self.unlink(slot);
            let old_hash = self.nodes[slot as usize].hash;
            if let Some(list) = self.map.get_mut(&old_hash)
                && list.remove(slot)
            {
                self.map.remove(&old_hash);
            }
            let node = &mut self.nodes[slot as usize];
            node.key = key;
            node.hash = hash;
            node.value = value;
            slot
        };
        self.link_front(slot);
        match self.map.get_mut(&hash) {
            Some(list) => list.push(slot),
            None => {
                self.map.insert(hash, Slots::One(slot));
            }
        }
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let n = &self.nodes[slot as usize];
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn link_front(&mut self, slot: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[slot as usize];
            n.prev = NIL;
            n.next = old;
        }
        if old == NIL {
            self.tail = slot;
        } else {
            self.nodes[old as usize].prev = slot;
        }
        self.head = slot;
    }

    fn move_to_front(&mut self, slot: u32) {
        if self.head != slot {
            self.unlink(slot);
            self.link_front(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::classify::{Access, SqlParserClassifier};

    /// Classify UTF-8 text through `cache`.
    fn classify(cache: &ClassifyCache, sql: &str, cl: &SqlParserClassifier) -> Arc<Classification> {
        cache.classify(sql.as_bytes(), || cl).expect("UTF-8")
    }

    #[test]
    fn hits_share_entries_across_literals() {
        let cache = ClassifyCache::new(100);
        let cl = SqlParserClassifier::default();
        let a = classify(&cache, "SELECT * FROM t WHERE aid = 17", &cl);
        let b = classify(&cache, "select *  from t where aid=42 /* x */", &cl);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (1, 1, 1));
        let w = classify(&cache, "SELECT * FROM t WHERE aid = 17 FOR UPDATE", &cl);
        assert_eq!(w.access, Access::Write);
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (1, 2, 2));
    }

    #[test]
    fn a_session_memo_answers_its_repeated_shapes_until_a_reload() {
        let cache = ClassifyCache::new(100);
        let cl = SqlParserClassifier::default();
        let mut memo = StatementMemo::default();
        let run = |memo: &mut StatementMemo, sql: &str| {
            cache
                .classify_remembering(Some(memo), sql.as_bytes(), || &cl)
                .expect("UTF-8")
        };
        let a = run(&mut memo, "SELECT * FROM t WHERE aid = 17");
        let b = run(&mut memo, "SELECT * FROM t WHERE aid = 42");
        assert!(Arc::ptr_eq(&a, &b));
        // The second was the memo's: the shards saw one lookup, a miss.
        assert_eq!(cache.shards.iter().map(|s| lock(s).hits).sum::<u64>(), 0);
        assert_eq!((cache.hits(), cache.misses()), (1, 1));
        // Another shape is the cache's business.
        let w = run(&mut memo, "SELECT * FROM t WHERE aid = 17 FOR UPDATE");
        assert_eq!(w.access, Access::Write);
        // After a reload the memo's classifications are stale.
        cache.clear();
        let c = run(&mut memo, "SELECT * FROM t WHERE aid = 5");
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!((cache.hits(), cache.misses()), (1, 3));
        // SET keeps its literals in the key: never the memo's.
        let on = run(&mut memo, "SET default_transaction_read_only = on");
        let off = run(&mut memo, "SET default_transaction_read_only = off");
        assert_eq!((cache.hits(), cache.misses()), (1, 5));
        assert_eq!(
            (on.sets_read_only_default, off.sets_read_only_default),
            (Some(true), Some(false))
        );
        // With caching off, nothing is remembered either.
        let off = ClassifyCache::new(0);
        let mut memo = StatementMemo::default();
        for _ in 0..2 {
            off.classify_remembering(Some(&mut memo), b"SELECT 1", || &cl);
        }
        assert_eq!((off.hits(), off.misses()), (0, 2));
    }

    /// Empties the cache while it classifies, as a reload can in another thread.
    struct ReloadingClassifier<'a>(&'a ClassifyCache, SqlParserClassifier);

    impl Classifier for ReloadingClassifier<'_> {
        fn classify(&self, sql: &str) -> Classification {
            self.0.clear();
            self.1.classify(sql)
        }
    }

    #[test]
    fn a_classification_overtaken_by_a_clear_is_not_stored() {
        let cache = ClassifyCache::new(100);
        let reloading = ReloadingClassifier(&cache, SqlParserClassifier::default());
        let class = cache.classify(b"SELECT a FROM t", || &reloading);
        assert_eq!(class.map(|c| c.access), Some(Access::Read));
        assert_eq!(cache.len(), 0, "a result from before the reload was cached");
        // The next miss is classified after the clear, and stored.
        classify(&cache, "SELECT a FROM t", &SqlParserClassifier::default());
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn literal_dependent_set_is_not_folded() {
        let cache = ClassifyCache::new(100);
        let cl = SqlParserClassifier::default();
        let on = classify(&cache, "SET default_transaction_read_only = 'on'", &cl);
        let off = classify(&cache, "SET default_transaction_read_only = 'off'", &cl);
        assert_eq!(on.sets_read_only_default, Some(true));
        assert_eq!(off.sets_read_only_default, Some(false));
        assert!(off.sticky_primary && !on.sticky_primary);
    }

    #[test]
    fn least_recently_used_is_evicted() {
        let cache = ClassifyCache::new(2);
        let cl = SqlParserClassifier::default();
        classify(&cache, "SELECT a FROM t1", &cl);
        classify(&cache, "SELECT a FROM t2", &cl);
        classify(&cache, "SELECT a FROM t1", &cl); // t1 is now the most recent
        classify(&cache, "SELECT a FROM t3", &cl); // evicts t2
        assert_eq!(cache.len(), 2);
        let misses = cache.misses();
        classify(&cache, "SELECT a FROM t1", &cl);
        assert_eq!(cache.misses(), misses);
        classify(&cache, "SELECT a FROM t2", &cl);
        assert_eq!(cache.misses(), misses + 1);
    }

    #[test]
    fn many_entries_stay_bounded_and_consistent() {
        let cache = ClassifyCache::new(100);
        let cl = SqlParserClassifier::default();
        for round in 0..3 {
            for i in 0..300 {
                let class = classify(
                    &cache,
                    &format!("SELECT c FROM t{i} WHERE x = {round}"),
                    &cl,
                );
                assert_eq!(class.access, Access::Read);
            }
        }
        assert!(cache.len() <= 100 + SHARDS);
        assert_eq!(cache.hits() + cache.misses(), 900);
    }

    #[test]
    fn zero_capacity_and_huge_keys_are_not_cached() {
        let cl = SqlParserClassifier::default();
        let cache = ClassifyCache::new(0);
        classify(&cache, "SELECT 1", &cl);
        classify(&cache, "SELECT 1", &cl);
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (0, 2, 0));
        let cache = ClassifyCache::new(10);
        assert!(cache.classify(b"SELECT '\xff'", || &cl).is_none());
        assert!(cache.classify(b"SELECT 1 /* \xfe */", || &cl).is_none());
        let huge = format!("SELECT {} FROM t", vec!["a"; MAX_KEY_BYTES].join(", "));
        classify(&cache, &huge, &cl);
        classify(&cache, &huge, &cl);
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (0, 2, 0));
    }

    #[test]
    fn hash_collisions_keep_both_entries() {
        let mut lru = Lru::new(4);
        let class = |a| {
            Arc::new(Classification {
                access: a,
                ..Classification::empty()
            })
        };
        lru.insert(7, Arc::from(&b"a"[..]), class(Access::Read));
        lru.insert(7, Arc::from(&b"b"[..]), class(Access::Write));
        assert_eq!(lru.get(7, b"a").unwrap().access, Access::Read);
        assert_eq!(lru.get(7, b"b").unwrap().access, Access::Write);
        assert!(lru.get(7, b"c").is_none());
        for (i, k) in ["c", "d", "e", "f"].into_iter().enumerate() {
            lru.insert(i as u64, Arc::from(k.as_bytes()), class(Access::Read));
        }
        assert!(lru.get(7, b"a").is_none() && lru.get(7, b"b").is_none());
        assert_eq!(lru.map.len(), 4);
    }
}

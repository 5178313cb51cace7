//! The replay cache: one Kafka record per delivery id, however many copies arrive and however
//! they interleave.
//!
//! The first request for an id claims it and produces. Copies that arrive while it is in
//! flight wait for its outcome instead of answering at once: if it was accepted they answer
//! 2xx and produce nothing; if it failed (Kafka unavailable, the client hung up) the claim is
//! released and one of them takes over. So a duplicate is never told 2xx for an event that is
//! not in Kafka.
//!
//! Accepted ids are remembered in two generations of a hash set, rotated every TTL: an id is
//! remembered for at least the TTL (at least twice the timestamp tolerance, so a replay inside
//! the signature window always hits) and at most twice it. Each id is kept as 16 bytes of its
//! SHA-256, about 40 bytes in all, so the default million ids take tens of MB rather than the
//! hundreds a general-purpose cache with per-entry bookkeeping needs (see `bench-ingress
//! parts`). If the ids of one TTL reach `max_ids / 2`, the generations rotate early: ids are
//! then remembered for less than the TTL, which `spillway_ingress_replay_early_rotations_total`
//! counts and a warning reports.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
// tokio's clock, so tests can move time with `tokio::time::pause`/`advance`.
use tokio::time::Instant;

const PENDING: u8 = 0;
const ACCEPTED: u8 = 1;
const FAILED: u8 = 2;

/// Shards of the cache, each behind its own lock.
const SHARDS: usize = 8;

/// One id's claim while it is produced: its state and the copies waiting for it to leave
/// `PENDING`. Copies waiting at all are the rare case.
#[derive(Default)]
struct Slot {
    state: AtomicU8,
    settled: Notify,
}

impl Slot {
    fn settle(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.settled.notify_waiters();
    }

    /// Waits until the claim is settled; returns the outcome.
    async fn outcome(&self) -> u8 {
        loop {
            // Created before the state is read, so a settle in between is not missed
            // (`notify_waiters` reaches every `Notified` that exists).
            let notified = self.settled.notified();
            let state = self.state.load(Ordering::Acquire);
            if state != PENDING {
                return state;
            }
            notified.await;
        }
    }
}

/// An id as the cache keeps it: the first 16 bytes of its SHA-256. Collisions between
/// distinct ids are as unlikely as a 128-bit hash makes them (about 10^-27 for two million
/// ids), and senders cannot search for one: ids come only from authenticated requests.
type Key = u128;

fn key(id: &str) -> Key {
    let digest = Sha256::digest(id.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_le_bytes(first)
}

struct Shard {
    /// Ids accepted since `rotated_at`.
    current: HashSet<Key>,
    /// Ids accepted in the generation before.
    previous: HashSet<Key>,
    rotated_at: Instant,
    /// Ids being produced right now.
    pending: HashMap<Key, Arc<Slot>>,
}

impl Shard {
    fn new(now: Instant) -> Shard {
        Shard {
            current: HashSet::new(),
            previous: HashSet::new(),
            rotated_at: now,
            pending: HashMap::new(),
        }
    }

    /// Forgets the pending claim `slot` of `key` (only that claim, should another have
    /// replaced it).
    fn release(&mut self, key: Key, slot: &Arc<Slot>) {
        if self.pending.get(&key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            self.pending.remove(&key);
        }
    }

    /// Rotates the generations if the TTL passed or the current one holds `max` ids. Returns
    /// whether the rotation was forced by size, and how many ids were forgotten.
    fn maybe_rotate(&mut self, now: Instant, ttl: Duration, max: usize) -> (bool, usize) {
        let age = now.saturating_duration_since(self.rotated_at);
        if age >= ttl.saturating_mul(2) {
            let forgotten = self.current.len() + self.previous.len();
            self.current.clear();
            self.previous.clear();
            self.rotated_at = now;
            (false, forgotten)
        } else if age >= ttl || self.current.len() >= max {
            // Reuse the old generation's table: no regrowth after the first TTL.
            std::mem::swap(&mut self.current, &mut self.previous);
            let forgotten = self.current.len();
            self.current.clear();
            self.rotated_at = now;
            (age < ttl, forgotten)
        } else {
            (false, 0)
        }
    }
}

/// The gauge and counter the cache keeps current (constructed by `telemetry`).
#[derive(Clone)]
pub struct ReplayMetrics {
    /// Ids remembered (both generations).
    pub ids: IntGauge,
    /// Rotations forced by `max_ids` before the TTL passed.
    pub early_rotations: IntCounter,
}

struct Inner {
    shards: Vec<Mutex<Shard>>,
    ttl: Duration,
    /// Most ids one shard's current generation holds before it rotates early.
    max_per_generation: usize,
    /// Ids in all shards' generations.
    ids: AtomicI64,
    metrics: Option<ReplayMetrics>,
}

/// The cache of delivery ids, shared by all requests of an ingress instance.
#[derive(Clone)]
pub struct ReplayCache {
    inner: Arc<Inner>,
}

/// What a request may do with its delivery id.
pub enum Claim {
    /// This request is the first: produce, then call [`First::accepted`].
    First(First),
    /// An earlier copy was accepted: answer 2xx and produce nothing.
    Duplicate,
}

/// The claim of the first request. Dropping it without [`First::accepted`] releases the id,
/// so a waiting copy (or a later retry) can take over.
pub struct First {
    cache: ReplayCache,
    key: Key,
    slot: Arc<Slot>,
    accepted: bool,
}

impl First {
    /// Kafka acknowledged the record: every copy, now and within the TTL, is a duplicate.
    pub fn accepted(mut self) {
        self.accepted = true;
        {
            let mut shard = self.cache.shard(self.key);
            // Rotate first: the produce took a while since the claim, and an id must not
            // land in a generation that is already older than the TTL.
            self.cache.rotate(&mut shard);
            shard.release(self.key, &self.slot);
            if shard.current.insert(self.key) {
                self.cache.count_ids(1);
            }
        }
        self.slot.settle(ACCEPTED);
    }
}

impl Drop for First {
    fn drop(&mut self) {
        if !self.accepted {
            // Release first, then wake the waiters: one of them claims the id afresh.
            self.cache.shard(self.key).release(self.key, &self.slot);
            self.slot.settle(FAILED);
        }
    }
}

impl ReplayCache {
    /// A cache remembering accepted ids for at least `ttl`, at most `max_ids` of them.
    pub fn new(ttl: Duration, max_ids: u64) -> Self {
        Self::with_metrics(ttl, max_ids, None)
    }

    /// [`ReplayCache::new`], keeping `metrics` current.
    pub fn with_metrics(ttl: Duration, max_ids: u64, metrics: Option<ReplayMetrics>) -> Self {
        let now = Instant::now();
        let per_shard = usize::try_from(max_ids)
            .unwrap_or(usize::MAX)
            .div_ceil(SHARDS);
        ReplayCache {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::new(now))).collect(),
                ttl,
                // Two generations together hold at most `max_ids`.
                max_per_generation: (per_shard / 2).max(1),
                ids: AtomicI64::new(0),
                metrics,
            }),
        }
    }

    fn shard(&self, key: Key) -> MutexGuard<'_, Shard> {
        let shard = &self.inner.shards[(key as usize) % SHARDS];
        // Every update under the lock is a single set or map operation, so a panic elsewhere
        // cannot leave a shard inconsistent: a poisoned lock is still usable.
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ids remembered, in both generations.
    pub fn len(&self) -> usize {
        self.inner.ids.load(Ordering::Relaxed).max(0) as usize
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn count_ids(&self, delta: i64) {
        self.inner.ids.fetch_add(delta, Ordering::Relaxed);
        if let Some(m) = &self.inner.metrics {
            m.ids.add(delta);
        }
    }

    /// Rotates `shard`'s generations if due, counting what that forgets.
    fn rotate(&self, shard: &mut Shard) {
        let (forced, forgotten) = shard.maybe_rotate(
            Instant::now(),
            self.inner.ttl,
            self.inner.max_per_generation,
        );
        if forgotten > 0 {
            self.count_ids(-(forgotten as i64));
        }
        if forced {
            tracing::warn!(
                max_ids = self.inner.max_per_generation * 2 * SHARDS,
                "replay cache full: rotated before the TTL passed, so some ids are \
                 remembered for less than replay.ttl_secs; raise replay.max_ids"
            );
            if let Some(m) = &self.inner.metrics {
                m.early_rotations.inc();
            }
        }
    }

    /// Claims `id`, waiting for an in-flight copy's outcome if there is one.
    pub async fn claim(&self, id: &str) -> Claim {
        let key = key(id);
        loop {
            let in_flight = {
                let mut shard = self.shard(key);
                self.rotate(&mut shard);
                if shard.current.contains(&key) || shard.previous.contains(&key) {
                    return Claim::Duplicate;
                }
                match shard.pending.get(&key) {
                    Some(slot) => slot.clone(),
                    None => {
                        let slot = Arc::new(Slot::default());
                        shard.pending.insert(key, slot.clone());
                        return Claim::First(First {
                            cache: self.clone(),
                            key,
                            slot,
                            accepted: false,
                        });
                    }
                }
            };
            if in_flight.outcome().await == ACCEPTED {
                return Claim::Duplicate;
            }
            // The first copy failed and released the id: try to become the first.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn cache() -> ReplayCache {
        ReplayCache::new(Duration::from_secs(600), 10_000)
    }

    #[tokio::test]
    async fn a_sequential_replay_is_a_duplicate() {
        let c = cache();
        let Claim::First(first) = c.claim("gh:1").await else {
            panic!("the first request claims the id");
        };
        first.accepted();
        assert!(matches!(c.claim("gh:1").await, Claim::Duplicate));
        assert!(matches!(c.claim("gh:2").await, Claim::First(_)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_concurrent_copies_produce_exactly_once() {
        let c = cache();
        let produced = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (c, produced) = (c.clone(), produced.clone());
            tasks.push(tokio::spawn(async move {
                match c.claim("sw:msg_1").await {
                    Claim::First(first) => {
                        tokio::time::sleep(Duration::from_millis(50)).await; // the produce
                        produced.fetch_add(1, Ordering::SeqCst);
                        first.accepted();
                        "produced"
                    }
                    Claim::Duplicate => "duplicate",
                }
            }));
        }
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        assert_eq!(produced.load(Ordering::SeqCst), 1);
        assert_eq!(outcomes.iter().filter(|o| **o == "duplicate").count(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_copy_hands_over_and_no_copy_is_told_2xx_early() {
        let c = cache();
        let Claim::First(first) = c.claim("s:1").await else {
            panic!("first");
        };
        // A copy arrives while the first is producing; it must wait, not answer. With time
        // paused, the timeout fires only once the copy is blocked for good.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), c.claim("s:1"))
                .await
                .is_err(),
            "the copy waits for the first's outcome"
        );
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { matches!(c.claim("s:1").await, Claim::First(_)) })
        };
        drop(first); // Kafka was unavailable: 503 for the first request
        assert!(
            waiter.await.unwrap(),
            "the waiting copy takes over and produces"
        );
    }

    #[test]
    fn an_accepted_id_is_remembered_at_least_the_ttl_and_forgotten_by_twice_it() {
        let ttl = Duration::from_secs(600);
        let t0 = Instant::now();
        let mut s = Shard::new(t0);
        let seen = |s: &Shard, k: Key| s.current.contains(&k) || s.previous.contains(&k);
        // Accepted just before a rotation: the worst case for how long it is kept.
        assert_eq!(
            s.maybe_rotate(t0 + ttl - Duration::from_secs(1), ttl, 1000),
            (false, 0)
        );
        s.current.insert(1);
        assert_eq!(s.maybe_rotate(t0 + ttl, ttl, 1000), (false, 0));
        assert!(
            seen(&s, 1),
            "rotated into the previous generation, still remembered"
        );
        assert_eq!(
            s.maybe_rotate(t0 + 2 * ttl - Duration::from_secs(2), ttl, 1000),
            (false, 0)
        );
        assert!(seen(&s, 1), "a TTL after it was accepted, still remembered");
        assert_eq!(s.maybe_rotate(t0 + 2 * ttl, ttl, 1000), (false, 1));
        assert!(!seen(&s, 1), "gone two rotations later");
        // A shard nobody touched for two TTLs forgets everything at once.
        s.current.insert(2);
        s.previous.insert(3);
        assert_eq!(s.maybe_rotate(t0 + 5 * ttl, ttl, 1000), (false, 2));
        assert!(s.current.is_empty() && s.previous.is_empty());
    }

    #[test]
    fn a_full_generation_rotates_early_and_memory_stays_bounded() {
        let ttl = Duration::from_secs(600);
        let t0 = Instant::now();
        let mut s = Shard::new(t0);
        for k in 0..4 {
            s.current.insert(k);
        }
        assert_eq!(
            s.maybe_rotate(t0 + Duration::from_secs(1), ttl, 4),
            (true, 0),
            "forced by size"
        );
        assert_eq!((s.current.len(), s.previous.len()), (0, 4));
    }

    #[tokio::test]
    async fn a_cache_at_max_ids_counts_its_early_rotations_and_holds_no_more() {
        let metrics = ReplayMetrics {
            ids: IntGauge::new("ids", "ids").unwrap(),
            early_rotations: IntCounter::new("early", "early").unwrap(),
        };
        let c = ReplayCache::with_metrics(Duration::from_secs(600), 64, Some(metrics.clone()));
        for i in 0..1000 {
            let Claim::First(f) = c.claim(&format!("id-{i}")).await else {
                panic!("fresh id");
            };
            f.accepted();
        }
        assert!(c.len() <= 64, "{} ids held", c.len());
        assert_eq!(metrics.ids.get(), c.len() as i64);
        assert!(metrics.early_rotations.get() > 0);
        // The most recent id is still caught.
        assert!(matches!(c.claim("id-999").await, Claim::Duplicate));
    }

    #[tokio::test(start_paused = true)]
    async fn an_id_accepted_late_in_a_generation_is_still_kept_a_full_ttl() {
        let ttl = Duration::from_secs(600);
        let c = ReplayCache::new(ttl, 10_000);
        // Claimed near the end of a generation; the produce takes 30 s, past its end.
        tokio::time::advance(ttl - Duration::from_secs(10)).await;
        let Claim::First(f) = c.claim("slow").await else {
            panic!("fresh id");
        };
        tokio::time::advance(Duration::from_secs(30)).await;
        f.accepted();
        // A replay one TTL after the acceptance is still caught.
        tokio::time::advance(ttl - Duration::from_secs(1)).await;
        assert!(matches!(c.claim("slow").await, Claim::Duplicate));
    }

    #[tokio::test]
    async fn ids_expire_after_the_ttl() {
        let c = ReplayCache::new(Duration::from_millis(100), 100);
        if let Claim::First(f) = c.claim("x").await {
            f.accepted();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Claim::First(_) = c.claim("x").await {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

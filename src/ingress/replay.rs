//! The replay cache: one Kafka record per delivery id, however many copies arrive and however
//! they interleave.
//!
//! The first request for an id claims it and produces. Copies that arrive while it is in
//! flight wait for its outcome instead of answering at once: if it was accepted they answer
//! 2xx and produce nothing; if it failed (Kafka unavailable, the client hung up) the claim is
//! released and one of them takes over. So a duplicate is never told 2xx for an event that is
//! not in Kafka. Accepted ids are kept for the TTL (at least twice the timestamp tolerance,
//! so a replay inside the signature window always hits), bounded in number by moka's
//! eviction.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Accepted,
    Failed,
}

/// The cache of delivery ids, shared by all requests of an ingress instance.
#[derive(Clone)]
pub struct ReplayCache {
    cache: moka::sync::Cache<String, Arc<watch::Sender<State>>>,
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
    id: String,
    slot: Arc<watch::Sender<State>>,
    accepted: bool,
}

impl First {
    /// Kafka acknowledged the record: every copy, now and within the TTL, is a duplicate.
    pub fn accepted(mut self) {
        self.accepted = true;
        self.slot.send_replace(State::Accepted);
    }
}

impl Drop for First {
    fn drop(&mut self) {
        if !self.accepted {
            // Remove first, then wake the waiters: one of them inserts a fresh claim. Only
            // this claim's own entry goes: if capacity pressure evicted it and another copy
            // claimed the id since, that claim stays.
            let own = &self.slot;
            self.cache
                .cache
                .entry_by_ref(&self.id)
                .and_compute_with(|entry| match entry {
                    Some(e) if Arc::ptr_eq(e.value(), own) => moka::ops::compute::Op::Remove,
                    _ => moka::ops::compute::Op::Nop,
                });
            self.slot.send_replace(State::Failed);
        }
    }
}

impl ReplayCache {
    /// A cache keeping accepted ids for `ttl`, at most `max_ids` of them.
    pub fn new(ttl: Duration, max_ids: u64) -> Self {
        ReplayCache {
            cache: moka::sync::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(max_ids)
                .build(),
        }
    }

    /// Claims `id`, waiting for an in-flight copy's outcome if there is one.
    pub async fn claim(&self, id: &str) -> Claim {
        loop {
            let entry = self
                .cache
                .entry_by_ref(id)
                .or_insert_with(|| Arc::new(watch::Sender::new(State::Pending)));
            let fresh = entry.is_fresh();
            let slot = entry.into_value();
            if fresh {
                return Claim::First(First {
                    cache: self.clone(),
                    id: id.to_string(),
                    slot,
                    accepted: false,
                });
            }
            let mut rx = slot.subscribe();
            let outcome = rx
                .wait_for(|s| *s != State::Pending)
                .await
                .map(|s| *s)
                .unwrap_or(State::Failed);
            if outcome == State::Accepted {
                return Claim::Duplicate;
            }
            // The first copy failed and released the id: try to become the first.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_first_copy_hands_over_and_no_copy_is_told_2xx_early() {
        let c = cache();
        let Claim::First(first) = c.claim("s:1").await else {
            panic!("first");
        };
        // A copy arrives while the first is producing; it must wait, not answer 2xx.
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { matches!(c.claim("s:1").await, Claim::First(_)) })
        };
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "the copy waits for the first's outcome"
        );
        drop(first); // Kafka was unavailable: 503 for the first request
        assert!(
            waiter.await.unwrap(),
            "the waiting copy takes over and produces"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_claim_leaves_a_newer_claim_of_the_same_id_alone() {
        let c = cache();
        let Claim::First(old) = c.claim("x").await else {
            panic!("first claim");
        };
        // Capacity pressure evicts the pending entry; another copy claims the id afresh.
        c.cache.invalidate("x");
        let Claim::First(newer) = c.claim("x").await else {
            panic!("the evicted id is claimable again");
        };
        drop(old); // the old produce failed
                   // With time paused, the timeout fires only once the copy is blocked for good.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), c.claim("x"))
                .await
                .is_err(),
            "a copy waits for the newer claim instead of producing again"
        );
        let c2 = c.clone();
        let copy = tokio::spawn(async move { matches!(c2.claim("x").await, Claim::Duplicate) });
        newer.accepted();
        assert!(
            copy.await.unwrap(),
            "and is a duplicate once it is accepted"
        );
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

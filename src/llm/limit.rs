//! Admission control for one provider account, shared by every task of the process.
//!
//! A request is admitted when all of these allow it, taking turns fairly between the events'
//! classes (`processor.fairness`, [`crate::fair::Turnstile`]) and in arrival order within one:
//!
//! * no `Retry-After` deadline is pending (a 429 sets one for the whole account, so no request
//!   is sent before it);
//! * the token buckets (combined, input, output; whichever the account has) hold the prompt
//!   estimate plus `max_tokens`. The reservation is settled with the provider's actual usage
//!   after the answer and the difference refunded, the way providers account it;
//! * the requests-per-minute limiter, a [`governor`] GCRA, has a cell.
//!
//! governor has no way to give cells back or to lower its state to what a provider reports,
//! and token reservations need both, so the token buckets are a small refundable bucket here.
//! Answers' rate-limit headers clamp the buckets to what the provider says is left, so replicas
//! sharing an account converge on its real limit; `share` is the static alternative.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use super::client::RateHeaders;
use crate::fair::{Share, Turnstile};
use crate::llm::config::ProviderConfig;

/// A per-minute limit as a bucket that refills continuously and can be refunded and clamped.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_sec: f64,
    capacity: f64,
    level: f64,
    last: Instant,
    /// Sum of corrections made from provider headers, so one foreign consumption reported by
    /// several answers is corrected once.
    corrected: f64,
}

impl TokenBucket {
    /// A full bucket for `per_minute`, holding at most `burst` worth of it.
    pub fn new(per_minute: f64, burst: Duration, now: Instant) -> Self {
        let per_sec = per_minute / 60.0;
        let capacity = (per_sec * burst.as_secs_f64()).max(1.0);
        TokenBucket {
            per_sec,
            capacity,
            level: capacity,
            last: now,
            corrected: 0.0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * self.per_sec).min(self.capacity);
        self.last = now;
    }

    /// Time until `n` fits. A request larger than the capacity fits once the bucket is full
    /// (and then drives the level negative), so it is slow but never stuck.
    fn wait_for(&self, n: f64) -> Duration {
        let need = n.min(self.capacity);
        if self.level >= need {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((need - self.level) / self.per_sec)
    }

    fn take(&mut self, n: f64) {
        self.level -= n;
    }

    /// Adds back (or, with a negative `n`, charges) tokens, never above the capacity.
    fn adjust(&mut self, n: f64) {
        self.level = (self.level + n).min(self.capacity);
    }

    /// The provider had `remaining` where this bucket had `level_then` (right after the same
    /// request was admitted on both sides): the difference is what others used (replicas
    /// sharing the account) and is charged now, minus what was already charged since.
    fn correct(&mut self, then: Snapshot, remaining: f64) {
        let gap = then.level - remaining - (self.corrected - then.corrected);
        if gap > 0.0 {
            self.level -= gap;
            self.corrected += gap;
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            level: self.level,
            corrected: self.corrected,
        }
    }

    /// Tokens available now (after refilling to `now`).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }
}

/// A bucket's state right after a request took its tokens.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    level: f64,
    corrected: f64,
}

#[derive(Debug)]
struct Buckets {
    total: Option<TokenBucket>,
    input: Option<TokenBucket>,
    output: Option<TokenBucket>,
}

/// Admission control of one provider account.
pub struct Admission {
    requests: Option<DefaultDirectRateLimiter>,
    request_interval: Option<Duration>,
    clock: DefaultClock,
    buckets: Mutex<Buckets>,
    hold_until: Mutex<Option<Instant>>,
    /// Requests are admitted one at a time, by weighted fair turns between the events'
    /// classes (`processor.fairness`) and in arrival order within one, so none starves.
    queue: Turnstile,
    /// Wakes the request at the head of the queue when a settlement gives tokens back, so it
    /// does not sleep out a wait computed before the refund.
    refunded: tokio::sync::Notify,
}

/// Tokens reserved for one request. Settle it with the actual usage; dropping it unsettled
/// (an error without usage) keeps the prompt charged and refunds the output reservation.
pub struct Reservation<'a> {
    admission: &'a Admission,
    input: u64,
    output: u64,
    settled: bool,
    /// Total, input and output buckets right after this request took its tokens.
    taken: [Option<Snapshot>; 3],
}

impl Reservation<'_> {
    /// Takes in the rate-limit headers of this request's answer. They describe the account
    /// when the provider admitted this request; comparing them with this bucket's state at the
    /// same moment (not now, half a latency later) finds consumption by others without
    /// mistaking the refill since for it.
    pub fn observe(&self, h: &RateHeaders) {
        {
            let mut guard = lock(&self.admission.buckets);
            let b = &mut *guard;
            for (bucket, then, remaining) in [
                (b.total.as_mut(), self.taken[0], h.remaining_tokens),
                (b.input.as_mut(), self.taken[1], h.remaining_input_tokens),
                (b.output.as_mut(), self.taken[2], h.remaining_output_tokens),
            ] {
                if let (Some(bucket), Some(then), Some(remaining)) = (bucket, then, remaining) {
                    bucket.correct(then, remaining as f64);
                }
            }
        }
        if let (Some(0), Some(interval)) = (h.remaining_requests, self.admission.request_interval) {
            self.admission.hold(interval);
        }
    }

    /// Settles against the provider's usage: the difference is refunded (or charged when the
    /// prompt estimate was low).
    pub fn settle(mut self, input_tokens: u64, output_tokens: u64) {
        self.settled = true;
        self.admission
            .settle(self.input, self.output, input_tokens, output_tokens);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.admission
                .settle(self.input, self.output, self.input, 0);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain numbers inside; a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Admission {
    /// Limits from a provider's configuration, scaled by its `share`.
    pub fn new(config: &ProviderConfig) -> Self {
        let burst = Duration::from_millis(config.burst_ms);
        let now = Instant::now();
        let scaled = |limit: Option<u64>| limit.map(|l| l as f64 * config.share);
        let bucket = |limit: Option<u64>| scaled(limit).map(|l| TokenBucket::new(l, burst, now));
        let (requests, request_interval) = match scaled(config.requests_per_minute) {
            Some(rpm) => {
                let interval = Duration::from_secs_f64(60.0 / rpm);
                let cells = ((rpm / 60.0) * burst.as_secs_f64()).floor().max(1.0) as u32;
                let quota = Quota::with_period(interval)
                    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
                    .allow_burst(NonZeroU32::new(cells).unwrap_or(NonZeroU32::MIN));
                (Some(RateLimiter::direct(quota)), Some(interval))
            }
            None => (None, None),
        };
        Admission {
            requests,
            request_interval,
            clock: DefaultClock::default(),
            buckets: Mutex::new(Buckets {
                total: bucket(config.tokens_per_minute),
                input: bucket(config.input_tokens_per_minute),
                output: bucket(config.output_tokens_per_minute),
            }),
            hold_until: Mutex::new(None),
            queue: Turnstile::default(),
            refunded: tokio::sync::Notify::new(),
        }
    }

    /// Waits until a request of `input` estimated prompt tokens and `output` (`max_tokens`)
    /// may be sent, and reserves its tokens. Requests of different classes take turns by weight.
    pub async fn acquire(&self, share: &Share, input: u64, output: u64) -> Reservation<'_> {
        let _turn = self.queue.turn(share).await;
        let mut taken = [None; 3];
        loop {
            self.wait_for_hold().await;
            let wait = {
                let mut b = lock(&self.buckets);
                let now = Instant::now();
                let mut wait = Duration::ZERO;
                if let Some(t) = b.total.as_mut() {
                    t.refill(now);
                    wait = wait.max(t.wait_for((input + output) as f64));
                }
                if let Some(t) = b.input.as_mut() {
                    t.refill(now);
                    wait = wait.max(t.wait_for(input as f64));
                }
                if let Some(t) = b.output.as_mut() {
                    t.refill(now);
                    wait = wait.max(t.wait_for(output as f64));
                }
                if wait.is_zero() {
                    if let Some(t) = b.total.as_mut() {
                        t.take((input + output) as f64);
                        taken[0] = Some(t.snapshot());
                    }
                    if let Some(t) = b.input.as_mut() {
                        t.take(input as f64);
                        taken[1] = Some(t.snapshot());
                    }
                    if let Some(t) = b.output.as_mut() {
                        t.take(output as f64);
                        taken[2] = Some(t.snapshot());
                    }
                }
                wait
            };
            if wait.is_zero() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.refunded.notified() => {}
            }
        }
        let reservation = Reservation {
            admission: self,
            input,
            output,
            settled: false,
            taken,
        };
        if let Some(limiter) = &self.requests {
            while let Err(not_until) = limiter.check() {
                tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
            }
        }
        // A 429 may have set a deadline while this request waited for its cell.
        self.wait_for_hold().await;
        reservation
    }

    async fn wait_for_hold(&self) {
        loop {
            let until = *lock(&self.hold_until);
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => return,
            }
        }
    }

    /// No request of this account may be sent before `now + after`.
    pub fn hold(&self, after: Duration) {
        let until = Instant::now() + after;
        let mut h = lock(&self.hold_until);
        if h.is_none_or(|t| t < until) {
            *h = Some(until);
        }
    }

    /// The pending `Retry-After` deadline, if any.
    pub fn held_until(&self) -> Option<Instant> {
        (*lock(&self.hold_until)).filter(|t| *t > Instant::now())
    }

    fn settle(&self, reserved_in: u64, reserved_out: u64, used_in: u64, used_out: u64) {
        let mut b = lock(&self.buckets);
        let now = Instant::now();
        let d_in = reserved_in as f64 - used_in as f64;
        let d_out = reserved_out as f64 - used_out as f64;
        if let Some(t) = b.total.as_mut() {
            t.refill(now);
            t.adjust(d_in + d_out);
        }
        if let Some(t) = b.input.as_mut() {
            t.refill(now);
            t.adjust(d_in);
        }
        if let Some(t) = b.output.as_mut() {
            t.refill(now);
            t.adjust(d_out);
        }
        drop(b);
        if used_in < reserved_in || used_out < reserved_out {
            self.refunded.notify_one();
        }
    }

    /// Tokens available now in the output bucket (tests and diagnostics).
    pub fn output_available(&self) -> Option<f64> {
        lock(&self.buckets)
            .output
            .as_mut()
            .map(|b| b.available(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::config::ProviderApi;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn provider() -> ProviderConfig {
        ProviderConfig {
            api: ProviderApi::Anthropic,
            base_url: "http://127.0.0.1:1".into(),
            api_key: None,
            timeout_ms: 1_000,
            requests_per_minute: None,
            tokens_per_minute: None,
            input_tokens_per_minute: None,
            output_tokens_per_minute: Some(60_000),
            share: 1.0,
            burst_ms: 1_000,
            headers: BTreeMap::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_request_is_admitted_before_a_retry_after_deadline() {
        let a = Admission::new(&provider());
        let start = Instant::now();
        a.hold(Duration::from_secs(7));
        let r = a.acquire(&Share::default(), 10, 10).await;
        assert!(Instant::now() - start >= Duration::from_secs(7));
        r.settle(10, 10);
        // A shorter Retry-After never shortens a pending deadline.
        a.hold(Duration::from_secs(5));
        a.hold(Duration::from_secs(1));
        let t = Instant::now();
        drop(a.acquire(&Share::default(), 1, 1).await);
        assert!(Instant::now() - t >= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_source_is_admitted_within_a_turn_of_a_spikes_queue() {
        // 60,000 output tokens a minute and requests that use 1,000: one a second.
        for fair in [true, false] {
            let a = Arc::new(Admission::new(&provider()));
            let class = |c: &str| Share {
                class: Arc::from(if fair { c } else { "" }),
                weight: 1,
            };
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            for i in 0..100 {
                let (a, tx, spike) = (a.clone(), tx.clone(), class("spike"));
                tokio::spawn(async move {
                    a.acquire(&spike, 0, 1_000).await.settle(0, 1_000);
                    tx.send(format!("spike{i}")).unwrap();
                });
            }
            // The first is admitted at once, the second holds the turn, 98 wait behind it.
            while a.queue.waiting() < 98 {
                tokio::task::yield_now().await;
            }
            let (a2, tx2, steady) = (a.clone(), tx.clone(), class("steady"));
            tokio::spawn(async move {
                a2.acquire(&steady, 0, 1_000).await.settle(0, 1_000);
                tx2.send("steady".into()).unwrap();
            });
            drop(tx);
            let mut order = Vec::new();
            while let Some(who) = rx.recv().await {
                order.push(who);
            }
            let at = order.iter().position(|w| w == "steady").unwrap();
            if fair {
                // After the one admitted at once, the one holding the turn, and at most one
                // more turn of the spike's.
                assert!(at <= 3, "admitted after {at} others");
            } else {
                assert_eq!(at, 100, "first come, first served without classes");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_output_reservation_is_settled_against_actual_usage() {
        // 60,000 output tokens per minute = 1,000 per second; the burst holds 1,000.
        let a = Admission::new(&provider());
        let r = a.acquire(&Share::default(), 50, 800).await;
        assert_eq!(a.output_available().unwrap().round(), 200.0);
        // The answer used 100 of the 800 reserved: 700 come back.
        r.settle(50, 100);
        assert_eq!(a.output_available().unwrap().round(), 900.0);
        // An error without usage refunds the whole output reservation.
        let r = a.acquire(&Share::default(), 50, 600).await;
        assert_eq!(a.output_available().unwrap().round(), 300.0);
        drop(r);
        assert_eq!(a.output_available().unwrap().round(), 900.0);
        // Usage above the estimate is charged: the bucket goes below what was reserved.
        let r = a.acquire(&Share::default(), 50, 100).await;
        r.settle(50, 150);
        assert_eq!(a.output_available().unwrap().round(), 750.0);
    }

    #[tokio::test(start_paused = true)]
    async fn token_limit_paces_requests_and_refunds_raise_throughput() {
        let a = Admission::new(&provider());
        let start = Instant::now();
        // Answers that use all 1,000 reserved tokens need a full second of refill each.
        for _ in 0..3 {
            a.acquire(&Share::default(), 0, 1_000)
                .await
                .settle(0, 1_000);
        }
        let no_refund = Instant::now() - start;
        assert!(no_refund >= Duration::from_millis(1_990), "{no_refund:?}");
        // Answers that use 100 of 1,000: after one second to refill the bucket, each refund
        // of 900 leaves only 100 to wait for (0.1 s) instead of a whole second.
        let start = Instant::now();
        for _ in 0..10 {
            a.acquire(&Share::default(), 0, 1_000).await.settle(0, 100);
        }
        let refunded = Instant::now() - start;
        assert!(refunded <= Duration::from_millis(1_950), "{refunded:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_wakes_the_waiting_request_at_once() {
        let a = std::sync::Arc::new(Admission::new(&provider()));
        let first = a.acquire(&Share::default(), 0, 1_000).await; // the bucket is empty now
        let start = Instant::now();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { drop(a.acquire(&Share::default(), 0, 1_000).await) })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // 100 refilled + 900 refunded: the waiter goes now, not after the full second it
        // computed before the refund.
        first.settle(0, 100);
        waiter.await.unwrap();
        let waited = Instant::now() - start;
        assert!(waited < Duration::from_millis(150), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn headers_charge_what_others_used_once_and_ignore_the_refill_since() {
        let a = Admission::new(&provider());
        let r1 = a.acquire(&Share::default(), 0, 300).await; // 700 left here
        let r2 = a.acquire(&Share::default(), 0, 300).await; // 400 left here
                                                             // The answers arrive 200 ms later. The provider had 400 left when it admitted the
                                                             // first (another replica used 300) and 100 after the second: the same 300.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let h = |left| RateHeaders {
            remaining_output_tokens: Some(left),
            ..RateHeaders::default()
        };
        r1.observe(&h(400));
        r2.observe(&h(100));
        r1.settle(0, 300);
        r2.settle(0, 300);
        // 400 - 300 charged once + 200 refilled: the refill since is not mistaken for use,
        // and the second answer does not charge the same 300 again.
        assert_eq!(a.output_available().unwrap().round(), 300.0);
        // An answer that saw more than this bucket had changes nothing.
        let r3 = a.acquire(&Share::default(), 0, 100).await;
        r3.observe(&h(1_000));
        r3.settle(0, 100);
        assert_eq!(a.output_available().unwrap().round(), 200.0);
    }
}

//! Circuit breaker per provider account: closed, open, half-open.
//!
//! * **Closed**: requests flow. It opens when, among the calls of the last `window_ms`, at
//!   least `failure_threshold` failed (5xx, 529, timeouts, connection errors, malformed
//!   answers) and failures are at least `failure_ratio` of them, so a busy pipeline with a
//!   trickle of errors does not stop. Rate limits are flow control and deterministic errors say
//!   nothing about the provider's health: neither counts.
//! * **Open**: no request for `open_ms`. `insufficient_quota` and auth failures open it at once.
//! * **Half-open**: a single probe. Its success closes the breaker; its failure opens it again.
//!
//! Every transition notifies the processor's [`Gate`], which pauses consumption while the
//! providers a step can use are all open, and wakes tasks waiting in [`Breaker::subscribe`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::llm::config::BreakerConfig;
use crate::processor::gate::Gate;
use crate::telemetry::Metrics;

/// Observable breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Requests flow.
    Closed,
    /// One probe may go.
    HalfOpen,
    /// No requests.
    Open,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

#[derive(Debug)]
enum Phase {
    /// Outcomes of the calls in the window: (when, failed).
    Closed {
        calls: VecDeque<(Instant, bool)>,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        probing: bool,
    },
}

/// The breaker of one provider.
pub struct Breaker {
    provider: String,
    config: BreakerConfig,
    phase: Mutex<Phase>,
    changed: watch::Sender<u64>,
    gate: Gate,
    metrics: Arc<Metrics>,
}

/// Leave to send one request. Report how it went; dropping it unreported (the request was
/// cancelled) changes nothing except freeing the half-open probe slot.
pub struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    reported: bool,
}

impl Permit {
    /// The provider answered (successfully or with a deterministic error): it is healthy.
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.on_success();
    }

    /// A transient failure.
    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.on_failure(self.probe);
    }

    /// The account is unusable until a human acts: open now.
    pub fn trip(mut self) {
        self.reported = true;
        self.breaker.open();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            self.breaker.release_probe();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Breaker {
    /// A closed breaker for `provider`.
    pub fn new(
        provider: &str,
        config: BreakerConfig,
        gate: Gate,
        metrics: Arc<Metrics>,
    ) -> Arc<Breaker> {
        metrics
            .llm
            .breaker_state
            .with_label_values(&[provider])
            .set(0);
        Arc::new(Breaker {
            provider: provider.to_string(),
            config,
            phase: Mutex::new(Phase::Closed {
                calls: VecDeque::new(),
            }),
            changed: watch::Sender::new(0),
            gate,
            metrics,
        })
    }

    /// The provider's name.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Current state (an expired open period reads as half-open).
    pub fn state(&self) -> State {
        match &*lock(&self.phase) {
            Phase::Closed { .. } => State::Closed,
            Phase::Open { until } if *until > Instant::now() => State::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// Whether a request could get a permit now.
    pub fn available(&self) -> bool {
        match &*lock(&self.phase) {
            Phase::Closed { .. } => true,
            Phase::Open { until } => *until <= Instant::now(),
            Phase::HalfOpen { probing } => !probing,
        }
    }

    /// Whether the breaker is open (its open period has not run out).
    pub fn is_open(&self) -> bool {
        self.state() == State::Open
    }

    /// A receiver that changes on every transition and probe release.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Leave to send a request, or `None` while open or while the half-open probe is out.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let probe = {
            let mut phase = lock(&self.phase);
            match &mut *phase {
                Phase::Closed { .. } => false,
                Phase::Open { until } if *until > Instant::now() => return None,
                Phase::Open { .. } | Phase::HalfOpen { probing: false } => {
                    *phase = Phase::HalfOpen { probing: true };
                    true
                }
                Phase::HalfOpen { probing: true } => return None,
            }
        };
        if probe {
            self.announce(State::HalfOpen);
        }
        Some(Permit {
            breaker: self.clone(),
            probe,
            reported: false,
        })
    }

    fn on_success(self: &Arc<Self>) {
        let closed_now = {
            let mut phase = lock(&self.phase);
            match &mut *phase {
                Phase::Closed { calls } => {
                    self.record(calls, false);
                    false
                }
                _ => {
                    *phase = Phase::Closed {
                        calls: VecDeque::new(),
                    };
                    true
                }
            }
        };
        if closed_now {
            tracing::info!(provider = %self.provider, "breaker closed: provider recovered");
            self.announce(State::Closed);
        }
    }

    fn on_failure(self: &Arc<Self>, probe: bool) {
        let open = {
            let mut phase = lock(&self.phase);
            match &mut *phase {
                Phase::Closed { calls } => {
                    self.record(calls, true);
                    let failures = calls.iter().filter(|(_, failed)| *failed).count();
                    failures >= self.config.failure_threshold as usize
                        && failures as f64 >= self.config.failure_ratio * calls.len() as f64
                }
                Phase::HalfOpen { .. } => probe,
                Phase::Open { .. } => false,
            }
        };
        if open {
            self.open();
        }
    }

    /// Adds an outcome to the window, forgetting calls older than `window_ms` (and beyond a
    /// bounded count, so memory stays flat under any load).
    fn record(&self, calls: &mut VecDeque<(Instant, bool)>, failed: bool) {
        let now = Instant::now();
        let window = Duration::from_millis(self.config.window_ms);
        while calls
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > window)
            || calls.len() >= 10_000
        {
            calls.pop_front();
        }
        calls.push_back((now, failed));
    }

    /// Opens the breaker for `open_ms` (again, if it was open).
    fn open(self: &Arc<Self>) {
        let until = Instant::now() + Duration::from_millis(self.config.open_ms);
        *lock(&self.phase) = Phase::Open { until };
        tracing::warn!(
            provider = %self.provider,
            open_ms = self.config.open_ms,
            "breaker opened: no requests to this provider until a probe succeeds"
        );
        self.announce(State::Open);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let breaker = self.clone();
            handle.spawn(async move {
                tokio::time::sleep_until(until).await;
                breaker.expire(until);
            });
        }
    }

    /// The open period ending at `until` is over: let a probe through.
    fn expire(self: &Arc<Self>, until: Instant) {
        let expired = {
            let mut phase = lock(&self.phase);
            match &*phase {
                Phase::Open { until: u } if *u == until => {
                    *phase = Phase::HalfOpen { probing: false };
                    true
                }
                _ => false,
            }
        };
        if expired {
            tracing::info!(provider = %self.provider, "breaker half-open: one probe may go");
            self.announce(State::HalfOpen);
        }
    }

    fn release_probe(self: &Arc<Self>) {
        {
            let mut phase = lock(&self.phase);
            if let Phase::HalfOpen { probing } = &mut *phase {
                *probing = false;
            }
        }
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn announce(&self, state: State) {
        let m = &self.metrics.llm;
        m.breaker_state
            .with_label_values(&[&self.provider])
            .set(state.gauge());
        m.breaker_transitions
            .with_label_values(&[&self.provider, state.as_str()])
            .inc();
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        self.gate.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Arc<Breaker> {
        Breaker::new(
            "p",
            BreakerConfig {
                failure_threshold: 3,
                failure_ratio: 0.5,
                window_ms: 60_000,
                open_ms: 300_000,
            },
            Gate::new(),
            Metrics::new(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_enough_failures_then_probes_once_and_closes() {
        let b = breaker();
        for _ in 0..4 {
            b.try_acquire().unwrap().success();
        }
        for _ in 0..3 {
            b.try_acquire().unwrap().failure();
        }
        // 3 failures of 7 calls: under the 50 % ratio, so a trickle of errors is tolerated.
        assert_eq!(b.state(), State::Closed);
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), State::Open);
        assert!(b.try_acquire().is_none());
        tokio::time::sleep(Duration::from_secs(299)).await;
        assert!(b.try_acquire().is_none());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(b.state(), State::HalfOpen);
        let probe = b.try_acquire().expect("one probe");
        assert!(b.try_acquire().is_none(), "only one probe at a time");
        probe.success();
        assert_eq!(b.state(), State::Closed);
        assert!(b.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_a_cancelled_probe_frees_the_slot() {
        let b = breaker();
        b.try_acquire().unwrap().trip();
        assert_eq!(b.state(), State::Open);
        tokio::time::sleep(Duration::from_secs(301)).await;
        drop(b.try_acquire().expect("probe"));
        let probe = b.try_acquire().expect("the slot is free again");
        probe.failure();
        assert_eq!(b.state(), State::Open);
        assert!(b.try_acquire().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_fall_out_of_the_window() {
        let b = breaker();
        for _ in 0..2 {
            b.try_acquire().unwrap().failure();
        }
        tokio::time::sleep(Duration::from_secs(61)).await;
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), State::Closed);
    }
}

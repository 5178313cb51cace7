//! Crash points for the exactly-once tests: `SPILLWAY_FAULT=<point>:<step>:<n>` makes the
//! process SIGKILL itself the `n`-th time an event passes `<point>` of step `<step>`;
//! `SPILLWAY_FAULT=<point>:<step>:<n>:stop` makes it SIGSTOP itself there instead (a stalled
//! instance that its group gives up on, then wakes up as a zombie on SIGCONT). Points:
//!
//! - `before_step`: before the step's first attempt (e.g. before the LLM call);
//! - `after_step`: the step succeeded, its journal entry is not written yet;
//! - `after_journal`: the entry is durable, the next step has not started;
//! - `after_done`: the event's final entry (`done`) is durable, its offset is not stored;
//! - `before_commit`: a transaction's records (a Kafka sink's result and its journal entry)
//!   are written, the transaction is not committed.
//!
//! `SPILLWAY_FAULT=<point>:<step>:<n>:panic` makes the record's task panic there instead, outside
//! the step's own panic guard (a bug in Spillway itself, as the processor sees it); `n = 0`
//! panics every time. Only for the points on a record's task (`before_step`, `after_step`,
//! `after_journal`, `after_done`); `before_commit` runs in a transaction lane's task.
//!
//! `SPILLWAY_FAULT=journal_write:<step>:<n>:fatal` instead raises a fatal librdkafka error on
//! the journal producer before the `n`-th entry write after `<step>` ([`fatal_at`]).
//!
//! Testing only. Built only with the `fault-injection` feature, which the tests turn on and
//! release builds leave out: without it [`point`] does nothing, `fatal_at` does not exist, and
//! `SPILLWAY_FAULT` is ignored. With it and unset, a check is one relaxed atomic load.

#[cfg(not(feature = "fault-injection"))]
mod disabled {
    /// Does nothing: this build has no fault injection.
    #[inline(always)]
    pub fn point(_point: &str, _step: &str) {}

    /// The wall clock as budgets see it is not shifted in this build.
    #[inline(always)]
    pub fn clock_offset_ms() -> i64 {
        0
    }
}
#[cfg(not(feature = "fault-injection"))]
pub use disabled::*;

#[cfg(feature = "fault-injection")]
pub use enabled::*;

#[cfg(feature = "fault-injection")]
mod enabled {

    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    use std::sync::OnceLock;

    static CLOCK_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

    /// How far the clock budgets run on is shifted from the wall clock (a test's controllable
    /// clock: it moves budgets to their period's roll-over without waiting a day).
    pub fn clock_offset_ms() -> i64 {
        CLOCK_OFFSET_MS.load(Ordering::Relaxed)
    }

    /// Shifts the clock budgets run on by `ms` from the wall clock. Testing only.
    pub fn set_clock_offset_ms(ms: i64) {
        CLOCK_OFFSET_MS.store(ms, Ordering::Relaxed);
    }

    struct Fault {
        point: String,
        step: String,
        at: u64,
        mode: Mode,
        hits: AtomicU64,
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Mode {
        Kill,
        /// SIGSTOP instead of SIGKILL.
        Stop,
        /// The caller raises a fatal librdkafka error on its producer.
        Fatal,
        /// A panic on the calling task.
        Panic,
    }

    fn fault() -> Option<&'static Fault> {
        static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
        FAULT
            .get_or_init(|| {
                let spec = std::env::var("SPILLWAY_FAULT").ok()?;
                let mut parts = spec.splitn(4, ':');
                let (point, step, at) = (parts.next()?, parts.next()?, parts.next()?);
                let at = at.parse().ok()?;
                let mode = match parts.next() {
                    None => Mode::Kill,
                    Some("stop") => Mode::Stop,
                    Some("fatal") => Mode::Fatal,
                    Some("panic") => Mode::Panic,
                    Some(_) => return None,
                };
                tracing::warn!(%spec, "fault injection armed (testing only)");
                Some(Fault {
                    point: point.to_string(),
                    step: step.to_string(),
                    at,
                    mode,
                    hits: AtomicU64::new(0),
                })
            })
            .as_ref()
    }

    /// Passes crash point `point` of `step`; kills the process if the armed fault says so.
    pub fn point(point: &str, step: &str) {
        let Some(f) = fault() else { return };
        if f.point != point || f.step != step || f.mode == Mode::Fatal {
            return;
        }
        let every_time = f.mode == Mode::Panic && f.at == 0;
        if every_time || f.hits.fetch_add(1, Ordering::Relaxed) + 1 == f.at {
            if f.mode == Mode::Panic {
                panic!("fault point {point}:{step} reached; panicking (fault injection)");
            }
            let (name, signal) = if f.mode == Mode::Stop {
                ("SIGSTOP", libc::SIGSTOP)
            } else {
                ("SIGKILL", libc::SIGKILL)
            };
            eprintln!("fault point {point}:{step} reached; {name}");
            // raise(3), not kill(getpid()): a signal sent to the process may be taken by another
            // thread, and this one runs on until that thread stops the group (a SIGSTOP at
            // `before_commit` was seen to let the commit through). Sent to this thread, it acts
            // before this thread returns to the step.
            // SAFETY: raise(3) has no memory-safety preconditions.
            unsafe {
                libc::raise(signal);
            }
        }
    }

    /// Whether `SPILLWAY_FAULT=<point>:<step>:<n>:fatal` asks for a fatal producer error here, at
    /// the `n`th time (the caller raises it with `rd_kafka_test_fatal_error`).
    pub fn fatal_at(point: &str, step: &str) -> bool {
        let Some(f) = fault() else { return false };
        if f.point != point || f.step != step || f.mode != Mode::Fatal {
            return false;
        }
        let hit = f.hits.fetch_add(1, Ordering::Relaxed) + 1 == f.at;
        if hit {
            eprintln!("fault point {point}:{step} reached; raising a fatal producer error");
        }
        hit
    }
}

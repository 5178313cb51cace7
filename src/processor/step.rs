//! The seam where per-event work plugs in: a chain of [`Step`]s.
//!
//! A step gets the decoded event and the record it came from, may add outputs for the steps
//! after it, and answers with an error that says what to do: retry (transient), dead-letter
//! (deterministic) or skip. The processor owns retries, backoff, the DLQ and offsets; a step
//! never retries on its own, so retry loops do not multiply.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::OwnedMessage;
use serde_json::{Map, Value as Json};

use crate::codec::Event;

/// A boxed future, so steps can be stored as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the processor should do after a step error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Transient: retry with backoff, no sooner than `after` if the callee said so.
    Retry {
        /// A server-given earliest retry time (`Retry-After`).
        after: Option<Duration>,
    },
    /// A dependency is throttling or down (a provider's breaker is open, a rate limit said
    /// wait): wait no less than `after`, then until [`Step::ready`], and run the step again.
    /// This is flow control, not a failure: it does not use up an attempt, and the record is
    /// never dead-lettered for it.
    Defer {
        /// A server-given earliest retry time (`Retry-After`).
        after: Option<Duration>,
    },
    /// Deterministic: retrying cannot help; write the record to the DLQ and move on.
    DeadLetter,
    /// Nothing to do for this event (a duplicate, a filtered event): finish it as skipped.
    Skip,
    /// The step's client failed for good (a fatal producer error): no event can succeed in
    /// this process. The event stays unfinished, liveness fails and the processor stops.
    Fatal,
}

/// A classified step error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct StepError {
    /// What to do about it.
    pub action: Action,
    /// Stable, low-cardinality code for metrics and the `dlq.reason` header.
    pub code: &'static str,
    /// Human-readable detail for logs and `__connect.errors.exception.message`. Never secrets,
    /// prompts or payloads.
    pub message: String,
}

impl StepError {
    /// A transient error, retried with backoff.
    pub fn transient(code: &'static str, message: impl Into<String>) -> Self {
        StepError {
            action: Action::Retry { after: None },
            code,
            message: message.into(),
        }
    }

    /// A transient error with a server-given earliest retry time.
    pub fn retry_after(code: &'static str, message: impl Into<String>, after: Duration) -> Self {
        StepError {
            action: Action::Retry { after: Some(after) },
            code,
            message: message.into(),
        }
    }

    /// The step's client failed for good; the processor stops with this event unfinished.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        StepError {
            action: Action::Fatal,
            code,
            message: message.into(),
        }
    }

    /// The step's dependency cannot take work now; wait for it without using an attempt.
    pub fn defer(code: &'static str, message: impl Into<String>, after: Option<Duration>) -> Self {
        StepError {
            action: Action::Defer { after },
            code,
            message: message.into(),
        }
    }

    /// A deterministic error: the record goes to the DLQ.
    pub fn deterministic(code: &'static str, message: impl Into<String>) -> Self {
        StepError {
            action: Action::DeadLetter,
            code,
            message: message.into(),
        }
    }

    /// The event needs no processing.
    pub fn skip(code: &'static str, message: impl Into<String>) -> Self {
        StepError {
            action: Action::Skip,
            code,
            message: message.into(),
        }
    }
}

/// Everything a step sees about the event it works on.
pub struct EventContext {
    /// The Kafka record, byte for byte.
    pub record: Arc<OwnedMessage>,
    /// The decoded event.
    pub event: Event,
    /// The event's dedup key (`<source>|<id>` with a journal, else the event id): the
    /// `Idempotency-Key` and `webhook-id` sinks send, so receivers can drop repeats.
    pub dedup_key: String,
    /// Results of earlier steps, by step name, for the steps after them.
    pub outputs: Map<String, Json>,
    /// 1-based attempt number of the current step.
    pub attempt: u32,
    /// The journal holds this step's intent from an earlier run: it may already have had its
    /// effect (a crash after the post, before the result was recorded). Steps that can look
    /// their effect up ([`Step::records_intent`]) check before acting again.
    pub intent_recorded: bool,
    /// What the event has cost so far across steps and attempts (LLM tokens and USD).
    pub spend: Spend,
    /// Kafka records a step hands back instead of producing them itself (the result-topic
    /// sink): the worker writes them in one transaction with the step's journal entry.
    pub staged: Vec<crate::journal::txn::OutRecord>,
}

/// Tokens and money an event has spent, for the per-event histograms.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spend {
    /// Paid provider calls made for this event.
    pub calls: u32,
    /// Prompt tokens the providers counted.
    pub input_tokens: u64,
    /// Output tokens the providers counted.
    pub output_tokens: u64,
    /// Cost from the configured price table, in USD.
    pub cost_usd: f64,
}

/// One unit of per-event work.
pub trait Step: Send + Sync + 'static {
    /// Bounded name for metrics labels and DLQ headers.
    fn name(&self) -> &str;

    /// Runs the step once. Retries are the processor's job, not the step's.
    fn run<'a>(&'a self, ctx: &'a mut EventContext) -> BoxFuture<'a, Result<(), StepError>>;

    /// Whether the worker should record this step's intent in the journal before its first
    /// attempt, so a later run knows the effect may have happened and can reconcile.
    fn records_intent(&self) -> bool {
        false
    }

    /// Resolves when the step's dependencies can take work again. The worker awaits it after
    /// a [`Action::Defer`]. Steps without such a dependency are always ready.
    fn ready(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// The ordered chain of steps every event goes through.
pub type Pipeline = Arc<[Arc<dyn Step>]>;

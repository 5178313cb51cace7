//! The step contract: the seam where per-event work plugs in, as a chain of [`Step`]s.
//!
//! A step reads the decoded event, the record it came from and the earlier steps' outputs
//! ([`EventContext`], read-only), and returns what it produced ([`StepOutput`]: its value, the
//! Kafka records it wants written in a transaction, what it spent), or an error that says what
//! to do: retry (transient), defer, dead-letter (deterministic) or skip. The worker records the
//! output under the step's name. The processor owns retries, backoff, the DLQ and offsets; a
//! step never retries on its own, so retry loops do not multiply.
//!
//! This module depends on nothing above it (only `codec`'s decoded event and rdkafka's record
//! types): the processor, the journal and every step depend on it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use serde_json::{Map, Value as Json};

use crate::codec::Event;
use crate::fair::Share;

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
    /// The event may not run yet (a spend budget is exhausted): wait `after`, without holding
    /// an in-flight slot, and run the step again. Like `Defer`, it uses up no attempt and
    /// never dead-letters the record.
    Wait {
        /// How long to wait before trying again.
        after: Duration,
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
    /// What the failed attempt still cost (a paid LLM answer that failed validation).
    pub spend: Spend,
}

impl StepError {
    /// A transient error, retried with backoff.
    pub fn transient(code: &'static str, message: impl Into<String>) -> Self {
        StepError {
            action: Action::Retry { after: None },
            code,
            message: message.into(),
            spend: Spend::default(),
        }
    }

    /// A transient error with a server-given earliest retry time.
    pub fn retry_after(code: &'static str, message: impl Into<String>, after: Duration) -> Self {
        StepError {
            action: Action::Retry { after: Some(after) },
            code,
            message: message.into(),
            spend: Spend::default(),
        }
    }

    /// The step's client failed for good; the processor stops with this event unfinished.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        StepError {
            action: Action::Fatal,
            code,
            message: message.into(),
            spend: Spend::default(),
        }
    }

    /// The step's dependency cannot take work now; wait for it without using an attempt.
    pub fn defer(code: &'static str, message: impl Into<String>, after: Option<Duration>) -> Self {
        StepError {
            action: Action::Defer { after },
            code,
            message: message.into(),
            spend: Spend::default(),
        }
    }

    /// The event may not run before `after` (its budget is spent); it waits without holding an
    /// in-flight slot.
    pub fn wait(code: &'static str, message: impl Into<String>, after: Duration) -> Self {
        StepError {
            action: Action::Wait { after },
            code,
            message: message.into(),
            spend: Spend::default(),
        }
    }

    /// A deterministic error: the record goes to the DLQ.
    pub fn deterministic(code: &'static str, message: impl Into<String>) -> Self {
        StepError {
            action: Action::DeadLetter,
            code,
            message: message.into(),
            spend: Spend::default(),
        }
    }

    /// The same error, carrying what its attempt cost.
    pub fn with_spend(mut self, spend: Spend) -> Self {
        self.spend = spend;
        self
    }

    /// The event needs no processing.
    pub fn skip(code: &'static str, message: impl Into<String>) -> Self {
        StepError {
            action: Action::Skip,
            code,
            message: message.into(),
            spend: Spend::default(),
        }
    }
}

/// Everything a step sees about the event it works on. Steps only read it; what they produce
/// goes back in their [`StepOutput`].
pub struct EventContext {
    /// The Kafka record, byte for byte.
    pub record: Arc<OwnedMessage>,
    /// The decoded event (shared: templates and conditions read it without copying).
    pub event: Arc<Event>,
    /// The event's dedup key (`<source>|<id>` with a journal, else the event id): the
    /// `Idempotency-Key` and `webhook-id` sinks send, so receivers can drop repeats.
    pub dedup_key: String,
    /// Results of earlier steps, by step name, for the steps after them (shared: templates and
    /// conditions read them without copying; the worker adds to it with `Arc::make_mut`).
    pub outputs: Arc<Map<String, Json>>,
    /// The event's class and weight in the fair sharing of each LLM account's admission.
    pub share: Share,
    /// The name of the pipeline running the event (`default` for top-level `[[steps]]`).
    pub pipeline: Arc<str>,
}

/// Which attempt of a step this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// 1-based attempt number of the current step.
    pub number: u32,
    /// The journal holds this step's intent from an earlier run: it may already have had its
    /// effect (a crash after the post, before the result was recorded). Steps that can look
    /// their effect up ([`Step::records_intent`]) check before acting again.
    pub intent_recorded: bool,
}

impl Attempt {
    /// The first attempt, with no intent from an earlier run.
    pub fn first() -> Self {
        Attempt {
            number: 1,
            intent_recorded: false,
        }
    }

    /// Whether the effect may already have happened: a retry, or an intent from an earlier
    /// run.
    pub fn may_have_acted(&self) -> bool {
        self.number > 1 || self.intent_recorded
    }
}

/// What a step produced.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// The step's result for the steps after it and for the journal, recorded under the step's
    /// name; `None` when it has nothing to pass on.
    pub value: Option<Json>,
    /// Kafka records the step hands back instead of producing them itself (the result-topic
    /// sink): the worker writes them in one transaction with the step's journal entry.
    pub staged: Vec<OutRecord>,
    /// What the attempt cost (LLM tokens and USD).
    pub spend: Spend,
}

impl StepOutput {
    /// A step that produced nothing to pass on (most sinks).
    pub fn none() -> Self {
        StepOutput::default()
    }

    /// A step whose result later steps and the journal see.
    pub fn value(value: Json) -> Self {
        StepOutput {
            value: Some(value),
            ..StepOutput::default()
        }
    }

    /// The same output, carrying what it cost.
    pub fn with_spend(mut self, spend: Spend) -> Self {
        self.spend = spend;
        self
    }
}

/// One Kafka record a step wants written in a transaction with its journal entry.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// Target topic.
    pub topic: String,
    /// Target partition; `None` lets the partitioner choose by key.
    pub partition: Option<i32>,
    /// Record key.
    pub key: String,
    /// Record value.
    pub payload: Vec<u8>,
    /// Record headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutRecord {
    /// The record for a producer's `send`.
    pub fn to_future_record(&self) -> FutureRecord<'_, String, Vec<u8>> {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (k, v) in &self.headers {
            headers = headers.insert(rdkafka::message::Header {
                key: k,
                value: Some(v),
            });
        }
        let record = FutureRecord::to(&self.topic)
            .key(&self.key)
            .payload(&self.payload)
            .headers(headers);
        match self.partition {
            Some(p) => record.partition(p),
            None => record,
        }
    }
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

impl std::ops::AddAssign for Spend {
    fn add_assign(&mut self, other: Spend) {
        self.calls += other.calls;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cost_usd += other.cost_usd;
    }
}

/// One unit of per-event work.
pub trait Step: Send + Sync + 'static {
    /// Bounded name for metrics labels and DLQ headers.
    fn name(&self) -> &str;

    /// Runs the step once and returns what it produced. Retries are the processor's job, not
    /// the step's.
    fn run<'a>(
        &'a self,
        ctx: &'a EventContext,
        attempt: Attempt,
    ) -> BoxFuture<'a, Result<StepOutput, StepError>>;

    /// Whether the worker should record this step's intent in the journal before its first
    /// attempt, so a later run knows the effect may have happened and can reconcile.
    fn records_intent(&self) -> bool {
        false
    }

    /// Whether the step hands its Kafka records back in [`StepOutput::staged`], to be written in
    /// a transaction with its journal entry (the journal then opens transactional lanes).
    fn stages_records(&self) -> bool {
        false
    }

    /// The Kafka topics the step may write to (created with the others in development,
    /// `kafka.create_topics_partitions`).
    fn output_topics(&self) -> Vec<String> {
        Vec::new()
    }

    /// Whether the step runs for this event (its `when` condition, its route). `Ok(false)`:
    /// the worker records the step as skipped (`{"skipped": true}`) in the journal, so a
    /// redelivered event decides the same way; an error is deterministic (the condition
    /// cannot be evaluated for this event). Steps without a condition always apply.
    fn applies(&self, _ctx: &EventContext) -> Result<bool, StepError> {
        Ok(true)
    }

    /// Resolves when the step's dependencies can take work again. The worker awaits it after
    /// a [`Action::Defer`]. Steps without such a dependency are always ready.
    fn ready(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// The ordered chain of steps every event goes through.
pub type Pipeline = Arc<[Arc<dyn Step>]>;

/// One pipeline, built: the events it takes (by input topic and CloudEvents type) and the
/// steps it runs for them, with its own journal TTLs.
pub struct BuiltPipeline {
    /// The pipeline's name: its `pipeline` metrics label and its journal namespace.
    pub name: Arc<str>,
    /// Input topics it takes; empty takes every topic.
    pub topics: Vec<String>,
    /// Event types (`ce_type`) it takes; empty takes every type.
    pub types: Vec<String>,
    /// Its chain of steps.
    pub steps: Pipeline,
    /// Journal TTL of its events, in seconds, overriding `journal.ttl_secs`.
    pub ttl_secs: Option<u64>,
    /// Journal TTL by event type, in seconds, overriding every other TTL for that type.
    pub ttl_by_type: std::collections::BTreeMap<String, u64>,
    /// Prefix of its events' dedup keys (`<pipeline>/`): their journal entries, the
    /// idempotency keys its sinks send and its result records' keys, so two pipelines that see
    /// the same event keep separate entries and separate effects. Empty for the single
    /// top-level `[[steps]]` chain.
    pub key_prefix: String,
}

impl BuiltPipeline {
    /// The single chain of a configuration without `[[pipelines]]`: named `default`, takes
    /// every event, journal keys unprefixed.
    pub fn single(steps: Pipeline) -> BuiltPipeline {
        BuiltPipeline {
            name: "default".into(),
            topics: Vec::new(),
            types: Vec::new(),
            steps,
            ttl_secs: None,
            ttl_by_type: Default::default(),
            key_prefix: String::new(),
        }
    }

    /// Whether the pipeline takes an event of `event_type` read from `topic`.
    pub fn takes(&self, topic: &str, event_type: &str) -> bool {
        takes(&self.topics, &self.types, topic, event_type)
    }

    /// The journal TTL of an event of `event_type`: the most specific rule wins, the
    /// pipeline's before `[journal]`'s at the same level. That is this pipeline's TTL for the
    /// type, then `journal.ttl_by_type`'s (`journal_by_type`), then this pipeline's `ttl_secs`,
    /// then `journal.ttl_secs` (`journal_default`).
    pub fn ttl(
        &self,
        event_type: &str,
        journal_by_type: Option<u64>,
        journal_default: u64,
    ) -> Duration {
        let secs = (self.ttl_by_type.get(event_type).copied())
            .or(journal_by_type)
            .or(self.ttl_secs)
            .unwrap_or(journal_default);
        Duration::from_secs(secs)
    }

    /// Every TTL the pipeline sets, in seconds (the journal topic's retention must cover them).
    pub fn ttls_secs(&self) -> impl Iterator<Item = u64> + '_ {
        self.ttl_secs
            .into_iter()
            .chain(self.ttl_by_type.values().copied())
    }
}

/// Whether a pipeline that takes `topics` and `types` (empty: all) takes an event of
/// `event_type` read from `topic`.
pub fn takes(topics: &[String], types: &[String], topic: &str, event_type: &str) -> bool {
    (topics.is_empty() || topics.iter().any(|t| t == topic))
        && (types.is_empty() || types.iter().any(|t| t == event_type))
}

/// Every pipeline of a processor, in configuration order: an event runs the first that takes
/// it.
pub type Pipelines = Arc<[BuiltPipeline]>;

/// The first of `pipelines` that takes an event of `event_type` read from `topic`.
pub fn select<'a>(
    pipelines: &'a [BuiltPipeline],
    topic: &str,
    event_type: &str,
) -> Option<&'a BuiltPipeline> {
    pipelines.iter().find(|r| r.takes(topic, event_type))
}

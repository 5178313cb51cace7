//! The life of one record: decode, run each step with retries, and finish it as succeeded,
//! dead-lettered or skipped. A record that returns from [`Worker::process`] is finished and its
//! offset may be committed; a record whose future is dropped (shutdown deadline, revoke
//! deadline) is not, and will be redelivered.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use rdkafka::message::{Message, OwnedMessage};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::dlq::{DlqWriter, Failure};
use super::retry::backoff;
use crate::codec::{Codec, CodecError};
use crate::fair::Share;
use crate::fault;
use crate::journal::{Begin, Journal, JournalError, Session};
use crate::processor::config::{RetryConfig, Unmatched};
use crate::step::{
    Action, Attempt, BuiltPipeline, EventContext, Pipelines, Spend, StepError, StepOutput,
};
use crate::telemetry::{now_ms, Metrics};

/// How a record finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every step succeeded.
    Succeeded,
    /// Written to the DLQ.
    DeadLettered,
    /// A step (or the codec) said there is nothing to do.
    Skipped,
    /// Not finished: it was waiting for a step's dependency when shutdown began. Its offset is
    /// not committed, so it is delivered again.
    Abandoned,
}

impl Outcome {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Skipped => "skipped",
            Outcome::Abandoned => "abandoned",
        }
    }

    /// Whether the record is done and its offset may be committed.
    pub fn is_finished(self) -> bool {
        self != Outcome::Abandoned
    }
}

/// Shared, immutable machinery every record task uses.
pub struct Worker {
    pub(crate) codec: Codec,
    /// The pipelines, in configuration order: an event runs the first that takes it.
    pub(crate) pipelines: Pipelines,
    /// What happens to an event no pipeline takes.
    pub(crate) unmatched: Unmatched,
    pub(crate) retry: RetryConfig,
    pub(crate) dlq: DlqWriter,
    pub(crate) metrics: Arc<Metrics>,
    /// Cancelled when shutdown begins: records waiting for a dependency give up (unfinished)
    /// instead of holding the drain until its deadline.
    pub(crate) drain: CancellationToken,
    /// Dedup and the step journal, when configured.
    pub(crate) journal: Option<Arc<Journal>>,
    /// Liveness: a step's fatal client error marks it failed (the processor stops).
    pub(crate) health: Arc<crate::telemetry::Health>,
    /// Record tasks that panicked outside a step since the last one that did not.
    pub(crate) consecutive_panics: std::sync::atomic::AtomicU32,
    /// Records waiting on a spent budget, whose in-flight slots the scheduler gives to others.
    pub(crate) parked: Parked,
}

/// Record tasks waiting on a spent budget ([`Action::Wait`]), by fairness class: they hold no
/// in-flight slot, and the scheduler starts no more records of a class that has one waiting
/// (the others' records run in their place) until it stops waiting. Their offsets stay
/// uncommitted, so their partitions pause once their buffers fill.
#[derive(Default)]
pub(crate) struct Parked {
    by_class: std::sync::Mutex<std::collections::HashMap<Arc<str>, usize>>,
    count: std::sync::atomic::AtomicUsize,
    /// Wakes the scheduler when a task parks or wakes.
    pub(crate) changed: tokio::sync::Notify,
}

impl Parked {
    /// Tasks waiting now.
    pub(crate) fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether no task of `class` is waiting.
    pub(crate) fn is_free(&self, class: &str) -> bool {
        !self.lock().contains_key(class)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Arc<str>, usize>> {
        // Plain counts; a panic elsewhere cannot leave them inconsistent.
        self.by_class.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn park<'a>(&'a self, class: &Arc<str>, metrics: &'a Metrics) -> ParkedGuard<'a> {
        *self.lock().entry(class.clone()).or_default() += 1;
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        metrics.budget_waiting.inc();
        self.changed.notify_one();
        ParkedGuard {
            parked: self,
            class: class.clone(),
            metrics,
        }
    }
}

struct ParkedGuard<'a> {
    parked: &'a Parked,
    class: Arc<str>,
    metrics: &'a Metrics,
}

impl Drop for ParkedGuard<'_> {
    fn drop(&mut self) {
        {
            let mut by_class = self.parked.lock();
            if let Some(n) = by_class.get_mut(&self.class) {
                *n -= 1;
                if *n == 0 {
                    by_class.remove(&self.class);
                }
            }
        }
        (self.parked.count).fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.metrics.budget_waiting.dec();
        self.parked.changed.notify_one();
    }
}

/// This many record tasks in a row panicking outside a step is not one bad record but a broken
/// processor: it stops (fatal, exit 1) instead of dead-lettering the whole backlog.
pub const MAX_CONSECUTIVE_PANICS: u32 = 10;

/// The `pipeline` label of records that finished before a pipeline took them (undecodable,
/// taken by no pipeline, panicked).
pub const NO_PIPELINE: &str = "none";

/// Failure bookkeeping across the attempts of one stage.
struct Attempts {
    first_failure_ms: Option<u64>,
}

impl Attempts {
    fn new() -> Self {
        Attempts {
            first_failure_ms: None,
        }
    }

    fn failure(
        &mut self,
        reason: &'static str,
        stage: String,
        class: &'static str,
        message: String,
        attempts: u32,
    ) -> Failure {
        let now = now_ms();
        Failure {
            reason,
            stage,
            class,
            message,
            attempts,
            first_failure_ms: *self.first_failure_ms.get_or_insert(now),
            last_failure_ms: now,
            pipeline: None,
        }
    }
}

/// The text of a panic's payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_string())
}

impl Worker {
    /// Processes one record to completion, whatever panics on the way. A step's panic is a
    /// deterministic failure of that step; a panic anywhere else in the record's task, a bug in
    /// Spillway itself, dead-letters the record as `task_panicked` ([`Worker::after_panic`]).
    /// Either way the record finishes, so its key's next record runs and its partition's
    /// commit moves on, instead of waiting for ever behind it.
    pub async fn process(&self, record: Arc<OwnedMessage>, share: Share) -> Outcome {
        use std::sync::atomic::Ordering;
        let span = tracing::info_span!(
            "event",
            topic = record.topic(),
            partition = record.partition(),
            offset = record.offset(),
            event_id = tracing::field::Empty,
        );
        let run = AssertUnwindSafe(
            self.process_inner(record.clone(), share.clone())
                .instrument(span),
        );
        let (outcome, pipeline) = match run.catch_unwind().await {
            Ok((outcome, pipeline)) => {
                // Only a record that got through counts as not panicking (one abandoned at
                // shutdown or on a fatal error says nothing).
                if outcome.is_finished() && self.consecutive_panics.load(Ordering::Relaxed) != 0 {
                    self.consecutive_panics.store(0, Ordering::Relaxed);
                }
                (outcome, pipeline)
            }
            Err(panic) => (
                self.after_panic(&record, panic_message(&*panic)).await,
                NO_PIPELINE,
            ),
        };
        if !outcome.is_finished() {
            return outcome;
        }
        self.metrics
            .events
            .with_label_values(&[pipeline, record.topic(), outcome.as_str()])
            .inc();
        if let Some(ts) = record.timestamp().to_millis() {
            let age_ms = (now_ms() as i64).saturating_sub(ts).max(0);
            self.metrics
                .end_to_end
                .with_label_values(&[pipeline])
                .observe(age_ms as f64 / 1000.0);
            self.metrics
                .source_end_to_end
                .with_label_values(&[&*self.metrics.source_label(&share.class)])
                .observe(age_ms as f64 / 1000.0);
        }
        outcome
    }

    /// A panic of the record's task outside any step: the record is dead-lettered, unless
    /// this is the [`MAX_CONSECUTIVE_PANICS`]th in a row, which stops the processor (fatal)
    /// and leaves the record unfinished for redelivery once the bug is fixed.
    async fn after_panic(&self, record: &OwnedMessage, panic: String) -> Outcome {
        let in_a_row = self
            .consecutive_panics
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if self.health.is_fatal() {
            return Outcome::Abandoned; // Stopping: redelivered later, not dead-lettered.
        }
        if in_a_row >= MAX_CONSECUTIVE_PANICS {
            self.health.set_fatal(&format!(
                "{in_a_row} records in a row panicked outside a step; the last: {panic}"
            ));
            return Outcome::Abandoned;
        }
        tracing::error!(
            topic = record.topic(),
            partition = record.partition(),
            offset = record.offset(),
            panic = %panic,
            "record task panicked outside a step; dead-lettering the record"
        );
        self.metrics
            .kafka_errors
            .with_label_values(&["task_panicked"])
            .inc();
        let failure = Attempts::new().failure(
            "task_panicked",
            "processor".to_string(),
            "spillway::processor::Worker",
            format!("record task panicked outside a step: {panic}"),
            1,
        );
        self.dead_letter(record, failure).await
    }

    /// Decodes the record, picks its pipeline and runs it; returns how the record finished and
    /// the pipeline that took it.
    async fn process_inner(&self, record: Arc<OwnedMessage>, share: Share) -> (Outcome, &str) {
        if self.health.is_fatal() {
            // The processor is stopping on a fatal client error: start nothing (an LLM call
            // now could not be recorded).
            return (Outcome::Abandoned, NO_PIPELINE);
        }
        let event = match self.decode(&record).await {
            Ok(event) => event,
            Err(outcome) => return (outcome, NO_PIPELINE),
        };
        tracing::Span::current().record("event_id", event.id.as_str());
        let Some(pipeline) =
            crate::step::select(&self.pipelines, record.topic(), &event.event_type)
        else {
            return (self.unmatched(&record, &event).await, NO_PIPELINE);
        };
        // Each pipeline has its own keys: one event seen by two pipelines runs, and acts, in
        // both (its own journal entry, idempotency keys and result key).
        let mut dedup_key = match &self.journal {
            Some(j) => j.key(&event),
            None => event.id.clone(),
        };
        if !pipeline.key_prefix.is_empty() {
            dedup_key.insert_str(0, &pipeline.key_prefix);
        }
        let mut ctx = EventContext {
            record: record.clone(),
            event: event.into(),
            dedup_key,
            outputs: Default::default(),
            share,
            pipeline: pipeline.name.clone(),
        };
        let mut spend = Spend::default();
        let outcome = match self.journal.clone() {
            None => {
                self.run_steps(pipeline, &record, &mut ctx, &mut spend, None)
                    .await
            }
            Some(j) => {
                self.run_journaled(pipeline, &j, &record, &mut ctx, &mut spend)
                    .await
            }
        };
        if spend.calls > 0 {
            let name = [&*pipeline.name];
            self.metrics
                .event_tokens
                .with_label_values(&name)
                .observe((spend.input_tokens + spend.output_tokens) as f64);
            self.metrics
                .event_cost
                .with_label_values(&name)
                .observe(spend.cost_usd);
        }
        (outcome, &pipeline.name)
    }

    /// An event no pipeline takes: counted, then skipped or dead-lettered as configured.
    async fn unmatched(&self, record: &OwnedMessage, event: &crate::codec::Event) -> Outcome {
        self.metrics
            .unmatched
            .with_label_values(&[record.topic()])
            .inc();
        match self.unmatched {
            Unmatched::Skip => {
                tracing::debug!(event_type = %event.event_type, "no pipeline takes the event; skipped");
                Outcome::Skipped
            }
            Unmatched::DeadLetter => {
                let failure = Attempts::new().failure(
                    "no_pipeline",
                    "processor".to_string(),
                    "spillway::processor::Worker",
                    format!(
                        "no pipeline takes events of type `{}` from topic `{}`",
                        event.event_type,
                        record.topic()
                    ),
                    1,
                );
                self.dead_letter(record, failure).await
            }
        }
    }

    /// Runs the steps the journal does not hold as finished. A duplicate of a finished event
    /// is skipped; a copy of one still running waits for it.
    async fn run_journaled(
        &self,
        pipeline: &BuiltPipeline,
        journal: &Journal,
        record: &Arc<OwnedMessage>,
        ctx: &mut EventContext,
        spend: &mut Spend,
    ) -> Outcome {
        let (topic, partition) = (record.topic(), record.partition());
        let key = ctx.dedup_key.clone();
        let ttl = journal.ttl(pipeline, &ctx.event.event_type);
        let begun = self
            .journal_retry(record, (&pipeline.name, "journal_session"), || {
                journal.session(topic, partition, &key, ttl)
            })
            .await;
        match begun {
            Err(o) => o,
            Ok(Begin::Duplicate) => {
                self.metrics
                    .duplicates
                    .with_label_values(&[&pipeline.name, record.topic()])
                    .inc();
                tracing::debug!(dedup_key = %key, "duplicate of a finished event skipped");
                Outcome::Skipped
            }
            Ok(Begin::Run(session)) => {
                self.run_steps(pipeline, record, ctx, spend, Some(&session))
                    .await
            }
        }
    }

    /// Retries a journal operation until it succeeds, or gives the record up unfinished when
    /// shutdown begins. Only a deterministic failure (a record too large for Kafka) sends it
    /// to the DLQ: an unavailable journal never does.
    async fn journal_retry<T, F, Fut>(
        &self,
        record: &OwnedMessage,
        (pipeline, what): (&str, &'static str),
        mut op: F,
    ) -> Result<T, Outcome>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, JournalError>>,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = tokio::select! {
                biased;
                _ = self.drain.cancelled() => return Err(Outcome::Abandoned),
                r = op() => r,
            };
            let e = match result {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            if e.is_fatal() {
                // Health is marked failed; the scheduler stops. Unfinished, never committed.
                return Err(Outcome::Abandoned);
            }
            if e.is_deterministic() {
                let failure = Attempts::new().failure(
                    e.error_code(),
                    what.to_string(),
                    "spillway::journal::JournalError",
                    e.to_string(),
                    attempt,
                );
                let failure = Failure {
                    pipeline: (pipeline != NO_PIPELINE).then(|| pipeline.into()),
                    ..failure
                };
                return Err(self.dead_letter(record, failure).await);
            }
            self.metrics
                .retries
                .with_label_values(&[pipeline, what, "kafka"])
                .inc();
            let delay = backoff(
                attempt.min(self.retry.max_attempts.max(1)),
                &self.retry,
                None,
                &mut rand::rng(),
            );
            tracing::warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "{what} failed; retrying");
            tokio::select! {
                biased;
                _ = self.drain.cancelled() => return Err(Outcome::Abandoned),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn run_steps(
        &self,
        pipeline: &BuiltPipeline,
        record: &Arc<OwnedMessage>,
        ctx: &mut EventContext,
        spend: &mut Spend,
        journal: Option<&Session<'_>>,
    ) -> Outcome {
        let p = &*pipeline.name;
        let count = pipeline.steps.len();
        for (index, step) in pipeline.steps.iter().enumerate() {
            if let Some(session) = journal {
                if let Some(output) = session.finished(step.name()) {
                    // Finished before a crash or rebalance: reuse the result, do not pay twice.
                    if !output.is_null() {
                        std::sync::Arc::make_mut(&mut ctx.outputs)
                            .insert(step.name().to_string(), output);
                    }
                    self.metrics
                        .journal_reused
                        .with_label_values(&[p, step.name()])
                        .inc();
                    continue;
                }
            }
            // A step whose intent an earlier run recorded may already have acted: it runs (and
            // reconciles) whatever its condition says now, rather than being recorded as skipped.
            let intent_recorded =
                journal.is_some_and(|s| step.records_intent() && s.intent_recorded(step.name()));
            let applies = if intent_recorded {
                Ok(true)
            } else {
                std::panic::catch_unwind(AssertUnwindSafe(|| step.applies(ctx))).unwrap_or_else(
                    |panic| {
                        Err(StepError::deterministic(
                            "step_panicked",
                            format!("condition panicked: {}", panic_message(&*panic)),
                        ))
                    },
                )
            };
            match applies {
                Ok(true) => {}
                Ok(false) => {
                    // Recorded like a finished step, so a redelivered event skips it too,
                    // whatever the condition would say now.
                    self.metrics
                        .step_skips
                        .with_label_values(&[p, step.name()])
                        .inc();
                    let skipped = serde_json::json!({ "skipped": true });
                    if let Some(session) = journal {
                        let done = index + 1 == count;
                        if let Err(o) = self
                            .journal_step(record, session, (p, step.name()), &skipped, done, &[])
                            .await
                        {
                            return o;
                        }
                    }
                    std::sync::Arc::make_mut(&mut ctx.outputs)
                        .insert(step.name().to_string(), skipped);
                    continue;
                }
                Err(err) => {
                    let failure = Attempts::new().failure(
                        err.code,
                        format!("step.{}", step.name()),
                        "spillway::processor::StepError",
                        err.message,
                        1,
                    );
                    return self
                        .dead_letter(record, failure.in_pipeline(&pipeline.name))
                        .await;
                }
            }
            if let Some(session) = journal {
                if step.records_intent() && !intent_recorded {
                    if let Err(o) = self
                        .journal_retry(record, (p, "journal_write"), || {
                            session.record_intent(step.name())
                        })
                        .await
                    {
                        return o;
                    }
                }
            }
            fault::point("before_step", step.name());
            let mut attempts = Attempts::new();
            let mut attempt = 0u32;
            // Held from the first `Wait` until the step answers anything else, so the class
            // stays held between rechecks.
            let mut waiting = None;
            let output: StepOutput = loop {
                // A step whose dependency is down (an open breaker) holds the event here,
                // unless shutdown begins: then it is left unfinished and redelivered later.
                tokio::select! {
                    biased;
                    _ = step.ready() => {}
                    _ = self.drain.cancelled() => return Outcome::Abandoned,
                }
                attempt += 1;
                let started = Instant::now();
                let this = Attempt {
                    number: attempt,
                    intent_recorded,
                };
                let result = AssertUnwindSafe(step.run(ctx, this))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| {
                        Err(StepError::deterministic(
                            "step_panicked",
                            format!("step panicked: {}", panic_message(&*panic)),
                        ))
                    });
                let label = match &result {
                    Ok(_) => "ok",
                    Err(e) => match e.action {
                        Action::Retry { .. } => "transient",
                        Action::Defer { .. } | Action::Wait { .. } => "deferred",
                        Action::DeadLetter => "deterministic",
                        Action::Skip => "skip",
                        Action::Fatal => "fatal",
                    },
                };
                self.metrics
                    .step_duration
                    .with_label_values(&[p, step.name(), label])
                    .observe(started.elapsed().as_secs_f64());
                let err = match result {
                    Ok(output) => break output,
                    Err(e) => e,
                };
                if !matches!(err.action, Action::Wait { .. }) {
                    waiting = None;
                }
                *spend += err.spend;
                match err.action {
                    Action::Fatal => {
                        self.health.set_fatal(&format!(
                            "step {}: {}: {}",
                            step.name(),
                            err.code,
                            err.message
                        ));
                        return Outcome::Abandoned;
                    }
                    Action::Skip => {
                        tracing::debug!(step = step.name(), code = err.code, "event skipped");
                        return Outcome::Skipped;
                    }
                    Action::Defer { .. } | Action::Wait { .. } => {
                        // Flow control, not failure: the attempt is not used up. A `Wait` (a
                        // spent budget) also gives the in-flight slot back meanwhile.
                        attempt -= 1;
                        self.metrics
                            .deferrals
                            .with_label_values(&[p, step.name(), err.code])
                            .inc();
                        tracing::debug!(
                            step = step.name(),
                            code = err.code,
                            message = %err.message,
                            "step deferred; waiting for its dependency or budget"
                        );
                        let after = match err.action {
                            Action::Wait { after } => {
                                if waiting.is_none() {
                                    waiting =
                                        Some(self.parked.park(&ctx.share.class, &self.metrics));
                                }
                                Some(after)
                            }
                            Action::Defer { after } => after,
                            _ => None,
                        };
                        match after {
                            Some(after) => tokio::select! {
                                biased;
                                _ = tokio::time::sleep(after) => {}
                                _ = self.drain.cancelled() => return Outcome::Abandoned,
                            },
                            None => tokio::task::yield_now().await,
                        }
                    }
                    Action::Retry { after } if attempt < self.retry.max_attempts => {
                        attempts.first_failure_ms.get_or_insert_with(now_ms);
                        self.metrics
                            .retries
                            .with_label_values(&[p, step.name(), err.code])
                            .inc();
                        let delay = backoff(attempt, &self.retry, after, &mut rand::rng());
                        tracing::info!(
                            step = step.name(),
                            code = err.code,
                            attempt,
                            delay_ms = delay.as_millis() as u64,
                            "transient step error; retrying"
                        );
                        tokio::time::sleep(delay).await;
                    }
                    Action::Retry { .. } | Action::DeadLetter => {
                        let failure = attempts.failure(
                            err.code,
                            format!("step.{}", step.name()),
                            "spillway::processor::StepError",
                            err.message,
                            attempt,
                        );
                        return self
                            .dead_letter(record, failure.in_pipeline(&pipeline.name))
                            .await;
                    }
                }
            };
            *spend += output.spend;
            fault::point("after_step", step.name());
            if journal.is_none() && !output.staged.is_empty() {
                // Config validation requires a journal for such steps; never drop records.
                let failure = attempts.failure(
                    "sink_needs_journal",
                    format!("step.{}", step.name()),
                    "spillway::processor::StepError",
                    "this step writes Kafka records in a transaction and needs [journal]".into(),
                    attempt,
                );
                return self
                    .dead_letter(record, failure.in_pipeline(&pipeline.name))
                    .await;
            }
            if let Some(session) = journal {
                #[cfg(feature = "fault-injection")]
                if fault::fatal_at("journal_write", step.name()) {
                    session.raise_fatal_for_test();
                }
                static NULL: Json = Json::Null;
                let done = index + 1 == count;
                let value = output.value.as_ref().unwrap_or(&NULL);
                if let Err(o) = self
                    .journal_step(
                        record,
                        session,
                        (p, step.name()),
                        value,
                        done,
                        &output.staged,
                    )
                    .await
                {
                    return o;
                }
            }
            if let Some(value) = output.value {
                std::sync::Arc::make_mut(&mut ctx.outputs).insert(step.name().to_string(), value);
            }
        }
        Outcome::Succeeded
    }

    /// Makes a step's result (or its skip) durable in the journal, with the records it staged
    /// in one transaction, retrying like any journal write; then passes the step's crash point.
    async fn journal_step(
        &self,
        record: &OwnedMessage,
        session: &Session<'_>,
        (pipeline, step): (&str, &str),
        value: &Json,
        done: bool,
        staged: &[crate::step::OutRecord],
    ) -> Result<(), Outcome> {
        // A step's records and its entry commit in one transaction.
        let what = if staged.is_empty() {
            "journal_write"
        } else {
            "journal_transaction"
        };
        self.journal_retry(record, (pipeline, what), || {
            session.record(step, value, done, staged)
        })
        .await?;
        fault::point(if done { "after_done" } else { "after_journal" }, step);
        Ok(())
    }

    /// Decodes with retries for an unavailable registry; any other failure finishes the record.
    async fn decode(&self, record: &OwnedMessage) -> Result<crate::codec::Event, Outcome> {
        let mut attempts = Attempts::new();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let err = match self.codec.decode(record).await {
                Ok(event) => return Ok(event),
                Err(e) => e,
            };
            self.metrics
                .decode_errors
                .with_label_values(&[err.error_code()])
                .inc();
            if matches!(err, CodecError::Tombstone) {
                return Err(Outcome::Skipped);
            }
            if err.is_transient() && attempt < self.retry.max_attempts {
                attempts.first_failure_ms.get_or_insert_with(now_ms);
                self.metrics
                    .retries
                    .with_label_values(&[NO_PIPELINE, "decode", err.error_code()])
                    .inc();
                let delay = backoff(attempt, &self.retry, None, &mut rand::rng());
                tracing::warn!(code = err.error_code(), attempt, "decode failed; retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
            let failure = attempts.failure(
                err.error_code(),
                "decode".to_string(),
                "spillway::codec::CodecError",
                err.to_string(),
                attempt,
            );
            return Err(self.dead_letter(record, failure).await);
        }
    }

    async fn dead_letter(&self, record: &OwnedMessage, failure: Failure) -> Outcome {
        tracing::warn!(
            reason = failure.reason,
            stage = %failure.stage,
            attempts = failure.attempts,
            "dead-lettering record"
        );
        if self.dlq.write(record, &failure).await {
            Outcome::DeadLettered
        } else {
            // The DLQ producer failed fatally: the record stays unfinished.
            Outcome::Abandoned
        }
    }
}

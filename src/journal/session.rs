//! One event's journal session: [`Journal::session`] restores, claims and reads, then a
//! [`Session`] says which steps are finished and records intents and steps
//! ([`Journal::write`], [`Journal::write_atomic`] in a transaction with a step's records).

use super::*;
use crate::telemetry::now_ms;
use rdkafka::producer::{FutureRecord, Producer};
use serde_json::{Map, Value as Json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How an event starts with the journal ([`Journal::session`]).
pub enum Begin<'a> {
    /// The event is done within its TTL: a duplicate, to skip.
    Duplicate,
    /// Run the steps the session does not hold as finished, recording each.
    Run(Session<'a>),
}

/// One event's whole use of the journal, from its claim to its last entry: which steps are
/// already done (and their outputs), which intents were recorded, and the writes that record
/// a step (with a sink's records in a transaction). Entries only grow, so every write is
/// idempotent and may be retried. Dropping it releases the claim.
pub struct Session<'a> {
    journal: &'a Journal,
    topic: String,
    partition: i32,
    key: String,
    /// The entry as written last (shared references record steps, so the worker's retry
    /// closures can each borrow the session).
    entry: Mutex<Entry>,
    _claim: Claim<'a>,
}

impl Session<'_> {
    fn entry(&self) -> std::sync::MutexGuard<'_, Entry> {
        self.entry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The recorded output of `step` if it finished before (`null` for steps without one).
    pub fn finished(&self, step: &str) -> Option<Json> {
        self.entry().steps.get(step).cloned()
    }

    /// Whether `step` recorded an intent before (it may have acted without a result).
    pub fn intent_recorded(&self, step: &str) -> bool {
        self.entry().intents.iter().any(|i| i == step)
    }

    /// Records that `step` is about to act, durably, before its first attempt.
    pub async fn record_intent(&self, step: &str) -> Result<(), JournalError> {
        let mut entry = self.entry().clone();
        if !entry.intents.iter().any(|i| i == step) {
            entry.intents.push(step.to_string());
        }
        self.journal
            .write(self.partition, &self.key, entry.clone())
            .await?;
        *self.entry() = entry;
        Ok(())
    }

    /// Records that `step` finished with `output` (`done` when it is the event's last step),
    /// together with `staged` records in one transaction when the step produced any. Once
    /// this returns, the step's result is durable and the next step may start.
    pub async fn record(
        &self,
        step: &str,
        output: &Json,
        last: bool,
        staged: &[crate::step::OutRecord],
    ) -> Result<(), JournalError> {
        let mut entry = self.entry().clone();
        entry.steps.insert(step.to_string(), output.clone());
        entry.done = last;
        if staged.is_empty() {
            self.journal
                .write(self.partition, &self.key, entry.clone())
                .await?;
        } else {
            self.journal
                .write_atomic(
                    (&self.topic, self.partition),
                    &self.key,
                    entry.clone(),
                    step,
                    staged,
                )
                .await?;
        }
        *self.entry() = entry;
        Ok(())
    }

    /// Raises a fatal error on the journal producer (`SPILLWAY_FAULT=...:fatal`; tests only).
    #[cfg(feature = "fault-injection")]
    pub fn raise_fatal_for_test(&self) {
        self.journal.raise_fatal_for_test();
    }
}

/// Held while an event runs; dropping it lets a waiting copy re-check the journal.
pub struct Claim<'a> {
    journal: &'a Journal,
    key: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let notify = self
            .journal
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }
}

impl Journal {
    /// Starts an event with dedup key `key` from `(topic, partition)`: waits until its
    /// journal partition has caught up with the topic, claims the key (a copy of the event
    /// running at once is waited for), and reads its entry. A new entry expires after `ttl`.
    pub async fn session(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        ttl: Duration,
    ) -> Result<Begin<'_>, JournalError> {
        self.restore(topic, partition).await?;
        let claim = self.claim(key).await;
        // Again, in case the store was reopened while the claim waited (a no-op otherwise).
        self.restore(topic, partition).await?;
        let entry = match self.get(partition, key).await? {
            Some(e) if e.done => return Ok(Begin::Duplicate),
            Some(e) => e,
            None => Entry {
                v: 1,
                expires_at_ms: now_ms().saturating_add(ttl.as_millis() as u64),
                done: false,
                steps: Map::new(),
                intents: Vec::new(),
            },
        };
        Ok(Begin::Run(Session {
            journal: self,
            topic: topic.to_string(),
            partition,
            key: key.to_string(),
            entry: Mutex::new(entry),
            _claim: claim,
        }))
    }

    /// Claims `key` for this task. If another copy of the event is running, waits for it to
    /// finish first (the caller then re-reads the journal).
    pub async fn claim(&self, key: &str) -> Claim<'_> {
        loop {
            let waiting = {
                let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                match inflight.get(key) {
                    Some(n) => n.clone(),
                    None => {
                        inflight.insert(key.to_string(), Arc::new(Notify::new()));
                        return Claim {
                            journal: self,
                            key: key.to_string(),
                        };
                    }
                }
            };
            // A `Notified` receives `notify_waiters` from its creation on. The holder removes
            // its entry under the lock before notifying, so if the entry is still there after
            // this point, the wakeup is still to come; if not, look again.
            let notified = waiting.notified();
            let still_held = self
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .is_some_and(|n| Arc::ptr_eq(n, &waiting));
            if still_held {
                self.metrics.journal_waits.inc();
                notified.await;
            }
        }
    }

    /// Writes `entry` for `key` (to the journal partition of `input_partition`) and waits for
    /// Kafka's acknowledgement; only then is it recorded in the store.
    pub async fn write(
        &self,
        input_partition: i32,
        key: &str,
        entry: Entry,
    ) -> Result<(), JournalError> {
        let value = serde_json::to_vec(&entry).unwrap_or_default();
        let started = Instant::now();
        let jp = self.journal_partition(input_partition);
        let record = FutureRecord::to(&self.config.topic)
            .key(key)
            .payload(&value)
            .partition(jp);
        let result = self
            .producer
            .send(record, Duration::from_secs(0))
            .await
            .map(|_| ())
            .map_err(|(e, _)| {
                if let Some(why) = crate::kafka::fatal_error(self.producer.client()) {
                    self.health.set_fatal(&format!("journal producer: {why}"));
                    JournalError::Fatal(why)
                } else if txn::is_too_large(&e) {
                    JournalError::TooLarge(format!(
                        "the journal entry of {} bytes for topic {}: {e}",
                        key.len() + value.len(),
                        self.config.topic
                    ))
                } else {
                    JournalError::Kafka(e)
                }
            });
        self.metrics
            .journal_writes
            .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
            .inc();
        self.metrics
            .journal_write_duration
            .observe(started.elapsed().as_secs_f64());
        result?;
        self.record(jp, key, entry).await
    }

    /// Writes `entry` together with a sink's `records` in one Kafka transaction of the lane of
    /// the input partition: both are visible to `read_committed` readers, or neither is.
    pub async fn write_atomic(
        &self,
        input: (&str, i32),
        key: &str,
        entry: Entry,
        step: &str,
        records: &[crate::step::OutRecord],
    ) -> Result<(), JournalError> {
        let Some(txns) = &self.txns else {
            return Err(JournalError::Transaction(
                "the journal was built without transactions".into(),
            ));
        };
        // After a lane closed (fenced, or a commit with an unknown outcome), the new lane's
        // fence settles the old transaction and the store catches up with the topic again: a
        // step it shows as committed is not written twice.
        let generation = self.restore(input.0, input.1).await?;
        if self
            .get(input.1, key)
            .await?
            .is_some_and(|e| e.steps.contains_key(step))
        {
            return Ok(());
        }
        let jp = self.journal_partition(input.1);
        let mut all = records.to_vec();
        all.push(crate::step::OutRecord {
            topic: self.config.topic.clone(),
            partition: Some(jp),
            key: key.to_string(),
            payload: serde_json::to_vec(&entry).unwrap_or_default(),
            headers: Vec::new(),
        });
        let result = txns
            .write(input.0, input.1, generation, step, all)
            .await
            .map_err(JournalError::from);
        self.metrics
            .journal_writes
            .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
            .inc();
        result?;
        self.record(jp, key, entry).await
    }
}

//! Kafka transactions for sinks whose effect is itself a Kafka record (the result-topic
//! sink): the result records and the event's journal entry commit together or not at all.
//!
//! - **One lane per input partition.** Each assigned input partition `(topic, p)` gets its own
//!   transactional producer, `transactional.id = <group.id>.spillway.<topic>.<p>` (Kafka
//!   Streams' original exactly-once scheme). When the partition moves, the new owner's
//!   `init_transactions` fences the old owner and aborts whatever transaction it left open,
//!   so a stalled instance that wakes up cannot commit a result its successor also writes.
//! - **Group commit.** A lane's task takes every request waiting in its queue (up to
//!   [`MAX_BATCH`]) into one transaction, so throughput does not pay one commit per event.
//!   All requests of a transaction get its outcome.
//! - **Failures.** A transaction that aborted cleanly leaves nothing visible; its events retry
//!   on the same lane. Any other failure (fenced, a fatal producer error, a commit whose
//!   outcome is unknown after retries) *closes* the lane: it fails everything queued in it and
//!   never runs `init_transactions` again. The events' next write opens a new lane, whose
//!   `init_transactions` settles the old transaction (the coordinator completes or aborts it
//!   before answering), and the journal partition is read again before anything is written
//!   ([`crate::journal::Journal::write_atomic`] skips a step the re-read shows as committed).
//!   So every commit follows a read of the journal made after that producer's fence.
//! - **Records too large for Kafka.** A record the producer or the broker refuses for its size
//!   aborts the transaction cleanly; the lane then commits the batch's requests one by one, so
//!   only the request that is too large on its own fails, with [`LaneError::TooLarge`] (a
//!   deterministic error: the event goes to the DLQ), and the others commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::{mpsc, oneshot};

use crate::kafka::KafkaConfig;
use crate::step::OutRecord;
use crate::telemetry::Metrics;

/// Requests taken into one transaction at most.
pub const MAX_BATCH: usize = 512;
/// Time allowed for `init_transactions`, `commit_transaction` and `abort_transaction`.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// `commit_transaction` calls for one transaction before its outcome counts as unknown.
const COMMIT_ATTEMPTS: usize = 3;

/// Why a lane did not commit a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LaneError {
    /// Nothing of it is visible; writing it again may succeed.
    #[error("{0}")]
    Failed(String),
    /// One of its records is too large for Kafka, alone in its transaction: it never fits.
    #[error("a record is too large for Kafka: {0}")]
    TooLarge(String),
}

struct Request {
    /// The step whose records these are (for the `before_commit` crash point).
    step: String,
    records: Vec<OutRecord>,
    reply: oneshot::Sender<Result<(), LaneError>>,
}

/// Called by a lane once its `init_transactions` fenced the previous owner, with the lane's
/// input partition; returns the new fence generation of its journal partition.
pub type OnFence = Arc<dyn Fn(i32) -> u64 + Send + Sync>;

#[derive(Clone)]
struct Lane {
    tx: mpsc::Sender<Request>,
    /// The producer has run `init_transactions` (the previous owner is fenced).
    ready: Arc<AtomicBool>,
    /// The fence generation the lane's `init_transactions` produced.
    generation: Arc<AtomicU64>,
    /// Set by [`Transactions::reset`] or by the lane itself after a failure it cannot undo.
    closed: Arc<AtomicBool>,
}

type Lanes = Arc<Mutex<HashMap<(String, i32), Lane>>>;

/// The transactional lanes of the assigned input partitions.
pub struct Transactions {
    config: rdkafka::ClientConfig,
    id_prefix: String,
    lanes: Lanes,
    on_fence: OnFence,
    metrics: Arc<Metrics>,
}

impl Transactions {
    /// Lanes are created on first use; `kafka` gives the brokers and the id prefix.
    pub fn new(
        kafka: &KafkaConfig,
        on_fence: OnFence,
        metrics: Arc<Metrics>,
    ) -> Result<Transactions, KafkaError> {
        let config = crate::kafka::transactional_producer_config(kafka)
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        Ok(Transactions {
            config,
            id_prefix: format!("{}.spillway", kafka.group_id),
            lanes: Arc::new(Mutex::new(HashMap::new())),
            on_fence,
            metrics,
        })
    }

    fn lane(&self, topic: &str, partition: i32) -> Lane {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes
            .entry((topic.to_string(), partition))
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(MAX_BATCH);
                let lane = Lane {
                    tx,
                    ready: Arc::new(AtomicBool::new(false)),
                    generation: Arc::new(AtomicU64::new(0)),
                    closed: Arc::new(AtomicBool::new(false)),
                };
                let task = LaneTask {
                    id: format!("{}.{topic}.{partition}", self.id_prefix),
                    key: (topic.to_string(), partition),
                    config: self.config.clone(),
                    producer: None,
                    ready: lane.ready.clone(),
                    generation: lane.generation.clone(),
                    closed: lane.closed.clone(),
                    lanes: self.lanes.clone(),
                    on_fence: self.on_fence.clone(),
                    metrics: self.metrics.clone(),
                };
                tokio::spawn(task.run(rx));
                lane
            })
            .clone()
    }

    /// The input partitions were assigned or revoked: their lanes are closed, so the next use
    /// starts a new producer whose `init_transactions` fences whoever held them meanwhile.
    pub fn reset<'a>(&self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, p) in partitions {
            if let Some(lane) = lanes.remove(&(topic.to_string(), p)) {
                lane.closed.store(true, Ordering::Release);
            }
        }
    }

    /// Makes sure the lane of `(topic, partition)` has fenced the partition's previous owner
    /// and settled its open transaction. Until then a `read_committed` read of the journal
    /// cannot get past that transaction.
    pub async fn prepare(&self, topic: &str, partition: i32) -> Result<(), LaneError> {
        let lane = self.lane(topic, partition);
        if lane.ready.load(Ordering::Acquire) && !lane.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        Self::send(lane, String::new(), Vec::new()).await
    }

    /// Starts fencing for each of `partitions` in the background (on assignment).
    pub fn prepare_all<'a>(&self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        for (topic, p) in partitions {
            let lane = self.lane(topic, p);
            tokio::spawn(async move {
                if let Err(e) = Self::send(lane, String::new(), Vec::new()).await {
                    tracing::warn!(error = %e, "fencing a newly assigned partition failed; its first record retries");
                }
            });
        }
    }

    /// Writes `records` in a transaction of the lane of `(topic, partition)`; `Ok` once the
    /// transaction committed. `read_generation` is the fence generation of the journal read
    /// the caller checked against: a lane fenced after that read refuses, so the caller
    /// reads again first.
    pub async fn write(
        &self,
        topic: &str,
        partition: i32,
        read_generation: u64,
        step: &str,
        records: Vec<OutRecord>,
    ) -> Result<(), LaneError> {
        let lane = self.lane(topic, partition);
        if !lane.ready.load(Ordering::Acquire)
            || lane.closed.load(Ordering::Acquire)
            || lane.generation.load(Ordering::Acquire) > read_generation
        {
            return Err(LaneError::Failed(
                "transaction lane changed since the journal was read; reading again".into(),
            ));
        }
        Self::send(lane, step.to_string(), records).await
    }

    async fn send(lane: Lane, step: String, records: Vec<OutRecord>) -> Result<(), LaneError> {
        let stopped = || LaneError::Failed("transaction lane stopped".into());
        let (reply, rx) = oneshot::channel();
        lane.tx
            .send(Request {
                step,
                records,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

struct LaneTask {
    id: String,
    key: (String, i32),
    config: rdkafka::ClientConfig,
    producer: Option<FutureProducer>,
    ready: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
    lanes: Lanes,
    on_fence: OnFence,
    metrics: Arc<Metrics>,
}

/// How a transaction ended.
enum Ended {
    Committed,
    /// Aborted cleanly: nothing of it is visible; the lane can go on.
    Aborted(String),
    /// Aborted cleanly because a record was too large for Kafka.
    TooLarge(String),
    /// Fenced, fatal, or a commit whose outcome is unknown: the lane must close.
    Broken(String),
}

impl LaneTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            // A requester that is gone (its task was aborted on revoke) wants nothing written.
            batch.retain(|r| !r.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            if self.closed.load(Ordering::Acquire) {
                fail(batch, "transaction lane closed");
                break;
            }
            let ended = self.transaction(&batch).await;
            if let Ended::TooLarge(e) = &ended {
                if batch.len() > 1 {
                    // Which request is too large on its own? Each commits alone.
                    tracing::warn!(transactional_id = %self.id, error = %e, requests = batch.len(),
                        "a record was too large for Kafka; committing the batch's requests one by one");
                    if !self.one_by_one(batch).await {
                        break;
                    }
                    continue;
                }
            }
            if !self.answer(batch, ended) {
                break;
            }
        }
        // Closed (reset, or broken) or every sender gone: fail what is still queued, and
        // close the producer off the runtime's threads (it joins librdkafka threads).
        rx.close();
        while let Ok(r) = rx.try_recv() {
            let _ = r
                .reply
                .send(Err(LaneError::Failed("transaction lane closed".into())));
        }
        if let Some(p) = self.producer.take() {
            tokio::task::spawn_blocking(move || drop(p));
        }
    }

    /// Answers `batch` with how its transaction ended; false when the lane must stop.
    fn answer(&self, batch: Vec<Request>, ended: Ended) -> bool {
        match ended {
            Ended::Committed => {
                for r in batch {
                    let _ = r.reply.send(Ok(()));
                }
                true
            }
            Ended::Aborted(e) => {
                fail(batch, &e);
                true
            }
            Ended::TooLarge(e) => {
                for r in batch {
                    let _ = r.reply.send(Err(LaneError::TooLarge(e.clone())));
                }
                true
            }
            Ended::Broken(e) => {
                // Closed before anyone hears of the failure, so a retry cannot find this
                // lane still ready.
                self.close();
                fail(batch, &e);
                false
            }
        }
    }

    /// Commits each request of `batch` in a transaction of its own; false when the lane must
    /// stop (the requests not yet tried fail and retry on a new lane).
    async fn one_by_one(&mut self, batch: Vec<Request>) -> bool {
        let mut rest = batch.into_iter();
        while let Some(request) = rest.next() {
            if request.reply.is_closed() {
                // Its requester is gone (aborted on revoke): it wants nothing written.
                continue;
            }
            if self.closed.load(Ordering::Acquire) {
                fail(
                    std::iter::once(request).chain(rest).collect(),
                    "transaction lane closed",
                );
                return false;
            }
            let ended = self.transaction(std::slice::from_ref(&request)).await;
            if !self.answer(vec![request], ended) {
                fail(rest.collect(), "transaction lane closed");
                return false;
            }
        }
        true
    }

    /// Marks the lane closed and removes it from the map if it is still the current one, so
    /// the next write opens a new lane (a new fence, then a fresh read of the journal).
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if lanes
            .get(&self.key)
            .is_some_and(|l| Arc::ptr_eq(&l.closed, &self.closed))
        {
            lanes.remove(&self.key);
        }
    }

    /// Creates the producer and runs `init_transactions` if it has not been done.
    async fn producer(&mut self) -> Result<FutureProducer, String> {
        if let Some(p) = &self.producer {
            return Ok(p.clone());
        }
        let mut config = self.config.clone();
        config.set("transactional.id", &self.id);
        let producer: FutureProducer = config.create().map_err(|e| e.to_string())?;
        let p = producer.clone();
        let started = Instant::now();
        if let Err(e) = blocking(move || p.init_transactions(TXN_TIMEOUT)).await {
            tokio::task::spawn_blocking(move || drop(producer));
            return Err(format!("init_transactions: {e}"));
        }
        tracing::info!(
            transactional_id = %self.id,
            ms = started.elapsed().as_millis() as u64,
            "transactional producer ready (previous owner fenced)"
        );
        // The generation moves before the lane is ready: a restore that sees the lane ready
        // also sees the new generation, and reads the journal partition again.
        let generation = (self.on_fence)(self.key.1);
        self.generation.store(generation, Ordering::Release);
        self.ready.store(true, Ordering::Release);
        self.producer = Some(producer.clone());
        Ok(producer)
    }

    async fn transaction(&mut self, batch: &[Request]) -> Ended {
        let producer = match self.producer().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(transactional_id = %self.id, error = %e, "transactional producer failed to start");
                return Ended::Broken(e);
            }
        };
        let count: usize = batch.iter().map(|r| r.records.len()).sum();
        if count == 0 {
            return Ended::Committed;
        }
        let started = Instant::now();
        let ended = self.commit(&producer, batch).await;
        let outcome = match &ended {
            Ended::Committed => "committed",
            Ended::Aborted(e) => {
                tracing::warn!(transactional_id = %self.id, error = %e, "transaction aborted; its events retry");
                "aborted"
            }
            Ended::TooLarge(e) => {
                tracing::warn!(transactional_id = %self.id, error = %e, "transaction aborted: a record is too large for Kafka");
                "too_large"
            }
            Ended::Broken(e) => {
                if e.contains("not supported by broker") {
                    tracing::error!(transactional_id = %self.id, error = %e,
                        "the broker does not support Kafka transactions; events wait and retry. \
                         Use a broker with transactions, or set transactional = false on the kafka sink");
                } else {
                    tracing::warn!(transactional_id = %self.id, error = %e,
                        "transaction failed with an unknown outcome; closing the lane (the next one re-reads the journal)");
                }
                "unknown"
            }
        };
        self.metrics
            .journal_transactions
            .with_label_values(&[outcome])
            .inc();
        self.metrics
            .journal_transaction_records
            .observe(count as f64);
        self.metrics
            .journal_transaction_duration
            .observe(started.elapsed().as_secs_f64());
        ended
    }

    async fn commit(&self, producer: &FutureProducer, batch: &[Request]) -> Ended {
        let p = producer.clone();
        if let Err(e) = blocking(move || p.begin_transaction()).await {
            return Ended::Broken(format!("begin_transaction: {e}"));
        }
        let mut failed = None;
        let mut too_large = None;
        let mut deliveries = Vec::with_capacity(batch.len());
        for r in batch.iter().flat_map(|r| r.records.iter()) {
            match producer.send_result(r.to_future_record()) {
                Ok(delivery) => deliveries.push((delivery, r)),
                Err((e, _)) => {
                    if is_too_large(&e) {
                        too_large = Some(too_large_message(&e, r));
                    }
                    failed = Some(format!("enqueue: {e}"));
                    break;
                }
            }
        }
        for (d, r) in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    if is_too_large(&e) {
                        too_large = too_large.or(Some(too_large_message(&e, r)));
                    }
                    failed = failed.or(Some(format!("delivery: {e}")));
                }
                Err(_) => failed = failed.or(Some("delivery report lost".to_string())),
            }
        }
        if let Some(e) = failed {
            // Nothing was committed yet, so a clean abort leaves nothing visible.
            return match (self.abort(producer, e).await, too_large) {
                (Ended::Aborted(_), Some(why)) => Ended::TooLarge(why),
                (ended, _) => ended,
            };
        }
        if let Some(first) = batch.first() {
            crate::fault::point("before_commit", &first.step);
        }
        // A timed-out or retriable commit may be called again (librdkafka's contract); it is
        // never followed by an abort, whose failure would leave the outcome unknown.
        let mut last = String::new();
        for _ in 0..COMMIT_ATTEMPTS {
            let p = producer.clone();
            match blocking(move || p.commit_transaction(TXN_TIMEOUT)).await {
                Ok(()) => return Ended::Committed,
                Err(KafkaError::Transaction(e)) if e.txn_requires_abort() => {
                    return self.abort(producer, format!("commit: {e}")).await;
                }
                Err(KafkaError::Transaction(e)) if e.is_retriable() && !e.is_fatal() => {
                    last = format!("commit: {e}");
                }
                Err(e) => return Ended::Broken(format!("commit: {e}")),
            }
        }
        Ended::Broken(last)
    }

    async fn abort(&self, producer: &FutureProducer, why: String) -> Ended {
        let p = producer.clone();
        match blocking(move || p.abort_transaction(TXN_TIMEOUT)).await {
            Ok(()) => Ended::Aborted(why),
            Err(e) => Ended::Broken(format!("{why}; abort failed: {e}")),
        }
    }
}

fn fail(batch: Vec<Request>, why: &str) {
    for r in batch {
        let _ = r.reply.send(Err(LaneError::Failed(why.to_string())));
    }
}

/// Whether the producer (`message.max.bytes`) or the broker (the topic's
/// `max.message.bytes`) refused a record for its size.
pub fn is_too_large(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge)
}

fn too_large_message(e: &KafkaError, r: &OutRecord) -> String {
    format!(
        "{} bytes for topic {}: {e}",
        r.key.len()
            + r.payload.len()
            + r.headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>(),
        r.topic
    )
}

async fn blocking(
    f: impl FnOnce() -> Result<(), KafkaError> + Send + 'static,
) -> Result<(), KafkaError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

//! Key-ordered concurrent scheduling, bounded look-ahead, offset commits, revokes and drain.
//!
//! One task owns all scheduling state, so there are no locks on the data path. It receives
//! records and rebalance events from the poll thread and completions from the record tasks:
//!
//! * Records with the same key run strictly one after another, in offset order; records with
//!   different keys (and records without a key) run concurrently, up to `max_in_flight`.
//! * A record whose key is busy waits in that key's queue while later records of other keys
//!   go ahead (look-ahead). Waiting records are bounded per partition and in total: when a
//!   partition's buffer is full it is paused, and it resumes once the buffer has drained to
//!   half. A hot key therefore never blocks other keys, and memory stays bounded.
//! * Offsets are committed from each partition's [`OffsetTracker`] only.
//! * On revoke, the revoked partitions' waiting records are dropped, their in-flight work gets
//!   up to `rebalance_timeout_ms` to finish, their finished offsets are committed
//!   synchronously, and then their state is discarded, so nothing of the old assignment can
//!   be committed afterwards.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, Id, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::consumer::{tpl_of, Input, KafkaConsumer, Partition};
use super::gate::Gate;
use super::offsets::{OffsetTracker, Tracked};
use super::worker::{Outcome, Worker};
use crate::fair::{FairQueue, Share};
use crate::processor::config::ProcessorConfig;
use crate::telemetry::{Health, Metrics};

/// Scheduling state of one assigned partition.
mod commit;

struct PartitionState {
    topic: Arc<str>,
    /// Distinguishes this assignment from an earlier one of the same partition.
    epoch: u64,
    tracker: OffsetTracker,
    /// Keys with a record running or waiting, and the records waiting behind it.
    /// (Each with its class and weight, found once when it arrived.)
    keys: HashMap<u64, VecDeque<(Arc<OwnedMessage>, Share)>>,
    /// Records received and not started yet.
    buffered: usize,
    /// Records of this partition running now.
    running: usize,
    paused: bool,
    /// Last offset stored for commit.
    last_stored: Option<i64>,
    revoking: bool,
}

/// A record ready to start.
struct Job {
    /// Its class and weight in the fair sharing of the in-flight slots.
    share: Share,
    partition: i32,
    topic: Arc<str>,
    epoch: u64,
    key: Option<u64>,
    record: Arc<OwnedMessage>,
}

/// What the scheduler remembers about a running task.
struct Running {
    topic: Arc<str>,
    partition: i32,
    epoch: u64,
    key: Option<u64>,
    offset: i64,
    abort: AbortHandle,
}

struct PendingRevoke {
    partitions: Vec<Partition>,
    /// Epoch of each revoked partition's state, so a later assignment is never released.
    epochs: Vec<u64>,
    ack: std_mpsc::SyncSender<()>,
    deadline: Instant,
}

pub(crate) struct Scheduler {
    cfg: ProcessorConfig,
    consumer: Arc<KafkaConsumer>,
    worker: Arc<Worker>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    partitions: HashMap<Arc<str>, HashMap<i32, PartitionState>>,
    /// Records ready to start, by class, served by weight (`processor.fairness`).
    ready: FairQueue<Job>,
    tasks: JoinSet<Outcome>,
    running: HashMap<Id, Running>,
    buffered_total: usize,
    paused: HashSet<Partition>,
    next_epoch: u64,
    pending_revoke: Option<PendingRevoke>,
    draining: bool,
    gate: Gate,
    gate_rx: tokio::sync::watch::Receiver<u64>,
    /// The gate is closed: every assigned partition is paused and no record starts.
    gate_closed: bool,
}

/// A partition pauses when this many times `max_buffered_per_partition` offsets are tracked
/// but not yet committable (finished records waiting behind an unfinished one).
const PENDING_FACTOR: usize = 10;

fn key_hash(key: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

impl Scheduler {
    pub(crate) fn new(
        cfg: ProcessorConfig,
        consumer: Arc<KafkaConsumer>,
        worker: Arc<Worker>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        gate: Gate,
    ) -> Self {
        let gate_rx = gate.subscribe();
        Scheduler {
            gate,
            gate_rx,
            gate_closed: false,
            cfg,
            consumer,
            worker,
            metrics,
            health,
            partitions: HashMap::new(),
            ready: FairQueue::default(),
            tasks: JoinSet::new(),
            running: HashMap::new(),
            buffered_total: 0,
            paused: HashSet::new(),
            next_epoch: 0,
            pending_revoke: None,
            draining: false,
        }
    }

    /// Runs until `shutdown` is cancelled and the drain is complete, then stops the poll
    /// thread through `stop`. Returns an error if the poll thread died unexpectedly.
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        shutdown: CancellationToken,
        stop: Arc<AtomicBool>,
        poll_alive: Arc<AtomicBool>,
    ) -> Result<(), &'static str> {
        let mut commit_tick = tokio::time::interval(self.cfg.commit_interval());
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // How soon a dead poll thread or a fatal client error stops the processor.
        let mut health_tick = tokio::time::interval(Duration::from_millis(500));
        health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut drain_deadline = far;
        let mut result = Ok(());
        loop {
            let revoke_deadline = self.pending_revoke.as_ref().map_or(far, |r| r.deadline);
            tokio::select! {
                biased;
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.on_joined(joined);
                }
                _ = shutdown.cancelled(), if !self.draining => {
                    drain_deadline = Instant::now() + Duration::from_millis(self.cfg.shutdown_timeout_ms);
                    self.begin_drain();
                }
                _ = tokio::time::sleep_until(drain_deadline), if self.draining => {
                    tracing::warn!(
                        abandoned = self.tasks.len(),
                        "shutdown deadline reached; abandoning in-flight work (it will be redelivered)"
                    );
                    break;
                }
                _ = tokio::time::sleep_until(revoke_deadline), if self.pending_revoke.is_some() => {}
                Ok(()) = self.gate_rx.changed() => self.on_gate(),
                _ = self.worker.parked.changed.notified() => {}
                _ = health_tick.tick() => {
                    if !poll_alive.load(Ordering::Acquire) {
                        tracing::error!("poll thread died; shutting down");
                        result = Err("poll thread died");
                        break;
                    }
                    if let Some(why) = self.health.fatal() {
                        tracing::error!(reason = %why, "a Kafka client failed fatally; shutting down without finishing its work");
                        result = Err("a Kafka client failed fatally");
                        break;
                    }
                }
                _ = commit_tick.tick() => self.store_offsets(),
                input = rx.recv() => match input {
                    Some(input) => self.on_input(input),
                    None => {
                        tracing::error!("poll thread stopped unexpectedly; shutting down");
                        result = Err("poll thread stopped unexpectedly");
                        break;
                    }
                },
            }
            if self.draining
                && self.tasks.is_empty()
                && self.ready.is_empty()
                && self.pending_revoke.is_none()
            {
                break;
            }
            self.dispatch();
            self.finish_revoke_if_done();
            self.resume_drained();
        }
        self.shutdown(rx, stop).await;
        result
    }

    fn state_mut(&mut self, topic: &str, partition: i32) -> Option<&mut PartitionState> {
        self.partitions.get_mut(topic)?.get_mut(&partition)
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Record(msg) => self.on_record(msg),
            Input::Assign(parts) => self.on_assign(parts),
            Input::Revoke(parts, ack) => self.on_revoke(parts, ack),
        }
    }

    fn on_assign(&mut self, parts: Vec<Partition>) {
        if self.draining {
            return; // Records of these partitions are dropped; they stay uncommitted.
        }
        // The poll thread gave up waiting for an earlier revoke; finish it before the new
        // assignment's state exists, so it cannot be mistaken for the old one.
        if let Some(pending) = self.pending_revoke.take() {
            self.release(pending);
        }
        // librdkafka keeps a partition's pause flag across revoke and re-assign; a partition
        // paused for a full buffer in its previous assignment would never be fetched again.
        // Every assignment starts unpaused, matching the fresh state below, unless the gate
        // is closed.
        if let Some(j) = &self.worker.journal {
            let input: Vec<(String, i32)> =
                parts.iter().map(|(t, p)| (t.to_string(), *p)).collect();
            j.assigned(&input);
        }
        let result = if self.gate_closed {
            self.consumer.pause(&tpl_of(&parts))
        } else {
            self.consumer.resume(&tpl_of(&parts))
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "setting the pause state of new partitions failed");
        }
        for (topic, partition) in parts {
            self.next_epoch += 1;
            let state = PartitionState {
                topic: topic.clone(),
                epoch: self.next_epoch,
                tracker: OffsetTracker::new(),
                keys: HashMap::new(),
                buffered: 0,
                running: 0,
                paused: false,
                last_stored: None,
                revoking: false,
            };
            self.partitions
                .entry(topic)
                .or_default()
                .insert(partition, state);
        }
        self.metrics
            .assigned_partitions
            .set(self.partitions.values().map(|p| p.len() as i64).sum());
        self.update_paused_gauge();
    }

    /// Re-evaluates the gate after a dependency changed state; pauses or resumes intake.
    fn on_gate(&mut self) {
        let closed = !self.gate.is_open();
        if closed == self.gate_closed || self.draining {
            return;
        }
        self.gate_closed = closed;
        let all: Vec<Partition> = self
            .partitions
            .iter()
            .flat_map(|(t, m)| m.keys().map(move |p| (t.clone(), *p)))
            .collect();
        let result = if closed {
            tracing::warn!(
                partitions = all.len(),
                "a step's dependency is down; pausing intake until it recovers"
            );
            self.consumer.pause(&tpl_of(&all))
        } else {
            tracing::info!("dependencies recovered; resuming intake");
            self.consumer
                .resume(&tpl_of(all.iter().filter(|p| !self.paused.contains(*p))))
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, closed, "gate pause/resume failed");
        }
        self.metrics
            .pause_events
            .with_label_values(&[if closed { "gate_closed" } else { "gate_opened" }])
            .inc();
        self.update_paused_gauge();
    }

    /// Paused partitions: all of them while the gate is closed, else those with full buffers.
    fn update_paused_gauge(&self) {
        let paused = if self.gate_closed {
            self.partitions.values().map(|m| m.len()).sum()
        } else {
            self.paused.len()
        };
        self.metrics.paused_partitions.set(paused as i64);
    }

    fn on_record(&mut self, msg: OwnedMessage) {
        let draining = self.draining;
        let total = self.buffered_total;
        let (max_part, max_total) = (
            self.cfg.max_buffered_per_partition,
            self.cfg.max_buffered_total,
        );
        let partition = msg.partition();
        let Some(state) = self
            .partitions
            .get_mut(msg.topic())
            .and_then(|m| m.get_mut(&partition))
        else {
            return; // Not (or no longer) ours: never tracked, so never committed.
        };
        if state.revoking || draining {
            return;
        }
        if state.tracker.track(msg.offset()) == Tracked::Duplicate {
            tracing::debug!(
                offset = msg.offset(),
                partition,
                "ignoring redelivered offset already tracked"
            );
            return;
        }
        let record = Arc::new(msg);
        let key = record.key().map(key_hash);
        state.buffered += 1;
        // A record whose key is busy waits behind it, in offset order; any other is ready.
        let waiting = key.and_then(|k| match state.keys.entry(k) {
            Entry::Occupied(busy) => Some(busy.into_mut()),
            Entry::Vacant(free) => {
                free.insert(VecDeque::new());
                None
            }
        });
        let share = self.cfg.fairness.share_of(&record);
        // With fair sharing, a full total pauses only the partitions of classes holding at least
        // an equal share of what is ready, so a quiet source on its own topic keeps flowing
        // behind another's spike. Everything pauses at twice the total plus what the poll
        // thread may have handed over before the heavy classes' pauses took effect.
        let heavy =
            self.ready.class_len(&share.class) * self.ready.classes().max(1) >= self.ready.len();
        let hard = max_total
            .saturating_mul(2)
            .saturating_add(self.cfg.handover_capacity());
        let total_full = total + 1 >= max_total && (heavy || total + 1 >= hard);
        match waiting {
            Some(queue) => queue.push_back((record, share)),
            None => {
                let class = share.class.clone();
                self.ready.push(
                    &class,
                    Job {
                        share,
                        partition,
                        topic: state.topic.clone(),
                        epoch: state.epoch,
                        key,
                        record,
                    },
                )
            }
        }
        self.buffered_total += 1;
        self.metrics.buffered.set(self.buffered_total as i64);
        // Also bound the offsets tracked behind a stuck record (a DLQ that cannot be written,
        // a long Retry-After): they cost memory and every one would be redelivered.
        let over = state.buffered >= max_part
            || total_full
            || state.tracker.pending_len() >= PENDING_FACTOR * max_part;
        if over && !state.paused {
            state.paused = true;
            let topic = state.topic.clone();
            self.set_paused((topic, partition), true);
        }
    }

    fn set_paused(&mut self, part: Partition, pause: bool) {
        let tpl = tpl_of([&part]);
        let result = if pause {
            self.consumer.pause(&tpl)
        } else if self.gate_closed {
            Ok(()) // Stays paused at the consumer until the gate opens.
        } else {
            self.consumer.resume(&tpl)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, topic = %part.0, partition = part.1, pause, "pause/resume failed");
        }
        if pause {
            self.paused.insert(part);
            self.metrics
                .pause_events
                .with_label_values(&["pause"])
                .inc();
        } else {
            self.paused.remove(&part);
            self.metrics
                .pause_events
                .with_label_values(&["resume"])
                .inc();
        }
        self.update_paused_gauge();
    }

    /// Resumes paused partitions whose buffers drained to half (and the total below its cap).
    fn resume_drained(&mut self) {
        if self.paused.is_empty()
            || self.draining
            || self.buffered_total >= self.cfg.max_buffered_total / 2
        {
            return;
        }
        let low = self.cfg.max_buffered_per_partition / 2;
        let ready: Vec<Partition> = self
            .paused
            .iter()
            .filter(|(t, p)| {
                self.partitions
                    .get(&**t)
                    .and_then(|m| m.get(p))
                    .is_some_and(|s| {
                        s.buffered <= low
                            && s.tracker.pending_len()
                                < PENDING_FACTOR * self.cfg.max_buffered_per_partition / 2
                    })
            })
            .cloned()
            .collect();
        for part in ready {
            if let Some(s) = self.state_mut(&part.0, part.1) {
                s.paused = false;
            }
            self.set_paused(part, false);
        }
    }

    /// Starts ready records while there is room in the in-flight window.
    fn dispatch(&mut self) {
        if (self.gate_closed && !self.draining) || self.health.is_fatal() {
            // A fatal client error stops the processor within the health tick; nothing new
            // starts meanwhile (it could call the LLM and then not record it).
            return;
        }
        // Tasks waiting on a spent budget hold no slot; a class with one waiting starts no more
        // records until it stops waiting, so the waiting tasks stay few (those dispatched
        // before the first one parked) and the other classes take the slots.
        let parked = &self.worker.parked;
        while self.tasks.len() < self.cfg.max_in_flight + parked.count() {
            let job = if parked.count() == 0 {
                self.ready.pop(|j| j.share.weight)
            } else {
                self.ready
                    .pop_where(|j| j.share.weight, |class| parked.is_free(class))
            };
            let Some(job) = job else {
                break;
            };
            let Some(state) = self
                .partitions
                .get_mut(&job.topic)
                .and_then(|m| m.get_mut(&job.partition))
                .filter(|s| s.epoch == job.epoch)
            else {
                continue; // Its partition was revoked meanwhile.
            };
            state.buffered -= 1;
            state.running += 1;
            self.buffered_total -= 1;
            let offset = job.record.offset();
            let worker = self.worker.clone();
            let (record, share) = (job.record, job.share);
            let abort = self
                .tasks
                .spawn(async move { worker.process(record, share).await });
            self.running.insert(
                abort.id(),
                Running {
                    topic: job.topic,
                    partition: job.partition,
                    epoch: job.epoch,
                    key: job.key,
                    offset,
                    abort,
                },
            );
        }
        self.metrics.inflight.set(self.tasks.len() as i64);
        self.metrics.buffered.set(self.buffered_total as i64);
    }

    fn on_joined(&mut self, joined: Result<(Id, Outcome), tokio::task::JoinError>) {
        let (id, outcome) = match joined {
            Ok((id, outcome)) => (id, Some(outcome)),
            Err(e) => {
                if e.is_panic() {
                    // Every panic of a record's task is caught in the worker, which
                    // dead-letters the record; only one while writing that dead letter gets
                    // here. The record stays unfinished, so its partition's commit stops
                    // there (visible as growing committed-offset lag) instead of losing it.
                    tracing::error!(error = %e, "record task panicked while dead-lettering");
                    self.metrics
                        .kafka_errors
                        .with_label_values(&["dead_letter_panicked"])
                        .inc();
                }
                (e.id(), None)
            }
        };
        self.metrics.inflight.set(self.tasks.len() as i64);
        let Some(run) = self.running.remove(&id) else {
            return;
        };
        let Some(state) = self
            .partitions
            .get_mut(&*run.topic)
            .and_then(|m| m.get_mut(&run.partition))
            .filter(|s| s.epoch == run.epoch)
        else {
            return; // Finished after its partition was released: not ours to commit.
        };
        state.running -= 1;
        if !outcome.is_some_and(Outcome::is_finished) {
            return; // Cancelled, panicked or abandoned: unfinished.
        }
        if !state.tracker.finish(run.offset) {
            tracing::error!(
                offset = run.offset,
                partition = run.partition,
                "finished an offset that was not pending"
            );
        }
        let Some(key) = run.key else {
            return;
        };
        let next = match state.keys.get_mut(&key) {
            Some(waiting) => waiting.pop_front(),
            None => None,
        };
        match next {
            Some((record, share)) => {
                let class = share.class.clone();
                self.ready.push(
                    &class,
                    Job {
                        share,
                        partition: run.partition,
                        topic: run.topic,
                        epoch: run.epoch,
                        key: Some(key),
                        record,
                    },
                )
            }
            None => {
                state.keys.remove(&key);
            }
        }
    }
}

//! The changelog reader: one thread and one `read_committed` consumer that keep the open
//! partition stores in step with the journal topic.
//!
//! - A store is opened at its checkpoint (or the log start) and read for as long as its
//!   journal partition is held: first the restore up to the end asked for, then the tail, so
//!   the checkpoint stays close to the log end and a restart on the same disk reads little.
//! - Records are applied to the store in batches, each with the checkpoint after it in the
//!   same redb transaction. Nothing is held in memory beyond one poll batch.
//! - A restore has no deadline that fails it. `CatchUp` waiters are answered when the read
//!   position passes their target; while one waits, progress is logged and metered, and a
//!   position that has not moved for `journal.restore_stall_ms` marks the processor not
//!   ready until it moves again.
//! - Expired entries are swept from each open store every `sweep_every`, in bounded batches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use super::store::Store;
use super::Entry;
use crate::telemetry::{now_ms, Health, Metrics};

/// Records read per round at most; each partition's share is applied in one transaction.
/// Larger rounds mean fewer commits during a cold restore.
const BATCH: usize = 10_000;
/// Bytes of record values read per round at most, so a round's decoded entries stay small
/// whatever the LLM outputs they carry.
const BATCH_BYTES: usize = 4 << 20;
/// Entries swept from one store per transaction.
const SWEEP_BATCH: usize = 10_000;
/// How often a restore in progress logs how far it has come.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What the reader is asked to do.
pub(super) enum Command {
    /// Read journal partition `partition` into `store`, from offset `from`.
    Open {
        partition: i32,
        store: Arc<Store>,
        from: i64,
    },
    /// Stop reading `partition` and make its store durable; it is closed when the last user
    /// lets go of it.
    Close { partition: i32 },
    /// Answer `reply` once the read position of `partition` is at or past `target`.
    CatchUp {
        partition: i32,
        target: i64,
        reply: oneshot::Sender<()>,
    },
}

/// One partition's records of a poll batch (`None`: a tombstone), and the offset after them.
type Batch = (Vec<(String, Option<Entry>)>, i64);

/// A partition's share of a round: the partition, its state, its records, the offset after.
type Work<'a> = (i32, &'a mut Open, Vec<(String, Option<Entry>)>, i64);

struct Open {
    store: Arc<Store>,
    /// Next offset to read (the consumer's position, applied to the store).
    position: i64,
    /// The checkpoint written last.
    checkpoint: i64,
    /// When `position` last moved.
    moved: Instant,
    waiters: Vec<(i64, oneshot::Sender<()>, Instant)>,
    stalled: bool,
}

pub(super) struct Reader {
    pub(super) consumer: crate::kafka::Reader,
    pub(super) topic: String,
    pub(super) stall_after: Duration,
    pub(super) sweep_every: Duration,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    pub(super) stop: Arc<AtomicBool>,
}

impl Reader {
    pub(super) fn run(self, commands: Receiver<Command>) {
        let mut open: HashMap<i32, Open> = HashMap::new();
        let mut last_sweep = Instant::now();
        let mut last_progress = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            // Commands first; with nothing open, wait for one instead of polling.
            let mut changed = false;
            loop {
                let next = if open.is_empty() {
                    match commands.recv_timeout(Duration::from_millis(200)) {
                        Ok(c) => Some(c),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return self.close_all(open),
                    }
                } else {
                    commands.try_recv().ok()
                };
                let Some(command) = next else { break };
                changed |= self.command(&mut open, command);
            }
            if changed {
                self.assign(&open);
            }
            if open.is_empty() {
                if changed {
                    // Nothing held: nothing can be stalled or left to restore.
                    self.answer(&mut open);
                }
                continue;
            }
            self.read(&mut open);
            self.answer(&mut open);
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                self.report(&open);
            }
            if last_sweep.elapsed() >= self.sweep_every {
                last_sweep = Instant::now();
                self.sweep(&open);
            }
        }
        self.close_all(open);
    }

    /// Returns whether the assignment changed.
    fn command(&self, open: &mut HashMap<i32, Open>, command: Command) -> bool {
        match command {
            Command::Open {
                partition,
                store,
                from,
            } => {
                open.insert(
                    partition,
                    Open {
                        store,
                        position: from,
                        checkpoint: from,
                        moved: Instant::now(),
                        waiters: Vec::new(),
                        stalled: false,
                    },
                );
                true
            }
            Command::Close { partition } => match open.remove(&partition) {
                Some(o) => {
                    if let Err(e) = o.store.sync() {
                        tracing::warn!(journal_partition = partition, error = %e, "journal store sync on close failed");
                    }
                    true
                }
                None => false,
            },
            Command::CatchUp {
                partition,
                target,
                reply,
            } => {
                match open.get_mut(&partition) {
                    Some(o) if o.position >= target => {
                        // Already there (a store opened at a checkpoint at the log end).
                        self.metrics.journal_restores.observe(0.0);
                        let _ = reply.send(());
                    }
                    Some(o) => {
                        if o.waiters.is_empty() {
                            // The stall clock starts when someone waits, not when the
                            // position last moved while nobody needed it to.
                            o.moved = Instant::now();
                        }
                        o.waiters.push((target, reply, Instant::now()));
                    }
                    // Not open (closed meanwhile): dropping `reply` fails the wait, and the
                    // caller opens the store again.
                    None => {}
                }
                false
            }
        }
    }

    fn assign(&self, open: &HashMap<i32, Open>) {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in open {
            if let Err(e) = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(o.position)) {
                tracing::warn!(error = %e, "journal changelog assignment");
            }
        }
        if let Err(e) = self.consumer.assign(&tpl) {
            tracing::warn!(error = %e, "assigning journal changelog partitions failed");
        }
    }

    /// One poll batch, applied to the stores; then positions moved past transaction markers
    /// and aborted records, which take offsets but are never delivered.
    fn read(&self, open: &mut HashMap<i32, Open>) {
        let mut batches: HashMap<i32, Batch> = HashMap::new();
        let (mut count, mut bytes) = (0usize, 0usize);
        let mut wait = Duration::from_millis(100);
        while count < BATCH && bytes < BATCH_BYTES {
            match self.consumer.poll(wait) {
                Some(Ok(m)) => {
                    count += 1;
                    bytes += m.payload().map_or(0, <[u8]>::len);
                    wait = Duration::ZERO;
                    if !open.contains_key(&m.partition()) {
                        continue;
                    }
                    let slot = batches.entry(m.partition()).or_default();
                    slot.1 = m.offset() + 1;
                    let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                        continue;
                    };
                    let entry = match m.payload() {
                        None => None,
                        Some(bytes) => match serde_json::from_slice::<Entry>(bytes) {
                            Ok(e) => Some(e),
                            Err(e) => {
                                tracing::warn!(%key, error = %e, "unreadable journal entry ignored");
                                continue;
                            }
                        },
                    };
                    slot.0.push((key.to_string(), entry));
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the journal changelog");
                    break;
                }
            }
        }
        self.metrics.journal_restored_records.inc_by(count as u64);
        let positions = self.consumer.position().ok();
        let now = now_ms();
        let mut work: Vec<Work<'_>> = Vec::new();
        for (p, o) in open.iter_mut() {
            let (records, mut next) = batches.remove(p).unwrap_or_default();
            if let Some(Offset::Offset(at)) = positions
                .as_ref()
                .and_then(|t| t.find_partition(&self.topic, *p))
                .map(|e| e.offset())
            {
                next = next.max(at);
            }
            if next <= o.checkpoint && records.is_empty() {
                continue;
            }
            let next = next.max(o.checkpoint);
            work.push((*p, o, records, next));
        }
        // Each partition has its own store file, so the partitions of a large round (a cold
        // restore) are applied on two threads.
        let apply = |items: &mut [Work<'_>]| {
            let mut failed = false;
            for (p, o, records, next) in items.iter_mut() {
                match o.store.apply(records, *next, now) {
                    Ok(_) => {
                        o.checkpoint = *next;
                        if *next > o.position {
                            o.position = *next;
                            o.moved = Instant::now();
                        }
                    }
                    Err(e) => {
                        // Read again from the checkpoint: nothing past it was applied.
                        tracing::warn!(journal_partition = *p, error = %e, "applying journal records to the store failed; reading them again");
                        o.position = o.checkpoint;
                        failed = true;
                    }
                }
            }
            failed
        };
        let failed = if count >= 1_000 && work.len() > 1 {
            let half = work.len() / 2;
            let (left, right) = work.split_at_mut(half);
            std::thread::scope(|scope| {
                let other = scope.spawn(|| apply(right));
                let here = apply(left);
                // A panic in the other half is a panic of this thread (the reader stops and
                // the processor with it), as it would be without the split.
                here | other
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        } else {
            apply(&mut work)
        };
        if failed {
            // A new assignment at every partition's applied position: unlike a seek, it cannot
            // half-fail and leave the consumer past records the store never got.
            std::thread::sleep(Duration::from_millis(500));
            self.assign(open);
        }
    }

    /// Answers the waiters whose target was reached; marks restores that do not move.
    fn answer(&self, open: &mut HashMap<i32, Open>) {
        let mut remaining = 0i64;
        let mut stalled = 0i64;
        for (p, o) in open.iter_mut() {
            let position = o.position;
            let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut o.waiters)
                .into_iter()
                .partition(|(target, reply, _)| *target <= position || reply.is_closed());
            o.waiters = waiting;
            for (_, reply, since) in done {
                if !reply.is_closed() {
                    self.metrics
                        .journal_restores
                        .observe(since.elapsed().as_secs_f64());
                }
                let _ = reply.send(());
            }
            let target = o.waiters.iter().map(|w| w.0).max();
            remaining += target.map_or(0, |t| (t - position).max(0));
            let now_stalled = target.is_some() && o.moved.elapsed() >= self.stall_after;
            if now_stalled != o.stalled {
                o.stalled = now_stalled;
                if now_stalled {
                    tracing::error!(
                        journal_partition = p,
                        position,
                        target,
                        stalled_ms = o.moved.elapsed().as_millis() as u64,
                        "journal restore is not making progress; the processor reports not ready until it does"
                    );
                } else {
                    tracing::info!(
                        journal_partition = p,
                        position,
                        "journal restore moving again"
                    );
                }
            }
            stalled += i64::from(o.stalled);
        }
        self.metrics.journal_restore_remaining.set(remaining);
        self.metrics.journal_restore_stalled.set(stalled);
        self.health.set_restore_stalled(stalled > 0);
    }

    fn report(&self, open: &HashMap<i32, Open>) {
        let mut entries = 0u64;
        for (p, o) in open {
            entries += o.store.len().unwrap_or(0);
            if let Some(target) = o.waiters.iter().map(|w| w.0).max() {
                tracing::info!(
                    journal_partition = p,
                    position = o.position,
                    target,
                    remaining = target - o.position,
                    "journal restore in progress"
                );
            }
        }
        self.metrics.journal_store_entries.set(entries as i64);
    }

    fn sweep(&self, open: &HashMap<i32, Open>) {
        let now = now_ms();
        let mut entries = 0u64;
        for (p, o) in open {
            loop {
                match o.store.expire(now, SWEEP_BATCH) {
                    Ok(n) => {
                        self.metrics.journal_expired.inc_by(n as u64);
                        if n < SWEEP_BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(journal_partition = p, error = %e, "sweeping expired journal entries failed");
                        break;
                    }
                }
            }
            entries += o.store.len().unwrap_or(0);
        }
        self.metrics.journal_store_entries.set(entries as i64);
    }

    fn close_all(&self, open: HashMap<i32, Open>) {
        for (p, o) in open {
            if let Err(e) = o.store.sync() {
                tracing::warn!(journal_partition = p, error = %e, "journal store sync on shutdown failed");
            }
        }
        self.health.set_restore_stalled(false);
    }
}

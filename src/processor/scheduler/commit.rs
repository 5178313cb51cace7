//! The scheduler's offsets and endings: revokes (wait for the revoked partitions' work within
//! the deadline, store their watermarks, hand back), the commit tick, and the shutdown drain.

use super::*;
use crate::processor::consumer::{tpl_of, Input, Partition};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

impl Scheduler {
    pub(super) fn on_revoke(&mut self, parts: Vec<Partition>, ack: std_mpsc::SyncSender<()>) {
        let mut dropped = 0;
        let mut epochs = Vec::with_capacity(parts.len());
        for (topic, partition) in &parts {
            epochs.push(self.state_mut(topic, *partition).map_or(0, |s| s.epoch));
            if let Some(state) = self.state_mut(topic, *partition) {
                state.revoking = true;
                state.paused = false;
                dropped += state.buffered;
                state.buffered = 0;
                state.keys.clear();
            }
            self.paused.remove(&(topic.clone(), *partition));
        }
        self.buffered_total -= dropped;
        let revoked: HashSet<&Partition> = parts.iter().collect();
        self.ready
            .retain(|j| !revoked.contains(&(j.topic.clone(), j.partition)));
        self.update_paused_gauge();
        self.metrics.buffered.set(self.buffered_total as i64);
        // A second revoke while one is pending cannot happen (the poll thread is blocked in
        // the first), but if it did, finish the first now rather than lose its ack.
        if let Some(previous) = self.pending_revoke.take() {
            self.release(previous);
        }
        self.pending_revoke = Some(PendingRevoke {
            partitions: parts,
            epochs,
            ack,
            deadline: Instant::now() + Duration::from_millis(self.cfg.rebalance_timeout_ms),
        });
    }

    pub(super) fn finish_revoke_if_done(&mut self) {
        let Some(pending) = &self.pending_revoke else {
            return;
        };
        let idle = pending.partitions.iter().all(|(t, p)| {
            self.partitions
                .get(&**t)
                .and_then(|m| m.get(p))
                .is_none_or(|s| s.running == 0)
        });
        if idle || Instant::now() >= pending.deadline {
            if let Some(pending) = self.pending_revoke.take() {
                self.release(pending);
            }
        }
    }

    /// Stores what the revoked partitions finished (librdkafka commits stored offsets when it
    /// unassigns them, inside the rebalance and with the right generation), abandons the
    /// rest, forgets them, and lets the rebalance proceed. Never blocks on the coordinator.
    pub(super) fn release(&mut self, pending: PendingRevoke) {
        let revoked: Vec<(&Partition, u64)> = pending
            .partitions
            .iter()
            .zip(pending.epochs.iter().copied())
            .collect();
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), epoch) in &revoked {
            if let Some(state) = self
                .state_mut(topic, *partition)
                .filter(|s| s.epoch == *epoch)
            {
                if let Some(offset) = state.tracker.committable() {
                    let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset));
                }
            }
        }
        if tpl.count() > 0 {
            match self.consumer.store_offsets(&tpl) {
                Ok(()) => self.metrics.commits.with_label_values(&["stored"]).inc(),
                Err(e) => {
                    self.metrics.commits.with_label_values(&["error"]).inc();
                    tracing::warn!(error = %e, "storing revoked partitions' offsets failed");
                }
            }
        }
        let mut abandoned = 0;
        for run in self.running.values() {
            if revoked
                .iter()
                .any(|((t, p), e)| *t == run.topic && *p == run.partition && *e == run.epoch)
            {
                run.abort.abort();
                abandoned += 1;
            }
        }
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "revoke deadline reached; abandoned in-flight records will be redelivered"
            );
        }
        for ((topic, partition), epoch) in &revoked {
            if let Some(m) = self.partitions.get_mut(&**topic) {
                if m.get(partition).is_some_and(|s| s.epoch == *epoch) {
                    m.remove(partition);
                    self.metrics.forget_partition(topic, *partition);
                }
                if m.is_empty() {
                    self.partitions.remove(&**topic);
                }
            }
        }
        if let Some(j) = &self.worker.journal {
            // Close the lanes: a closed lane fails what is queued in it and never runs
            // init_transactions again, so it cannot fence the next owner.
            let input: Vec<(String, i32)> = revoked
                .iter()
                .map(|((t, p), _)| (t.to_string(), *p))
                .collect();
            j.revoked(&input);
        }
        self.metrics
            .assigned_partitions
            .set(self.partitions.values().map(|p| p.len() as i64).sum());
        let _ = pending.ack.send(());
    }

    /// Stores each partition's finished watermark where it moved; librdkafka's auto-commit
    /// commits stored offsets every `commit_interval_ms` and retries failed commits.
    pub(super) fn store_offsets(&mut self) {
        let mut tpl = TopicPartitionList::new();
        for (partition, state) in self.partitions.values_mut().flat_map(|m| m.iter_mut()) {
            if state.revoking {
                continue;
            }
            let Some(offset) = state.tracker.committable() else {
                continue;
            };
            if state.last_stored != Some(offset) {
                let _ = tpl.add_partition_offset(&state.topic, *partition, Offset::Offset(offset));
                state.last_stored = Some(offset);
            }
            let received = state.tracker.next_offset().unwrap_or(offset);
            self.metrics
                .committed_offset_lag
                .with_label_values(&[&*state.topic, &partition.to_string()])
                .set(received - offset);
        }
        if tpl.count() == 0 {
            return;
        }
        let result = self.consumer.store_offsets(&tpl);
        // librdkafka reports per partition; a partition whose store failed is stored again
        // next tick instead of being skipped as unchanged.
        for e in tpl.elements() {
            if e.error().is_err() {
                if let Some(s) = self.state_mut(e.topic(), e.partition()) {
                    s.last_stored = None;
                }
            }
        }
        match result {
            Ok(()) => self.metrics.commits.with_label_values(&["stored"]).inc(),
            Err(e) => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "storing offsets failed; retrying next tick");
            }
        }
    }

    /// Synchronously commits the finished watermark of every partition (shutdown).
    pub(super) fn commit_all(&mut self) {
        let mut tpl = TopicPartitionList::new();
        for (partition, state) in self.partitions.values().flat_map(|m| m.iter()) {
            if let Some(offset) = state.tracker.committable() {
                let _ = tpl.add_partition_offset(&state.topic, *partition, Offset::Offset(offset));
            }
        }
        self.commit_list(&tpl);
    }

    /// Commits `tpl` synchronously (shutdown only): blocks this task for one
    /// round trip to the group coordinator.
    pub(super) fn commit_list(&self, tpl: &TopicPartitionList) {
        if tpl.count() == 0 {
            return;
        }
        // Store first: with auto-commit on, librdkafka commits the *stored* offsets again when
        // it unassigns and closes, which would otherwise roll this commit back a tick.
        if let Err(e) = self.consumer.store_offsets(tpl) {
            tracing::debug!(error = %e, "storing offsets before the commit failed");
        }
        let result = tokio::task::block_in_place(|| self.consumer.commit(tpl, CommitMode::Sync));
        match result {
            Ok(()) => self.metrics.commits.with_label_values(&["ok"]).inc(),
            Err(e) => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "offset commit failed; unfinished work will be redelivered");
            }
        }
    }

    /// Stops intake: readiness off, all partitions paused. Waiting records *below* a record
    /// that already started are kept and finished too, so the final commit covers every
    /// finished record and a restart redoes nothing; waiting records above it are dropped
    /// (unfinished, so uncommitted, and redelivered later).
    pub(super) fn begin_drain(&mut self) {
        tracing::info!(
            in_flight = self.tasks.len(),
            "draining: intake stopped, finishing in-flight work"
        );
        self.draining = true;
        self.health.set_ready(false);
        // Records waiting for a dependency (an open breaker) give up now, unfinished.
        self.worker.drain.cancel();
        let all: Vec<Partition> = self
            .partitions
            .iter()
            .flat_map(|(t, m)| m.keys().map(move |p| (t.clone(), *p)))
            .collect();
        if let Err(e) = self.consumer.pause(&tpl_of(&all)) {
            tracing::debug!(error = %e, "pausing for shutdown failed");
        }
        let mut limit: HashMap<Partition, i64> = HashMap::new();
        for run in self.running.values() {
            let e = limit
                .entry((run.topic.clone(), run.partition))
                .or_insert(-1);
            *e = (*e).max(run.offset);
        }
        let limit_of = |t: &Arc<str>, p: i32| limit.get(&(t.clone(), p)).copied().unwrap_or(-1);
        let mut dropped: HashMap<Partition, usize> = HashMap::new();
        self.ready.retain(|j| {
            let keep = j.record.offset() < limit_of(&j.topic, j.partition);
            if !keep {
                *dropped.entry((j.topic.clone(), j.partition)).or_default() += 1;
            }
            keep
        });
        for (topic, parts) in self.partitions.iter_mut() {
            for (partition, state) in parts.iter_mut() {
                let lim = limit_of(topic, *partition);
                let mut n = dropped.remove(&(topic.clone(), *partition)).unwrap_or(0);
                for waiting in state.keys.values_mut() {
                    while waiting.back().is_some_and(|(r, _)| r.offset() >= lim) {
                        waiting.pop_back();
                        n += 1;
                    }
                }
                state.buffered -= n;
                self.buffered_total -= n;
            }
        }
        self.metrics.buffered.set(self.buffered_total as i64);
    }

    pub(super) async fn shutdown(mut self, mut rx: mpsc::Receiver<Input>, stop: Arc<AtomicBool>) {
        self.draining = true;
        self.health.set_ready(false);
        // Records waiting for a dependency (an open breaker) give up now, unfinished.
        self.worker.drain.cancel();
        self.tasks.shutdown().await;
        if let Some(pending) = self.pending_revoke.take() {
            self.release(pending);
        }
        self.commit_all();
        tokio::task::block_in_place(|| self.worker.dlq.flush(Duration::from_secs(5)));
        if let Some(j) = &self.worker.journal {
            // The stores become durable at their checkpoints, so the next start reads only
            // the changelog's tail.
            tokio::task::block_in_place(|| j.close());
        }
        tracing::info!("final offsets committed");
        stop.store(true, Ordering::Release);
        // Hang up so a poll thread blocked on a full channel wakes, answer any revoke it
        // sends while closing, then let it close the consumer.
        rx.close();
        drop(self);
        while let Some(input) = rx.recv().await {
            if let Input::Revoke(_, ack) = input {
                let _ = ack.send(());
            }
        }
    }
}

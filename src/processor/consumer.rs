//! The Kafka consumer-group member and its poll loop.
//!
//! A dedicated OS thread owns the poll loop. It never waits on processing: it forwards each
//! record to the scheduler over a bounded channel and keeps polling, so a slow step can never
//! trip `max.poll.interval.ms`. Memory stays bounded because the scheduler pauses partitions
//! whose buffers are full (librdkafka then stops fetching them).
//!
//! Rebalance callbacks run on this thread inside `poll`. On revoke, the callback hands the
//! revoked partitions to the scheduler and blocks until the scheduler has drained their
//! in-flight work (up to `processor.rebalance_timeout_ms`) and stored their finished
//! offsets. Only then does librdkafka commit the stored offsets and give the partitions away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;
use tokio::sync::mpsc;

use crate::telemetry::{Health, Metrics};

/// A topic-partition.
pub type Partition = (Arc<str>, i32);

/// What the poll thread tells the scheduler, in the order it happened.
pub enum Input {
    /// A record.
    Record(OwnedMessage),
    /// Partitions were assigned.
    Assign(Vec<Partition>),
    /// Partitions are being revoked; reply on the sender when they may go.
    Revoke(Vec<Partition>, std_mpsc::SyncSender<()>),
}

/// librdkafka callbacks: rebalances, commits, statistics and errors.
pub struct Context {
    tx: mpsc::Sender<Input>,
    metrics: Arc<Metrics>,
    /// Set while the consumer closes (or the poll thread died): rebalance callbacks then skip
    /// the scheduler handshake.
    pub(crate) closing: Arc<AtomicBool>,
    revoke_wait: Duration,
    /// A static member (`group.instance.id`) does not leave the group when it stops, so
    /// that its restart gets its partitions back without a rebalance.
    static_member: bool,
}

impl Context {
    fn partitions(tpl: &TopicPartitionList) -> Vec<Partition> {
        tpl.elements()
            .iter()
            .map(|e| (Arc::from(e.topic()), e.partition()))
            .collect()
    }
}

impl ClientContext for Context {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                // Partition -1 is librdkafka's internal unassigned partition; lag is only
                // meaningful for partitions this member fetches and has a committed offset for.
                if *partition < 0 || p.fetch_state == "none" || p.consumer_lag < 0 {
                    continue;
                }
                self.metrics
                    .consumer_lag
                    .with_label_values(&[topic.as_str(), &partition.to_string()])
                    .set(p.consumer_lag);
            }
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(fac, "librdkafka: {log_message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(fac, "librdkafka: {log_message}"),
            _ => tracing::debug!(fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error
            .rdkafka_error_code()
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| "other".to_string());
        self.metrics.kafka_errors.with_label_values(&[&code]).inc();
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        self.metrics.rebalances.with_label_values(&["revoke"]).inc();
        self.metrics.revoked_partitions.inc_by(tpl.count() as u64);
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        let parts = Self::partitions(tpl);
        tracing::info!(
            partitions = parts.len(),
            "partitions revoked; draining them"
        );
        let (ack_tx, ack_rx) = std_mpsc::sync_channel(1);
        if self.tx.blocking_send(Input::Revoke(parts, ack_tx)).is_err() {
            return; // The scheduler is gone: nothing left to commit.
        }
        if ack_rx.recv_timeout(self.revoke_wait).is_err() {
            tracing::warn!("scheduler did not finish the revoke in time; releasing partitions");
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                let parts = Self::partitions(tpl);
                tracing::info!(partitions = parts.len(), "partitions assigned");
                if !self.closing.load(Ordering::Acquire) {
                    let _ = self.tx.blocking_send(Input::Assign(parts));
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                self.metrics
                    .kafka_errors
                    .with_label_values(&["rebalance"])
                    .inc();
                tracing::error!(error = %e, "rebalance error");
            }
        }
    }
}

/// The consumer type used by the processor.
pub type KafkaConsumer = BaseConsumer<Context>;

/// Creates the consumer and subscribes it. The returned receiver yields its records and
/// rebalance events once [`spawn_poll_thread`] runs.
pub fn create(
    config: &crate::config::Config,
    metrics: Arc<Metrics>,
    channel_capacity: usize,
) -> Result<(Arc<KafkaConsumer>, mpsc::Receiver<Input>), KafkaError> {
    let (tx, rx) = mpsc::channel(channel_capacity);
    let context = Context {
        tx,
        metrics,
        closing: Arc::new(AtomicBool::new(false)),
        // Slightly longer than the scheduler's own deadline, so the scheduler decides.
        revoke_wait: Duration::from_millis(config.processor.rebalance_timeout_ms + 2_000),
        static_member: config.kafka.group_instance_id.is_some(),
    };
    let consumer: KafkaConsumer = crate::kafka::consumer_config(&config.kafka, &config.processor)
        .map_err(|e| KafkaError::ClientCreation(e.to_string()))?
        .create_with_context(context)?;
    let topics: Vec<&str> = config.kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok((Arc::new(consumer), rx))
}

/// Runs the poll loop on its own thread until `stop` is set or the scheduler hangs up.
/// The thread holds the last reference to the consumer and closes it (leaving the group,
/// unless it is a static member) on exit, so the close-time revoke runs here, outside the async runtime.
pub fn spawn_poll_thread(
    consumer: Arc<KafkaConsumer>,
    health: Arc<Health>,
    stop: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    /// Runs however the thread ends, a panic included: no later close may wait on the
    /// scheduler, and the scheduler learns that nobody polls any more.
    struct Exit {
        closing: Arc<AtomicBool>,
        alive: Arc<AtomicBool>,
    }
    impl Drop for Exit {
        fn drop(&mut self) {
            self.closing.store(true, Ordering::Release);
            self.alive.store(false, Ordering::Release);
        }
    }
    std::thread::Builder::new()
        .name("spillway-poll".into())
        .spawn(move || {
            let _exit = Exit {
                closing: consumer.context().closing.clone(),
                alive: alive.clone(),
            };
            while !stop.load(Ordering::Acquire) {
                health.progress();
                match consumer.poll(Duration::from_millis(100)) {
                    None => {}
                    Some(Ok(msg)) => {
                        let owned = msg.detach();
                        if consumer
                            .context()
                            .tx
                            .blocking_send(Input::Record(owned))
                            .is_err()
                        {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        let code = e
                            .rdkafka_error_code()
                            .map(|c| format!("{c:?}"))
                            .unwrap_or_else(|| "other".to_string());
                        consumer
                            .context()
                            .metrics
                            .kafka_errors
                            .with_label_values(&[&code])
                            .inc();
                        if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
                            // The consumer can never fetch again (for example another live
                            // instance took this group.instance.id). Stop, so the scheduler
                            // shuts down with an error and the process is restarted, instead
                            // of idling with green probes.
                            tracing::error!(error = %e, "fatal consumer error; stopping");
                            alive.store(false, Ordering::Release);
                            break;
                        }
                        tracing::warn!(error = %e, "consumer poll error");
                    }
                }
            }
            consumer.context().closing.store(true, Ordering::Release);
            // Unsubscribing leaves the group; a static member stays in it until its session
            // times out (closing sends no LeaveGroup for it), so its restart is not a rebalance.
            if !consumer.context().static_member {
                consumer.unsubscribe();
            }
            // Wait until the scheduler has dropped its reference; then dropping ours closes
            // the consumer and leaves the group from this thread.
            let mut consumer = consumer;
            loop {
                match Arc::try_unwrap(consumer) {
                    Ok(c) => {
                        drop(c);
                        break;
                    }
                    Err(c) => {
                        consumer = c;
                        let _ = consumer.poll(Duration::from_millis(50));
                    }
                }
            }
            tracing::info!("consumer closed");
        })
}

/// Adds one partition to a topic-partition list.
pub(crate) fn tpl_of<'a>(parts: impl IntoIterator<Item = &'a Partition>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in parts {
        tpl.add_partition(t, *p);
    }
    tpl
}

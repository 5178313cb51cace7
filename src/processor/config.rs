//! The processor's configuration: `[processor]` (scheduling, buffering, offsets, lifecycle,
//! retries) and `[dlq]`.

use std::time::Duration;

use serde::Deserialize;

use crate::config::{bounded, duration_ms, ConfigError};
use crate::fair::FairnessConfig;
use crate::kafka::KafkaConfig;

/// Processor scheduling, buffering, offsets and lifecycle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorConfig {
    /// Global limit of events being processed at once, across all partitions. Events waiting
    /// on a spent budget do not count, up to this many of them.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Records a partition may hold waiting (not yet started) before it is paused.
    /// It resumes when the buffer has drained to half.
    #[serde(default = "default_max_buffered_per_partition")]
    pub max_buffered_per_partition: usize,
    /// Records all partitions together may hold waiting before intake pauses (with
    /// `processor.fairness`, only for the sources holding at least an equal share, up to
    /// twice this plus the poll thread's hand-over).
    #[serde(default = "default_max_buffered_total")]
    pub max_buffered_total: usize,
    /// How often finished offsets are stored and committed, in milliseconds.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// On SIGTERM/SIGINT, how long in-flight work may take to finish before it is abandoned
    /// (and redelivered later), in milliseconds.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// On a partition revoke, how long in-flight work of the revoked partitions may take to
    /// finish before their offsets are committed and the partitions released, in milliseconds.
    #[serde(default = "default_rebalance_timeout_ms")]
    pub rebalance_timeout_ms: u64,
    /// Retry policy for transient step errors.
    #[serde(default)]
    pub retry: RetryConfig,
    /// What happens to an event that no `[[pipelines]]` entry takes: `dead_letter` (reason
    /// `no_pipeline`, replayable) or `skip` (counted in `spillway_unmatched_events_total`).
    #[serde(default)]
    pub unmatched: Unmatched,
    /// How the in-flight slots and each LLM account's admission are shared between sources, so
    /// one source's backlog cannot hold back another's fresh events.
    #[serde(default)]
    pub fairness: FairnessConfig,
}

/// What happens to an event no pipeline takes (`processor.unmatched`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Written to the DLQ with reason `no_pipeline`, so it can be replayed once a pipeline
    /// takes it.
    #[default]
    DeadLetter,
    /// Counted (`spillway_unmatched_events_total`) and skipped.
    Skip,
}

/// Exponential backoff with full jitter for transient errors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts per step, the first included. After the last, the record is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Backoff cap for the first retry, in milliseconds; it doubles per attempt.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Upper bound of any single backoff, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

/// Dead-letter queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqConfig {
    /// Topic that receives records that failed deterministically or exhausted their retries.
    pub topic: String,
}

fn default_max_in_flight() -> usize {
    1024
}

fn default_max_buffered_per_partition() -> usize {
    2_000
}

fn default_max_buffered_total() -> usize {
    20_000
}

fn default_commit_interval_ms() -> u64 {
    1_000
}

fn default_shutdown_timeout_ms() -> u64 {
    25_000
}

fn default_rebalance_timeout_ms() -> u64 {
    10_000
}

fn default_max_attempts() -> u32 {
    5
}

fn default_initial_backoff_ms() -> u64 {
    200
}

fn default_max_backoff_ms() -> u64 {
    30_000
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            max_in_flight: default_max_in_flight(),
            max_buffered_per_partition: default_max_buffered_per_partition(),
            max_buffered_total: default_max_buffered_total(),
            commit_interval_ms: default_commit_interval_ms(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
            rebalance_timeout_ms: default_rebalance_timeout_ms(),
            retry: RetryConfig::default(),
            unmatched: Unmatched::default(),
            fairness: FairnessConfig::default(),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_max_attempts(),
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

impl ProcessorConfig {
    /// Capacity of the channel from the poll thread to the scheduler: records it may have
    /// handed over before a pause takes effect.
    pub fn handover_capacity(&self) -> usize {
        self.max_buffered_per_partition.clamp(256, 4096)
    }

    /// Commit interval as a duration.
    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }
}

impl ProcessorConfig {
    /// The `[processor]` section's rules, and its timing against `[kafka]`'s.
    pub fn validate(&self, kafka: &KafkaConfig) -> Result<(), ConfigError> {
        let p = self;
        for (key, v, min) in [
            ("processor.commit_interval_ms", p.commit_interval_ms, 1),
            ("processor.shutdown_timeout_ms", p.shutdown_timeout_ms, 0),
            ("processor.rebalance_timeout_ms", p.rebalance_timeout_ms, 0),
            (
                "processor.retry.initial_backoff_ms",
                p.retry.initial_backoff_ms,
                0,
            ),
            ("processor.retry.max_backoff_ms", p.retry.max_backoff_ms, 0),
        ] {
            duration_ms(key, v, min)?;
        }
        for (key, v, min, max) in [
            (
                "processor.max_in_flight",
                p.max_in_flight as u64,
                1,
                1_000_000,
            ),
            (
                "processor.max_buffered_per_partition",
                p.max_buffered_per_partition as u64,
                2,
                10_000_000,
            ),
            (
                "processor.max_buffered_total",
                p.max_buffered_total as u64,
                2,
                100_000_000,
            ),
            (
                "processor.retry.max_attempts",
                p.retry.max_attempts.into(),
                1,
                1_000,
            ),
        ] {
            bounded(key, v, min, max, "")?;
        }
        if p.max_buffered_total < p.max_buffered_per_partition {
            return Err(ConfigError::invalid(
                "processor.max_buffered_total",
                "must be at least processor.max_buffered_per_partition",
            ));
        }
        // The poll thread waits inside the revoke callback for up to rebalance_timeout_ms plus
        // a 2 s hand-over margin; it must be back polling before max.poll.interval.ms.
        if p.rebalance_timeout_ms.saturating_add(2_000) >= kafka.max_poll_interval_ms {
            return Err(ConfigError::invalid(
                "processor.rebalance_timeout_ms",
                format!(
                    "must be at least 2000 ms below kafka.max_poll_interval_ms ({} ms): the poll \
                     loop waits for revoked work inside the rebalance callback",
                    kafka.max_poll_interval_ms
                ),
            ));
        }
        p.fairness.validate()?;
        if p.retry.initial_backoff_ms > p.retry.max_backoff_ms {
            return Err(ConfigError::invalid(
                "processor.retry.initial_backoff_ms",
                "must not exceed processor.retry.max_backoff_ms",
            ));
        }
        Ok(())
    }
}

impl DlqConfig {
    /// The DLQ topic is set and is never an input topic, so a poison record cannot loop.
    pub fn validate(&self, inputs: &[String]) -> Result<(), ConfigError> {
        if self.topic.trim().is_empty() {
            return Err(ConfigError::invalid("dlq.topic", "must not be empty"));
        }
        if inputs.contains(&self.topic) {
            return Err(ConfigError::invalid(
                "dlq.topic",
                "must not be one of kafka.topics (a poison record would loop)",
            ));
        }
        Ok(())
    }
}

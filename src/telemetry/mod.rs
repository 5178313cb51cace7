//! The one home of telemetry: every Prometheus collector is built here, logging is set up
//! here, and the `/metrics`, `/healthz` and `/readyz` endpoints are served from here.
//!
//! Names follow Prometheus conventions (`spillway_` prefix, base units, `_total` counters).
//! Labels are bounded: pipeline, topic, partition, step, outcome, reason. Never keys, ids or
//! error text.

mod ingress;
pub use ingress::IngressMetrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{duration_ms, ConfigError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default `info` filter.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` fails only if a subscriber is already installed (tests): keep that one.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Every collector of the processor.
pub struct Metrics {
    registry: Registry,
    /// Events being processed right now.
    pub inflight: IntGauge,
    /// Records received but not started yet (look-ahead buffers).
    pub buffered: IntGauge,
    /// Events finished, by pipeline, topic and outcome (`succeeded`, `dead_lettered`,
    /// `skipped`).
    pub events: IntCounterVec,
    /// Events no pipeline takes, by topic (then skipped or dead-lettered, `processor.unmatched`).
    pub unmatched: IntCounterVec,
    /// Wall time of one step attempt, by pipeline, step and outcome.
    pub step_duration: HistogramVec,
    /// Retries scheduled after transient errors, by pipeline, step and reason.
    pub retries: IntCounterVec,
    /// Records written to the DLQ, by reason.
    pub dlq_records: IntCounterVec,
    /// Failed attempts to write to the DLQ (the record stays unfinished and is retried).
    pub dlq_write_errors: IntCounter,
    /// Partitions currently paused because their buffers are full.
    pub paused_partitions: IntGauge,
    /// Pause and resume operations.
    pub pause_events: IntCounterVec,
    /// Rebalance callbacks, by kind (`assign`, `revoke`).
    pub rebalances: IntCounterVec,
    /// Partitions revoked from this instance by rebalances.
    pub revoked_partitions: IntCounter,
    /// Partitions currently assigned to this instance.
    pub assigned_partitions: IntGauge,
    /// High watermark minus committed offset, as kafka_consumergroup_lag reports it.
    pub consumer_lag: IntGaugeVec,
    /// Records received from Kafka but not yet covered by the committed offset.
    pub committed_offset_lag: IntGaugeVec,
    /// Offset stores (`stored`, periodic; librdkafka commits them) and synchronous commits on
    /// revoke and shutdown (`ok`, `error`).
    pub commits: IntCounterVec,
    /// Errors reported by the Kafka client, by code.
    pub kafka_errors: IntCounterVec,
    /// Records whose value could not be decoded, by reason.
    pub decode_errors: IntCounterVec,
    /// Time from the record's Kafka timestamp to its completion, by pipeline.
    pub end_to_end: HistogramVec,
    /// Step runs deferred because a dependency is throttling or down, by pipeline, step and
    /// reason.
    pub deferrals: IntCounterVec,
    /// Steps not run for an event because their condition (`when`, `route`) was false.
    pub step_skips: IntCounterVec,
    /// LLM tokens (input + output) one event cost, over all its calls, by pipeline.
    pub event_tokens: HistogramVec,
    /// USD one event cost, over all its calls, by pipeline.
    pub event_cost: HistogramVec,
    /// Events skipped because the journal says they are done (duplicates within the TTL),
    /// by pipeline and topic.
    pub duplicates: IntCounterVec,
    /// Steps not run again because the journal holds their result, by pipeline and step.
    pub journal_reused: IntCounterVec,
    /// Journal entry writes, by outcome (`ok`, `error`).
    pub journal_writes: IntCounterVec,
    /// Time from a journal write to Kafka's acknowledgement.
    pub journal_write_duration: Histogram,
    /// Time an event waited for its journal partition's store to catch up with the topic.
    pub journal_restores: Histogram,
    /// Journal records read from the changelog (restores and the tail).
    pub journal_restored_records: IntCounter,
    /// Entries in the open journal partition stores (live or not yet swept).
    pub journal_store_entries: IntGauge,
    /// Entries swept from the stores past their TTL.
    pub journal_expired: IntCounter,
    /// Records the restores being waited on still have to read.
    pub journal_restore_remaining: IntGauge,
    /// Journal partitions whose restore has not moved for `journal.restore_stall_ms`.
    pub journal_restore_stalled: IntGauge,
    /// Stores found unusable (unreadable, another layout, ahead of the topic) and rebuilt.
    pub journal_store_rebuilds: IntCounter,
    /// Events that waited for another copy of themselves to finish.
    pub journal_waits: IntCounter,
    /// Kafka transactions of sink records with their journal entries, by outcome.
    pub journal_transactions: IntCounterVec,
    /// Records per transaction (group commit: every request waiting in the lane).
    pub journal_transaction_records: Histogram,
    /// Time from `begin_transaction` to the end of the commit or abort.
    pub journal_transaction_duration: Histogram,
    /// Time from the record's Kafka timestamp to the end of its processing, by the fairness
    /// class it was shared in (its source, `processor.fairness`), bounded: see
    /// [`Metrics::source_label`].
    pub source_end_to_end: HistogramVec,
    /// Each spend budget's cap, in its unit (USD or tokens), by budget.
    pub budget_limit: GaugeVec,
    /// What every instance spent against each budget in its current period, reservations in
    /// flight included, by budget.
    pub budget_spent: GaugeVec,
    /// 1 while a budget has had no room for a call this period, by budget.
    pub budget_exhausted: GaugeVec,
    /// Events waiting on a spent budget (holding no in-flight slot).
    pub budget_waiting: IntGauge,
    /// The `source` label values handed out so far.
    source_labels: std::sync::Mutex<std::collections::HashSet<Arc<str>>>,
    /// LLM collectors.
    pub llm: LlmMetrics,
}

/// Distinct `source` label values before the rest are counted as `other`: sources come from
/// record headers, which a misbehaving producer could fill with unbounded values.
pub const MAX_SOURCE_LABELS: usize = 32;

/// Collectors of the LLM stage.
pub struct LlmMetrics {
    /// Wall time of one provider request, by model and outcome.
    pub request_duration: HistogramVec,
    /// Tokens the providers counted, by model and kind (`input`, `output`).
    pub tokens: IntCounterVec,
    /// Spend from the price table, by model.
    pub cost_usd: CounterVec,
    /// Time a request waited for admission (rate limits, `Retry-After`), by model.
    pub admission_wait: HistogramVec,
    /// 429 rate-limit answers received, by model.
    pub rate_limited: IntCounterVec,
    /// Breaker state per provider: 0 closed, 1 half-open, 2 open.
    pub breaker_state: IntGaugeVec,
    /// Breaker transitions, by provider and new state.
    pub breaker_transitions: IntCounterVec,
    /// Requests sent to a fallback instead of the primary, by the fallback's model.
    pub fallbacks: IntCounterVec,
    /// Repair requests after invalid structured output, by model.
    pub repairs: IntCounterVec,
    /// Conditions that need a human (`insufficient_quota`, `auth`), by provider and reason.
    pub alerts: IntCounterVec,
}

impl Metrics {
    /// Builds and registers every collector in a fresh registry.
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        macro_rules! reg {
            ($c:expr) => {{
                let c = $c;
                // Registration only fails on a duplicate name, which this constructor rules out.
                registry
                    .register(Box::new(c.clone()))
                    .expect("collector names are unique");
                c
            }};
        }
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let latency_buckets = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let m = Metrics {
            inflight: reg!(gauge(
                "spillway_inflight_events",
                "Events being processed right now."
            )),
            buffered: reg!(gauge(
                "spillway_buffered_records",
                "Records received from Kafka and waiting to start (look-ahead buffers)."
            )),
            events: reg!(counter_vec(
                "spillway_events_total",
                "Events finished, by pipeline, topic and outcome.",
                &["pipeline", "topic", "outcome"]
            )),
            unmatched: reg!(counter_vec(
                "spillway_unmatched_events_total",
                "Events no pipeline takes (then skipped or dead-lettered, per processor.unmatched).",
                &["topic"]
            )),
            step_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "spillway_step_duration_seconds",
                    "Wall time of one step attempt."
                )
                .buckets(latency_buckets.clone()),
                &["pipeline", "step", "outcome"]
            )
            .expect("valid metric")),
            retries: reg!(counter_vec(
                "spillway_step_retries_total",
                "Retries scheduled after transient step errors.",
                &["pipeline", "step", "reason"]
            )),
            dlq_records: reg!(counter_vec(
                "spillway_dlq_records_total",
                "Records written to the dead-letter topic.",
                &["reason"]
            )),
            dlq_write_errors: reg!(IntCounter::new(
                "spillway_dlq_write_errors_total",
                "Failed writes to the dead-letter topic (the record stays unfinished and is retried)."
            )
            .expect("valid metric")),
            paused_partitions: reg!(gauge(
                "spillway_paused_partitions",
                "Partitions paused because their look-ahead buffers are full."
            )),
            pause_events: reg!(counter_vec(
                "spillway_partition_pauses_total",
                "Partition pause and resume operations.",
                &["action"]
            )),
            rebalances: reg!(counter_vec(
                "spillway_rebalances_total",
                "Consumer-group rebalance callbacks.",
                &["kind"]
            )),
            revoked_partitions: reg!(IntCounter::new(
                "spillway_revoked_partitions_total",
                "Partitions revoked from this instance (eager assignment revokes every partition at each rebalance; incremental only those that move)."
            )
            .expect("valid metric")),
            assigned_partitions: reg!(gauge(
                "spillway_assigned_partitions",
                "Partitions assigned to this instance."
            )),
            consumer_lag: reg!(gauge_vec(
                "spillway_consumer_lag",
                "High watermark minus committed offset (kafka_consumergroup_lag).",
                &["topic", "partition"]
            )),
            committed_offset_lag: reg!(gauge_vec(
                "spillway_committed_offset_lag",
                "Records received from Kafka but not yet covered by the committed offset.",
                &["topic", "partition"]
            )),
            commits: reg!(counter_vec(
                "spillway_offset_commits_total",
                "Periodic offset stores (outcome=stored, committed by librdkafka) and synchronous commits on revoke and shutdown (ok, error).",
                &["outcome"]
            )),
            kafka_errors: reg!(counter_vec(
                "spillway_kafka_errors_total",
                "Errors reported by the Kafka client.",
                &["code"]
            )),
            decode_errors: reg!(counter_vec(
                "spillway_decode_errors_total",
                "Record values that could not be decoded.",
                &["reason"]
            )),
            end_to_end: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "spillway_end_to_end_seconds",
                    "Time from the record's Kafka timestamp to the end of its processing."
                )
                .buckets(latency_buckets.clone()),
                &["pipeline"]
            )
            .expect("valid metric")),
            deferrals: reg!(counter_vec(
                "spillway_step_deferrals_total",
                "Step runs deferred because a dependency is throttling or down (not failures).",
                &["pipeline", "step", "reason"]
            )),
            step_skips: reg!(counter_vec(
                "spillway_step_skips_total",
                "Steps not run for an event because their condition (when, route) was false.",
                &["pipeline", "step"]
            )),
            event_tokens: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "spillway_event_llm_tokens",
                    "LLM tokens (input plus output) one event cost over all its calls."
                )
                .buckets(prometheus::exponential_buckets(10.0, 2.0, 16).expect("valid buckets")),
                &["pipeline"]
            )
            .expect("valid metric")),
            event_cost: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "spillway_event_llm_cost_usd",
                    "USD one event cost over all its LLM calls, from the configured price table."
                )
                .buckets(prometheus::exponential_buckets(1e-6, 4.0, 14).expect("valid buckets")),
                &["pipeline"]
            )
            .expect("valid metric")),
            duplicates: reg!(counter_vec(
                "spillway_duplicates_total",
                "Events skipped as duplicates: the journal holds them as done within their TTL.",
                &["pipeline", "topic"]
            )),
            journal_reused: reg!(counter_vec(
                "spillway_journal_reused_steps_total",
                "Steps not run again because the journal holds their result (no second LLM call).",
                &["pipeline", "step"]
            )),
            journal_writes: reg!(counter_vec(
                "spillway_journal_writes_total",
                "Journal entry writes, by outcome.",
                &["outcome"]
            )),
            journal_write_duration: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "spillway_journal_write_duration_seconds",
                    "Time from a journal write to Kafka's acknowledgement."
                )
                .buckets(latency_buckets.clone())
            )
            .expect("valid metric")),
            journal_restores: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "spillway_journal_restore_duration_seconds",
                    "Time a restore took: from an event asking for its journal partition's store to catch up with the topic's end to the store holding it."
                )
                .buckets(latency_buckets.clone())
            )
            .expect("valid metric")),
            journal_restored_records: reg!(IntCounter::new(
                "spillway_journal_restored_records_total",
                "Journal records read from the changelog topic into the local stores (restores, then the tail)."
            )
            .expect("valid metric")),
            journal_store_entries: reg!(IntGauge::new(
                "spillway_journal_store_entries",
                "Entries in the open journal partition stores, live or not yet swept."
            )
            .expect("valid metric")),
            journal_expired: reg!(IntCounter::new(
                "spillway_journal_expired_entries_total",
                "Journal entries swept from the local stores past their TTL."
            )
            .expect("valid metric")),
            journal_restore_remaining: reg!(IntGauge::new(
                "spillway_journal_restore_remaining_records",
                "Offsets the journal restores being waited on still have to read."
            )
            .expect("valid metric")),
            journal_restore_stalled: reg!(IntGauge::new(
                "spillway_journal_restore_stalled",
                "Journal partitions whose restore has not moved for journal.restore_stall_ms; the processor is not ready while this is above 0."
            )
            .expect("valid metric")),
            journal_store_rebuilds: reg!(IntCounter::new(
                "spillway_journal_store_rebuilds_total",
                "Journal stores found unusable (unreadable, another layout, ahead of the topic) and rebuilt from the topic."
            )
            .expect("valid metric")),
            journal_waits: reg!(IntCounter::new(
                "spillway_journal_waits_total",
                "Events that waited for another copy of themselves to finish."
            )
            .expect("valid metric")),
            journal_transactions: reg!(counter_vec(
                "spillway_journal_transactions_total",
                "Kafka transactions of sink records with their journal entries, by outcome (committed; aborted: nothing visible; unknown: the lane was closed and the journal is read again).",
                &["outcome"]
            )),
            journal_transaction_records: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "spillway_journal_transaction_records",
                    "Records per transaction: every request waiting in a partition's lane is committed together."
                )
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 11).expect("valid buckets"))
            )
            .expect("valid metric")),
            journal_transaction_duration: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "spillway_journal_transaction_duration_seconds",
                    "Time from begin_transaction to the end of the commit or abort."
                )
                .buckets(latency_buckets.clone())
            )
            .expect("valid metric")),
            llm: LlmMetrics {
                request_duration: reg!(HistogramVec::new(
                    HistogramOpts::new(
                        "spillway_llm_request_duration_seconds",
                        "Wall time of one LLM provider request."
                    )
                    .buckets(latency_buckets.clone()),
                    &["model", "outcome"]
                )
                .expect("valid metric")),
                tokens: reg!(counter_vec(
                    "spillway_llm_tokens_total",
                    "Tokens the providers counted, by kind (input, output).",
                    &["model", "kind"]
                )),
                cost_usd: reg!(CounterVec::new(
                    Opts::new(
                        "spillway_llm_cost_usd_total",
                        "LLM spend from the configured price table."
                    ),
                    &["model"]
                )
                .expect("valid metric")),
                admission_wait: reg!(HistogramVec::new(
                    HistogramOpts::new(
                        "spillway_llm_admission_wait_seconds",
                        "Time a request waited for admission (rate limits and Retry-After)."
                    )
                    .buckets(latency_buckets.clone()),
                    &["model"]
                )
                .expect("valid metric")),
                rate_limited: reg!(counter_vec(
                    "spillway_llm_rate_limited_total",
                    "429 rate-limit answers received from providers.",
                    &["model"]
                )),
                breaker_state: reg!(gauge_vec(
                    "spillway_llm_breaker_state",
                    "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open.",
                    &["provider"]
                )),
                breaker_transitions: reg!(counter_vec(
                    "spillway_llm_breaker_transitions_total",
                    "Circuit breaker transitions, by new state.",
                    &["provider", "state"]
                )),
                fallbacks: reg!(counter_vec(
                    "spillway_llm_fallbacks_total",
                    "Requests sent to a fallback because the providers before it were unavailable.",
                    &["model"]
                )),
                repairs: reg!(counter_vec(
                    "spillway_llm_repairs_total",
                    "Repair requests after structured output failed validation.",
                    &["model"]
                )),
                alerts: reg!(counter_vec(
                    "spillway_llm_alerts_total",
                    "Provider conditions that need a human: insufficient_quota, auth.",
                    &["provider", "reason"]
                )),
            },
            source_end_to_end: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "spillway_source_end_to_end_seconds",
                    "Time from the record's Kafka timestamp to the end of its processing, by \
                     source (the first 32 distinct sources; later ones count as other)."
                )
                .buckets(latency_buckets),
                &["source"]
            )
            .expect("valid metric")),
            source_labels: Default::default(),
            budget_limit: reg!(GaugeVec::new(
                Opts::new(
                    "spillway_budget_limit",
                    "Each spend budget's cap per period, in its unit (USD or tokens)."
                ),
                &["budget"]
            )
            .expect("valid metric")),
            budget_spent: reg!(GaugeVec::new(
                Opts::new(
                    "spillway_budget_spent",
                    "Spent against each budget this period by every instance, reservations in \
                     flight included, in its unit."
                ),
                &["budget"]
            )
            .expect("valid metric")),
            budget_exhausted: reg!(GaugeVec::new(
                Opts::new(
                    "spillway_budget_exhausted",
                    "1 while a budget has had no room for a call this period: its events wait."
                ),
                &["budget"]
            )
            .expect("valid metric")),
            budget_waiting: reg!(gauge(
                "spillway_budget_waiting_events",
                "Events waiting on a spent budget."
            )),
            registry,
        };
        Arc::new(m)
    }

    /// The `source` label of a fairness class: its name for the first
    /// [`MAX_SOURCE_LABELS`] distinct ones, `other` after that, `all` without classes.
    pub fn source_label(&self, class: &Arc<str>) -> Arc<str> {
        if class.is_empty() {
            return Arc::from("all");
        }
        let mut known = self.source_labels.lock().unwrap_or_else(|p| p.into_inner());
        if known.contains(class) || known.len() < MAX_SOURCE_LABELS {
            known.insert(class.clone());
            return class.clone();
        }
        Arc::from("other")
    }

    /// Prometheus text exposition of every collector.
    pub fn render(&self) -> String {
        render_registry(&self.registry)
    }

    /// Forgets the per-partition series of a partition this instance no longer owns.
    pub fn forget_partition(&self, topic: &str, partition: i32) {
        let p = partition.to_string();
        let _ = self.consumer_lag.remove_label_values(&[topic, &p]);
        let _ = self.committed_offset_lag.remove_label_values(&[topic, &p]);
    }
}

/// Something the `/metrics` endpoint can render: the processor's [`Metrics`] or the
/// ingress's [`IngressMetrics`].
pub trait Exposition: Send + Sync + 'static {
    /// Prometheus text exposition of every collector.
    fn render(&self) -> String;
}

impl Exposition for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
}

fn render_registry(registry: &Registry) -> String {
    let mut buf = Vec::new();
    // Encoding into a Vec cannot fail for well-formed collectors.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Liveness and readiness state shared between the poll loop and the HTTP endpoints.
pub struct Health {
    last_progress_ms: AtomicU64,
    ready: AtomicBool,
    restore_stalled: AtomicBool,
    store_unavailable: AtomicBool,
    /// The first fatal client error; set once, never cleared.
    fatal: std::sync::OnceLock<String>,
    liveness_timeout: Duration,
}

impl Health {
    /// A fresh state: live (progress stamped now) and not yet ready.
    pub fn new(liveness_timeout: Duration) -> Arc<Health> {
        let h = Health {
            last_progress_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            restore_stalled: AtomicBool::new(false),
            store_unavailable: AtomicBool::new(false),
            fatal: std::sync::OnceLock::new(),
            liveness_timeout,
        };
        h.progress();
        Arc::new(h)
    }

    /// Records that the poll loop went round once.
    pub fn progress(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Marks the service ready or not (false during start-up and shutdown).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// A client failed in a way it cannot recover from (a fatal producer error): liveness
    /// fails from now on and the processor stops with an error. The first reason is kept.
    pub fn set_fatal(&self, why: &str) {
        if self.fatal.set(why.to_string()).is_ok() {
            tracing::error!(
                reason = why,
                "fatal client error; the processor stops and /healthz fails"
            );
        }
    }

    /// Whether a fatal error happened (checked before starting work).
    pub fn is_fatal(&self) -> bool {
        self.fatal.get().is_some()
    }

    /// A journal store cannot be opened (another process holds its file) or opens again.
    pub fn set_store_unavailable(&self, unavailable: bool) {
        self.store_unavailable.store(unavailable, Ordering::Relaxed);
    }

    /// The fatal error, if one happened.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.get().cloned()
    }

    /// Live while the poll loop made progress recently and no client failed fatally. Never
    /// depends on Kafka reachability.
    pub fn is_live(&self) -> bool {
        if self.is_fatal() {
            return false;
        }
        let last = self.last_progress_ms.load(Ordering::Relaxed);
        now_ms().saturating_sub(last) <= self.liveness_timeout.as_millis() as u64
    }

    /// A journal restore stopped making progress (or moves again).
    pub fn set_restore_stalled(&self, stalled: bool) {
        self.restore_stalled.store(stalled, Ordering::Relaxed);
    }

    /// Ready to take work: started, not draining, no journal restore stalled, every journal
    /// store available, no fatal error.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && !self.restore_stalled.load(Ordering::Relaxed)
            && !self.store_unavailable.load(Ordering::Relaxed)
            && !self.is_fatal()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<dyn Exposition>,
    health: Arc<Health>,
}

/// Binds the telemetry HTTP server and serves it until `shutdown` is cancelled.
/// Returns the bound address (useful with port 0) and the server task.
pub async fn serve(
    config: &TelemetryConfig,
    metrics: Arc<dyn Exposition>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(config.metrics_addr).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState { metrics, health });
    let task = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "telemetry server failed");
        }
    });
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok((addr, task))
}

async fn metrics_handler(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.health.is_live() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "poll loop stalled")
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

// ---- Configuration: `[telemetry]` ----

/// Metrics, health endpoints and logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`.
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: SocketAddr,
    /// `/healthz` fails when the poll loop has made no progress for this long, in milliseconds.
    #[serde(default = "default_liveness_timeout_ms")]
    pub liveness_timeout_ms: u64,
    /// Log format: `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

fn default_liveness_timeout_ms() -> u64 {
    30_000
}

fn default_log_format() -> LogFormat {
    LogFormat::Text
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            metrics_addr: default_metrics_addr(),
            liveness_timeout_ms: default_liveness_timeout_ms(),
            log_format: default_log_format(),
        }
    }
}

impl TelemetryConfig {
    /// The `[telemetry]` section's rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        duration_ms("telemetry.liveness_timeout_ms", self.liveness_timeout_ms, 1)
    }
}

#[cfg(test)]
mod tests;

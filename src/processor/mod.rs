//! The processor: a consumer-group member that runs each record through a chain of steps,
//! many records at once, in order per key, committing offsets only past finished work.
//!
//! * [`consumer`]: the poll thread and librdkafka callbacks (rebalances, stats, commits).
//! * [`scheduler`]: per-key ordering, look-ahead buffers, pause/resume, commits, drain.
//! * [`offsets`]: the per-partition low-watermark tracker, the only source of commits.
//! * [`worker`]: one record's life: decode, steps with retries, DLQ.
//! * [`retry`]: backoff. [`dlq`]: the DLQ writer. [`config`]: `[processor]` and `[dlq]`.
//! * [`gate`]: closed by steps whose dependency is down; pauses intake.
//!
//! It knows steps only through the contract in [`crate::step`]; building them from config
//! and starting a processor with them is [`crate::pipeline`]'s job.

pub mod config;
pub mod consumer;
pub mod dlq;
pub mod gate;
pub mod offsets;
pub mod retry;
mod scheduler;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, CodecError};
use crate::config::{Config, ConfigError};
use crate::step::{BuiltPipeline, Pipeline, Pipelines};
use crate::telemetry::{Health, Metrics};
use consumer::{Input, KafkaConsumer};
use gate::Gate;
use worker::Worker;

/// Why the processor could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// Invalid configuration or unreadable secret.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The Kafka client could not be created or the topics not set up.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The codec could not be set up.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// The telemetry endpoint could not be bound.
    #[error("telemetry endpoint {addr}: {source}")]
    Telemetry {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The poll thread could not be started or died.
    #[error("consumer: {0}")]
    Consumer(String),
    /// The journal topic could not be reached or is missing.
    #[error("journal: {0}")]
    Journal(#[from] crate::journal::JournalError),
}

/// A started processor: consumer subscribed, telemetry served. Call [`Processor::run`].
pub struct Processor {
    config: Config,
    consumer: Arc<KafkaConsumer>,
    rx: mpsc::Receiver<Input>,
    worker: Arc<Worker>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    gate: Gate,
    metrics_addr: SocketAddr,
    telemetry: tokio::task::JoinHandle<()>,
    telemetry_stop: CancellationToken,
    shutdown: CancellationToken,
}

impl Processor {
    /// Starts a processor that runs the given steps for every event (one pipeline, `default`,
    /// with fresh metrics and gate).
    pub async fn start(
        config: Config,
        steps: Pipeline,
        shutdown: CancellationToken,
    ) -> Result<Processor, ProcessorError> {
        let pipelines = vec![BuiltPipeline::single(steps)].into();
        Self::start_with(config, pipelines, Metrics::new(), Gate::new(), shutdown).await
    }

    /// Sets everything up: dev topics if configured, the DLQ producer, the codec, the
    /// consumer subscription and the telemetry server. `pipelines` were built against
    /// `metrics` and `gate`. `shutdown` stops it.
    pub async fn start_with(
        config: Config,
        pipelines: Pipelines,
        metrics: Arc<Metrics>,
        gate: Gate,
        shutdown: CancellationToken,
    ) -> Result<Processor, ProcessorError> {
        config.validate()?;
        let health = Health::new(Duration::from_millis(config.telemetry.liveness_timeout_ms));
        // Telemetry outlives the drain, so /metrics and /healthz stay up while it runs.
        let telemetry_stop = CancellationToken::new();
        let (metrics_addr, telemetry) = crate::telemetry::serve(
            &config.telemetry,
            metrics.clone(),
            health.clone(),
            telemetry_stop.clone(),
        )
        .await
        .map_err(|source| ProcessorError::Telemetry {
            addr: config.telemetry.metrics_addr,
            source,
        })?;
        if let Some(partitions) = config.kafka.create_topics_partitions {
            let mut topics: Vec<&str> = config.kafka.topics.iter().map(String::as_str).collect();
            topics.push(&config.dlq.topic);
            let outputs: Vec<String> = (pipelines.iter().flat_map(|p| p.steps.iter()))
                .flat_map(|s| s.output_topics())
                .collect();
            topics.extend(outputs.iter().map(String::as_str));
            crate::kafka::ensure_topics(&config.kafka, &topics, partitions).await?;
            if let Some(j) = &config.journal {
                crate::kafka::ensure_journal_topic(&config.kafka, j, partitions).await?;
            }
        }
        if let Some(j) = &config.journal {
            match crate::kafka::journal_topic_warnings(&config.kafka, j).await {
                Ok(warnings) => {
                    for w in warnings {
                        tracing::warn!("{w}");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not check the journal topic's settings")
                }
            }
        }
        let journal = match &config.journal {
            Some(j) => Some(Arc::new(
                crate::journal::Journal::new(
                    j,
                    &config.kafka,
                    (pipelines.iter().flat_map(|p| p.steps.iter())).any(|s| s.stages_records()),
                    metrics.clone(),
                    health.clone(),
                )
                .await?,
            )),
            None => None,
        };
        let dlq = dlq::DlqWriter::new(
            &config.kafka,
            &config.dlq.topic,
            config.processor.retry.clone(),
            metrics.clone(),
            health.clone(),
        )?;
        let worker = Arc::new(Worker {
            codec: Codec::new(&config.codec)?,
            pipelines,
            unmatched: config.processor.unmatched,
            retry: config.processor.retry.clone(),
            dlq,
            metrics: metrics.clone(),
            drain: CancellationToken::new(),
            journal,
            health: health.clone(),
            consecutive_panics: Default::default(),
            parked: Default::default(),
        });
        let capacity = config.processor.handover_capacity();
        let (consumer, rx) = consumer::create(&config, metrics.clone(), capacity)?;
        tracing::info!(
            topics = ?config.kafka.topics,
            group = %config.kafka.group_id,
            max_in_flight = config.processor.max_in_flight,
            "processor subscribed"
        );
        Ok(Processor {
            config,
            consumer,
            rx,
            worker,
            metrics,
            health,
            gate,
            metrics_addr,
            telemetry,
            telemetry_stop,
            shutdown,
        })
    }

    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The processor's collectors.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Runs until the shutdown token is cancelled; then drains, commits, leaves the group
    /// and returns.
    pub async fn run(self) -> Result<(), ProcessorError> {
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let poll = consumer::spawn_poll_thread(
            self.consumer.clone(),
            self.health.clone(),
            stop.clone(),
            alive.clone(),
        )
        .map_err(|e| ProcessorError::Consumer(e.to_string()))?;
        self.health.set_ready(true);
        let scheduler = scheduler::Scheduler::new(
            self.config.processor.clone(),
            self.consumer,
            self.worker,
            self.metrics,
            self.health,
            self.gate,
        );
        let result = scheduler
            .run(self.rx, self.shutdown.clone(), stop, alive)
            .await;
        // The poll thread closes the consumer (leaving the group, unless static) once it holds the last
        // reference; wait for it off the async threads.
        let _ = tokio::task::spawn_blocking(move || poll.join()).await;
        self.telemetry_stop.cancel();
        let _ = self.telemetry.await;
        tracing::info!("processor stopped");
        result.map_err(|e| ProcessorError::Consumer(e.to_string()))
    }
}

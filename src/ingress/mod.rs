//! The ingress service (`spillway ingress`): signed webhooks in, Avro records in Kafka out,
//! 2xx only after Kafka acknowledged the record.
//!
//! - [`auth`]: signature schemes (Standard Webhooks, GitHub, Stripe, Slack, generic HMAC).
//! - [`replay`]: the cache of delivery ids that makes a replay produce nothing.
//! - [`limit`]: per-IP and per-source rate limits.
//! - [`source`]: one configured source, compiled (secrets, field extraction, JSON Schema).
//! - [`produce`]: envelope encoding, the idempotent producer and its health.
//! - [`http`]: connections, TLS, timeouts and the request path.
//!
//! Ingress never calls the LLM and never consumes: it is stateless apart from the replay
//! cache, so it scales out behind a load balancer.

pub mod auth;
mod body;
pub mod config;
pub mod http;
pub mod limit;
pub mod produce;
pub mod replay;
pub mod source;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ConfigError;
use crate::ingress::config::{IngressConfig, TlsConfig};
use crate::telemetry::{Health, IngressMetrics};

/// Why the ingress could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The configuration could not be turned into a running service.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The source topics could not be created (`kafka.create_topics_partitions`).
    #[error("cannot create topics: {0}")]
    Topics(rdkafka::error::KafkaError),
    /// Records were still unacknowledged when the flush deadline passed.
    #[error("producer flush did not finish: {0}")]
    Flush(rdkafka::error::KafkaError),
}

/// A started ingress: listening, probing Kafka, not yet waiting for shutdown.
pub struct Ingress {
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    shared: Arc<http::Shared>,
    shutdown: CancellationToken,
    /// What the listener and the connections obey: cancelled `shutdown_delay` after
    /// `shutdown`.
    stop: CancellationToken,
    connections: TaskTracker,
    accept: tokio::task::JoinHandle<()>,
    health_task: tokio::task::JoinHandle<()>,
    /// Stops the Kafka probe before the final flush, so no metadata request is in flight
    /// while the producer drains.
    health_stop: CancellationToken,
    health: Arc<Health>,
    serving: Arc<AtomicBool>,
    telemetry: tokio::task::JoinHandle<()>,
    telemetry_stop: CancellationToken,
    shutdown_timeout: Duration,
    shutdown_delay: Duration,
    flush_timeout: Duration,
}

/// Runs the ingress until `shutdown` is cancelled, then drains and flushes.
pub async fn run(config: IngressConfig, shutdown: CancellationToken) -> Result<(), IngressError> {
    Ingress::start(config, shutdown).await?.run().await
}

/// Builds the TLS acceptor from PEM files.
pub fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, ConfigError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        key: format!("server.tls.{key}"),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid("cert_file", format!("{}: {e}", tls.cert_file.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            "cert_file",
            format!("{} holds no certificate", tls.cert_file.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| invalid("key_file", format!("{}: {e}", tls.key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("cert_file", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid("key_file", format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Compiles every source and checks the TLS files, without binding or contacting anything:
/// `spillway ingress --check`.
pub fn check(config: &IngressConfig) -> Result<(), ConfigError> {
    for (name, s) in &config.sources {
        source::Source::new(name, s)?;
    }
    if let Some(tls) = &config.server.tls {
        tls_acceptor(tls)?;
    }
    Ok(())
}

impl Ingress {
    /// Compiles the sources, builds the producer, binds both listeners and starts serving.
    pub async fn start(
        config: IngressConfig,
        shutdown: CancellationToken,
    ) -> Result<Ingress, IngressError> {
        let metrics = IngressMetrics::new();
        let mut sources = HashMap::new();
        for (name, s) in &config.sources {
            sources.insert(name.clone(), Arc::new(source::Source::new(name, s)?));
        }
        let tls = config.server.tls.as_ref().map(tls_acceptor).transpose()?;
        if let Some(partitions) = config.kafka.create_topics_partitions {
            let client =
                crate::kafka::client_config(&config.kafka.brokers, &config.kafka.properties)?;
            let mut topics: Vec<&str> = config.sources.values().map(|s| s.topic.as_str()).collect();
            topics.sort_unstable();
            topics.dedup();
            crate::kafka::create_missing_topics(&client, &topics, partitions)
                .await
                .map_err(IngressError::Topics)?;
        }
        let producer = Arc::new(produce::Producer::new(&config, metrics.clone())?);
        let source_limits = limit::SourceLimits::new(
            sources
                .values()
                .filter_map(|s| s.rate.map(|r| (s.name.as_str(), r))),
        );
        let ip_limit = match &config.server.ip_rate {
            Some(r) => Some(limit::IpLimit::new(*r.get("server.ip_rate")?)),
            None => None,
        };
        let shared = Arc::new(http::Shared {
            sources,
            source_limits,
            ip_limit,
            replay: replay::ReplayCache::with_metrics(
                Duration::from_secs(config.replay.ttl_secs),
                config.replay.max_ids,
                Some(replay::ReplayMetrics {
                    ids: metrics.replay_ids.clone(),
                    early_rotations: metrics.replay_early_rotations.clone(),
                }),
            ),
            producer: producer.clone(),
            metrics: metrics.clone(),
            produces: TaskTracker::new(),
            body_timeout: Duration::from_millis(config.server.body_timeout_ms),
            header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms),
            unavailable_retry_after_secs: config.server.unavailable_retry_after_secs,
            body_budget: Arc::new(tokio::sync::Semaphore::new(
                config
                    .server
                    .max_buffered_body_bytes
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
        });

        let health = Health::new(Duration::from_millis(config.telemetry.liveness_timeout_ms));
        let telemetry_stop = CancellationToken::new();
        let (metrics_addr, telemetry) = crate::telemetry::serve(
            &config.telemetry,
            metrics.clone(),
            health.clone(),
            telemetry_stop.clone(),
        )
        .await
        .map_err(|source| IngressError::Bind {
            addr: config.telemetry.metrics_addr,
            source,
        })?;
        let serving = Arc::new(AtomicBool::new(true));
        let health_stop = CancellationToken::new();
        let health_task = tokio::spawn(produce::watch_health(
            producer,
            health.clone(),
            serving.clone(),
            metrics,
            health_stop.clone(),
        ));

        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| IngressError::Bind {
                addr: config.server.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| IngressError::Bind {
            addr: config.server.listen,
            source,
        })?;
        let connections = TaskTracker::new();
        // The listener and the connections stop `shutdown_delay_ms` after `shutdown`, whether
        // or not `run` is awaiting.
        let stop = CancellationToken::new();
        let delay = Duration::from_millis(config.server.shutdown_delay_ms);
        tokio::spawn({
            let (shutdown, stop) = (shutdown.clone(), stop.clone());
            async move {
                shutdown.cancelled().await;
                tokio::time::sleep(delay).await;
                stop.cancel();
            }
        });
        let accept = tokio::spawn(http::accept_loop(
            listener,
            tls,
            shared.clone(),
            config.server.max_connections,
            stop.clone(),
            connections.clone(),
        ));
        tracing::info!(
            %addr,
            tls = config.server.tls.is_some(),
            sources = ?config.sources.keys().collect::<Vec<_>>(),
            "ingress listening on /webhooks/{{source}}"
        );
        Ok(Ingress {
            addr,
            metrics_addr,
            shared,
            shutdown,
            stop,
            connections,
            accept,
            health_task,
            health_stop,
            health,
            serving,
            telemetry,
            telemetry_stop,
            shutdown_timeout: Duration::from_millis(config.server.shutdown_timeout_ms),
            shutdown_delay: Duration::from_millis(config.server.shutdown_delay_ms),
            flush_timeout: Duration::from_millis(config.kafka.message_timeout_ms),
        })
    }

    /// The webhook listener's address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The telemetry listener's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Serves until shutdown, then: readiness off, keep serving for `shutdown_delay_ms` while
    /// load balancers notice, stop accepting, let every in-flight request
    /// finish (each gets its delivery report) within `shutdown_timeout_ms`, wait for produces
    /// that outlived their requests, and flush the producer.
    pub async fn run(self) -> Result<(), IngressError> {
        self.shutdown.cancelled().await;
        self.serving.store(false, Ordering::Relaxed);
        self.health.set_ready(false);
        tracing::info!(
            delay_ms = self.shutdown_delay.as_millis() as u64,
            "ingress shutting down: readiness off; serving on until the delay passes"
        );
        self.stop.cancelled().await;
        tracing::info!("ingress listener closed, draining in-flight requests");
        let _ = self.accept.await;
        self.connections.close();
        if tokio::time::timeout(self.shutdown_timeout, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                timeout_ms = self.shutdown_timeout.as_millis() as u64,
                "connections still open at the shutdown deadline; closing them"
            );
        }
        // Produces are bounded by the delivery timeout; none is cut short, so no client that
        // got 2xx can be missing from Kafka, and none that is missing got 2xx.
        self.shared.produces.close();
        self.shared.produces.wait().await;
        self.health_stop.cancel();
        let _ = self.health_task.await;
        let producer = self.shared.producer.clone();
        let flush_timeout = self.flush_timeout;
        let flushed = tokio::task::spawn_blocking(move || producer.flush(flush_timeout))
            .await
            .unwrap_or(Ok(()));
        self.telemetry_stop.cancel();
        let _ = self.telemetry.await;
        tracing::info!("ingress stopped");
        flushed.map_err(IngressError::Flush)
    }
}

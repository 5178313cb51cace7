//! The ingress's metric set, registered on its own registry and served like the processor's.

use super::*;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use std::sync::Arc;
use std::time::Duration;

/// Collectors of the ingress service. `source` is a configured source name (or `unknown`),
/// so every label stays bounded.
pub struct IngressMetrics {
    registry: Registry,
    /// Requests by source and outcome: `accepted`, `replay`, `bad_signature`,
    /// `stale_timestamp`, `too_large`, `timeout`, `rate_limited`, `invalid`,
    /// `kafka_unavailable`, `registry_unavailable`, `registry_rejected`, `overloaded` (the
    /// body buffer budget is spent), `disconnected` (the client hung up before the answer),
    /// `unknown_source`, `challenge`.
    pub requests: IntCounterVec,
    /// Wall time from the request head to the response, by source and outcome.
    pub request_duration: HistogramVec,
    /// Time from the send to Kafka's delivery report, by source.
    pub produce_duration: HistogramVec,
    /// Which of a source's secrets verified the signature (index in `secrets`), to see when
    /// an old secret stops being used during a rotation.
    pub secret_matches: IntCounterVec,
    /// Requests being handled right now.
    pub in_flight: IntGauge,
    /// Open connections.
    pub connections: IntGauge,
    /// Request body bytes held in memory right now (bounded by
    /// `server.max_buffered_body_bytes`).
    pub buffered_body_bytes: IntGauge,
    /// Connections closed by the server for a reason other than a normal close, by reason:
    /// `header_timeout` (slowloris or idle), `tls_handshake`, `limit` (max_connections),
    /// `protocol`, `io`.
    pub connections_closed: IntCounterVec,
    /// 1 while the producer reaches Kafka (the readiness signal), else 0.
    pub kafka_up: IntGauge,
    /// Delivery ids the replay cache remembers.
    pub replay_ids: IntGauge,
    /// Replay-cache rotations forced by `replay.max_ids` before the TTL passed.
    pub replay_early_rotations: IntCounter,
}

impl IngressMetrics {
    /// Builds and registers every ingress collector in a fresh registry.
    pub fn new() -> Arc<IngressMetrics> {
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
        let fast_buckets = vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let m = IngressMetrics {
            requests: reg!(IntCounterVec::new(
                Opts::new(
                    "spillway_ingress_requests_total",
                    "Webhook requests by source and outcome."
                ),
                &["source", "outcome"]
            )
            .expect("valid metric")),
            request_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "spillway_ingress_request_duration_seconds",
                    "Time from the request head to the response."
                )
                .buckets(fast_buckets.clone()),
                &["source", "outcome"]
            )
            .expect("valid metric")),
            produce_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "spillway_ingress_produce_duration_seconds",
                    "Time from the send to Kafka's delivery report."
                )
                .buckets(fast_buckets),
                &["source"]
            )
            .expect("valid metric")),
            secret_matches: reg!(IntCounterVec::new(
                Opts::new(
                    "spillway_ingress_secret_matches_total",
                    "Verified signatures by source and the index of the secret that matched."
                ),
                &["source", "secret"]
            )
            .expect("valid metric")),
            in_flight: reg!(IntGauge::new(
                "spillway_ingress_in_flight_requests",
                "Webhook requests being handled."
            )
            .expect("valid metric")),
            connections: reg!(IntGauge::new(
                "spillway_ingress_connections",
                "Open client connections."
            )
            .expect("valid metric")),
            buffered_body_bytes: reg!(IntGauge::new(
                "spillway_ingress_buffered_body_bytes",
                "Request body bytes held in memory."
            )
            .expect("valid metric")),
            connections_closed: reg!(IntCounterVec::new(
                Opts::new(
                    "spillway_ingress_connections_closed_total",
                    "Connections the server cut, by reason."
                ),
                &["reason"]
            )
            .expect("valid metric")),
            kafka_up: reg!(IntGauge::new(
                "spillway_ingress_kafka_up",
                "1 while the producer reaches Kafka."
            )
            .expect("valid metric")),
            replay_ids: reg!(IntGauge::new(
                "spillway_ingress_replay_ids",
                "Delivery ids the replay cache remembers."
            )
            .expect("valid metric")),
            replay_early_rotations: reg!(IntCounter::new(
                "spillway_ingress_replay_early_rotations_total",
                "Replay-cache rotations forced by replay.max_ids before the TTL passed."
            )
            .expect("valid metric")),
            registry,
        };
        Arc::new(m)
    }

    /// Counts one finished request.
    pub fn request(&self, source: &str, outcome: &str, elapsed: Duration) {
        self.requests.with_label_values(&[source, outcome]).inc();
        self.request_duration
            .with_label_values(&[source, outcome])
            .observe(elapsed.as_secs_f64());
    }
}

impl Exposition for IngressMetrics {
    fn render(&self) -> String {
        render_registry(&self.registry)
    }
}

//! The webhook listener: connections, TLS, timeouts, and the request path.
//!
//! Connections are served by hyper's HTTP/1.1 server directly (no router: the only route is
//! `POST /webhooks/{source}`), so every limit is explicit:
//! - `max_connections` permits; a connection beyond them is closed at once;
//! - the TLS handshake and every request head must complete within `header_read_timeout`
//!   (hyper's header timer also runs while a keep-alive connection idles), which cuts off
//!   slowloris clients;
//! - request heads are capped at 64 KiB, bodies at the source's `max_body_bytes` whatever the
//!   framing (a `Content-Length` over the limit is refused before reading; a chunked body is
//!   counted while it streams), and the body must arrive within `body_timeout`;
//! - all bodies held at once share one budget (`max_buffered_body_bytes`): a body that would
//!   overrun it gets 503 with `Retry-After` instead of growing the heap, so memory stays
//!   bounded however many unauthenticated clients send large bodies at once.
//!
//! The request path runs the checks in the order of `../shared/conventions.md`: size,
//! headers present, timestamp, signature (all in [`auth::verify`]), delivery-id dedup,
//! per-source rate limit, schema validation, produce. A cheap per-IP limit runs before all
//! of them. The produce runs in its own task, so a client that hangs up cannot cancel a
//! record half-way: its delivery report still settles the replay-cache claim.

use super::body::{read_body, spawn_drain, too_large, BodyBudget, BodyError};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth;
use super::limit::{retry_after_secs, IpLimit, SourceLimits};
use super::produce::Producer;
use super::replay::{Claim, ReplayCache};
use super::source::{parse_json, Source};
use crate::codec::Envelope;
use crate::telemetry::IngressMetrics;

/// Largest request head (request line plus headers) a connection may buffer.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Everything the request path needs, shared by all connections.
pub struct Shared {
    /// Sources by name.
    pub sources: std::collections::HashMap<String, Arc<Source>>,
    /// Per-source rate limits.
    pub source_limits: SourceLimits,
    /// Optional per-IP limit.
    pub ip_limit: Option<IpLimit>,
    /// Delivery ids already in Kafka (or being produced).
    pub replay: ReplayCache,
    /// The producer.
    pub producer: Arc<Producer>,
    /// Ingress collectors.
    pub metrics: Arc<IngressMetrics>,
    /// Produce tasks, awaited on shutdown before the producer is flushed.
    pub produces: TaskTracker,
    /// Time allowed for a whole body.
    pub body_timeout: Duration,
    /// Time allowed for the TLS handshake and each request head.
    pub header_read_timeout: Duration,
    /// `Retry-After` on a 503.
    pub unavailable_retry_after_secs: u64,
    /// Bytes of request bodies that may be held at once (one permit per byte).
    pub body_budget: Arc<Semaphore>,
}

/// What a request gets back, before it becomes an HTTP response.
pub(super) struct Reply {
    status: StatusCode,
    outcome: &'static str,
    body: serde_json::Value,
    retry_after: Option<u64>,
    /// Close the connection after the response (the request body was not fully read).
    close: bool,
}

impl Reply {
    fn new(status: StatusCode, outcome: &'static str, body: serde_json::Value) -> Reply {
        Reply {
            status,
            outcome,
            body,
            retry_after: None,
            close: false,
        }
    }

    pub(super) fn error(
        status: StatusCode,
        outcome: &'static str,
        message: impl std::fmt::Display,
    ) -> Reply {
        Reply::new(
            status,
            outcome,
            json!({"error": outcome, "message": message.to_string()}),
        )
    }

    fn retry_after(mut self, secs: u64) -> Reply {
        self.retry_after = Some(secs);
        self
    }

    pub(super) fn closing(mut self) -> Reply {
        self.close = true;
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from(self.body.to_string())));
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            h.insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        r
    }
}

/// Accepts connections until `shutdown`, serving each in a task on `connections`. On
/// shutdown every connection finishes its in-flight request and closes.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    max_connections: usize,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let (stream, remote) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly instead of
                    // spinning; established connections keep being served.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared
                .metrics
                .connections_closed
                .with_label_values(&["limit"])
                .inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _permit = permit;
            shared.metrics.connections.inc();
            let metrics = shared.metrics.clone();
            let hrt = shared.header_read_timeout;
            let svc = Svc { shared, remote };
            match tls {
                None => serve_connection(TokioIo::new(stream), svc, hrt, shutdown).await,
                Some(acceptor) => match tokio::time::timeout(hrt, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        serve_connection(TokioIo::new(tls_stream), svc, hrt, shutdown).await
                    }
                    _ => {
                        metrics
                            .connections_closed
                            .with_label_values(&["tls_handshake"])
                            .inc();
                    }
                },
            }
            metrics.connections.dec();
        });
    }
}

async fn serve_connection<I>(
    io: I,
    svc: Svc,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let metrics = svc.shared.metrics.clone();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            // Finish the request in flight (its produce included), then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        let reason = if e.is_timeout() {
            "header_timeout"
        } else if e.is_parse() || e.is_parse_too_large() {
            "protocol"
        } else {
            "io"
        };
        metrics
            .connections_closed
            .with_label_values(&[reason])
            .inc();
        tracing::debug!(error = %e, reason, "connection closed with an error");
    }
}

/// The per-connection hyper service.
#[derive(Clone)]
struct Svc {
    shared: Arc<Shared>,
    remote: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for Svc {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let shared = self.shared.clone();
        let remote = self.remote;
        Box::pin(async move { Ok(handle(shared, remote, req).await) })
    }
}

/// The `secret` label of a matched secret's index, without an allocation for the usual few.
fn secret_label(index: usize) -> std::borrow::Cow<'static, str> {
    const LABELS: [&str; 8] = ["0", "1", "2", "3", "4", "5", "6", "7"];
    match LABELS.get(index) {
        Some(l) => std::borrow::Cow::Borrowed(l),
        None => std::borrow::Cow::Owned(index.to_string()),
    }
}

/// One request in `spillway_ingress_in_flight_requests`. A request hyper drops before it is
/// answered (the client hung up) is counted with the outcome `disconnected`.
struct InFlight {
    metrics: Arc<IngressMetrics>,
    source: Option<Arc<Source>>,
    start: Instant,
    finished: bool,
}

impl InFlight {
    fn new(metrics: Arc<IngressMetrics>, source: Option<Arc<Source>>, start: Instant) -> Self {
        metrics.in_flight.inc();
        InFlight {
            metrics,
            source,
            start,
            finished: false,
        }
    }

    /// The `source` label: the source's name, or `unknown`.
    fn label(&self) -> &str {
        self.source.as_ref().map_or("unknown", |s| s.name.as_str())
    }

    fn finish(&mut self, outcome: &str) {
        self.finished = true;
        self.metrics
            .request(self.label(), outcome, self.start.elapsed());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        if !self.finished {
            self.metrics
                .request(self.label(), "disconnected", self.start.elapsed());
        }
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn handle(
    shared: Arc<Shared>,
    remote: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let start = Instant::now();
    // End-to-end latency starts when the request head arrived, before the body and checks.
    let received_at_ms = unix_ms();
    let path = req.uri().path();
    if path == "/healthz" && req.method() == Method::GET {
        // For load balancers that probe the serving port; readiness lives on the telemetry
        // listener.
        return Reply::new(StatusCode::OK, "ok", json!({"status": "ok"})).into_response();
    }
    let Some(name) = path.strip_prefix("/webhooks/") else {
        return Reply::error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such path; webhooks are POSTed to /webhooks/{source}",
        )
        .into_response();
    };
    let source = shared.sources.get(name).cloned();
    let mut in_flight = InFlight::new(shared.metrics.clone(), source.clone(), start);
    let reply = check_and_produce(&shared, remote, source, req, received_at_ms).await;
    in_flight.finish(reply.outcome);
    let label = in_flight.label();
    if reply.status.is_server_error() {
        tracing::warn!(source = %label, outcome = reply.outcome, "webhook not accepted");
    } else {
        tracing::debug!(source = %label, outcome = reply.outcome, status = %reply.status, "webhook handled");
    }
    reply.into_response()
}

async fn check_and_produce(
    shared: &Arc<Shared>,
    remote: SocketAddr,
    source: Option<Arc<Source>>,
    req: Request<Incoming>,
    received_at_ms: i64,
) -> Reply {
    // A cheap per-IP limit first: no body read, no HMAC, for a flooding client.
    if let Some(limit) = &shared.ip_limit {
        if let Err(wait) = limit.check(&super::limit::client_key(remote.ip())) {
            return Reply::error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests from this address",
            )
            .retry_after(retry_after_secs(wait))
            .closing();
        }
    }
    let Some(source) = source else {
        return Reply::error(
            StatusCode::NOT_FOUND,
            "unknown_source",
            "no such webhook source",
        );
    };
    if req.method() != Method::POST {
        return Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid",
            "webhooks must be POSTed",
        );
    }
    let (parts, body) = req.into_parts();

    // 1. Size: a declared length over the limit is refused without reading a byte; any other
    //    body is counted as it streams.
    let declared = body.size_hint().exact();
    if declared.is_some_and(|n| n > source.max_body_bytes as u64) {
        return too_large(&source, body);
    }
    let budget = BodyBudget {
        permits: &shared.body_budget,
        gauge: &shared.metrics.buffered_body_bytes,
    };
    let (body, held) =
        match read_body(body, source.max_body_bytes, shared.body_timeout, budget).await {
            Ok(b) => b,
            Err(BodyError::TooLarge(rest)) => return too_large(&source, rest),
            Err(BodyError::Overloaded(rest)) => {
                spawn_drain(rest, source.max_body_bytes);
                return Reply::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "too many request bodies are held at once; retry later",
                )
                .retry_after(shared.unavailable_retry_after_secs)
                .closing();
            }
            Err(BodyError::Timeout) => {
                return Reply::error(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!(
                        "the body did not arrive within {} ms",
                        shared.body_timeout.as_millis()
                    ),
                )
                .closing()
            }
            Err(BodyError::Broken(e)) => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("the body could not be read: {e}"),
                )
                .closing()
            }
        };

    // 2-4. Headers present, timestamp, signature over the exact raw bytes.
    let now = received_at_ms.div_euclid(1000);
    let verified = match auth::verify(
        &source.scheme,
        &source.secrets,
        &parts.headers,
        &body,
        now,
        source.tolerance_secs,
    ) {
        Ok(v) => v,
        Err(e) => return Reply::error(StatusCode::UNAUTHORIZED, e.code(), e),
    };
    shared
        .metrics
        .secret_matches
        .with_label_values(&[&source.name, secret_label(verified.secret_index).as_ref()])
        .inc();

    let json = match parse_json(&body) {
        Ok(j) => j,
        Err(e) => return Reply::error(StatusCode::BAD_REQUEST, "invalid", e),
    };
    if matches!(source.scheme, auth::Scheme::Slack)
        && json.get("type").and_then(|t| t.as_str()) == Some("url_verification")
    {
        // Slack's endpoint handshake: signed like any event, answered with its challenge,
        // never produced.
        let challenge = json.get("challenge").cloned().unwrap_or_default();
        return Reply::new(StatusCode::OK, "challenge", json!({"challenge": challenge}));
    }
    let attributes = (|| {
        Ok::<_, super::source::InvalidEvent>((
            source.event_id(&parts.headers, &json, &body)?,
            source.event_type(&parts.headers, &json)?,
            source.subject(&parts.headers, &json)?,
            source.time(&parts.headers, &json)?,
        ))
    })();
    let ((id, sender_id), event_type, subject, time) = match attributes {
        Ok(a) => a,
        Err(e) => return Reply::error(StatusCode::BAD_REQUEST, "invalid", e),
    };

    // 5. Delivery-id dedup: copies wait for the first copy's delivery report.
    let claim = match shared.replay.claim(&id).await {
        Claim::Duplicate => {
            return Reply::new(
                StatusCode::OK,
                "replay",
                json!({"status": "duplicate", "id": id}),
            )
        }
        Claim::First(first) => first,
    };

    // 6. Per-source rate limit (a refused request releases its claim, so a retry goes through).
    if let Err(wait) = shared.source_limits.check(&source.name) {
        return Reply::error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "this source is over its rate limit",
        )
        .retry_after(retry_after_secs(wait));
    }

    // 7. Schema validation.
    if let Err(e) = source.validate(&json) {
        return Reply::error(StatusCode::BAD_REQUEST, "invalid", e);
    }

    // 8. Produce, in a task of its own: the outcome settles the claim even if this request
    //    is dropped (the client hung up), so a copy never waits on an abandoned produce.
    // Parsed JSON is UTF-8; the check only turns the bytes into text without a copy.
    let Ok(data) = String::from_utf8(Vec::from(body)) else {
        return Reply::error(StatusCode::BAD_REQUEST, "invalid", "body is not UTF-8");
    };
    // `ce_time` is the sender's occurrence time when the source names one, else the receipt.
    let time = time.unwrap_or_else(|| crate::codec::rfc3339_millis(received_at_ms));
    let producer = shared.producer.clone();
    let task_source = source.clone();
    let task_id = id.clone();
    // The parsed body and the request head are not needed past this point: free them before
    // the wait for Kafka's ack, which can last seconds.
    drop(json);
    drop(parts);
    let produced = shared.produces.spawn(async move {
        // The body's budget is held until the record is Kafka's (or refused): once the event
        // text is freed below, it stands for librdkafka's copy of the record.
        let _held = held;
        let sent = {
            let envelope = Envelope {
                id: &task_id,
                source: &task_source.ce_source,
                event_type: &event_type,
                time: Some(&time),
                subject: subject.as_deref(),
                delivery_id: sender_id.as_deref(),
                received_at_ms: Some(received_at_ms),
                data: &data,
            };
            producer
                .send(&task_source.name, &task_source.topic, &envelope)
                .await
        };
        drop(data);
        let result = match sent {
            Ok(sent) => producer.acknowledged(sent).await,
            Err(e) => Err(e),
        };
        if result.is_ok() {
            claim.accepted();
        }
        result
    });
    match produced.await {
        Ok(Ok(())) => Reply::new(
            StatusCode::ACCEPTED,
            "accepted",
            json!({"status": "accepted", "id": id}),
        ),
        Ok(Err(super::produce::ProduceError::TooLarge(e))) => {
            tracing::warn!(source = %source.name, error = %e, "event too large for Kafka");
            Reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the event is larger than Kafka accepts for this topic",
            )
        }
        Ok(Err(e)) => {
            tracing::warn!(source = %source.name, error = %e, "event not produced");
            let status = match e {
                super::produce::ProduceError::RegistryRejected(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            Reply::error(
                status,
                e.code(),
                "the event could not be stored; retry later",
            )
            .retry_after(shared.unavailable_retry_after_secs)
        }
        Err(join) => {
            tracing::error!(error = %join, "produce task failed");
            Reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "kafka_unavailable",
                "the event could not be stored; retry later",
            )
            .retry_after(shared.unavailable_retry_after_secs)
        }
    }
}

//! `spillway-mock-llm`: an LLM provider simulator for tests and local load tests. It is its own
//! crate so the service never compiles it: tests and benchmarks use it as a library, people run
//! the `spillway-mock-llm` binary.
//!
//! It speaks OpenAI-compatible `POST /v1/chat/completions` and Anthropic `POST /v1/messages`,
//! and enforces limits the way providers do:
//!
//! * requests per minute, input tokens per minute and output tokens per minute, each a token
//!   bucket that refills continuously (limit / 60 per second) up to one minute's worth;
//! * at admission it reserves the estimated prompt tokens and the request's `max_tokens` of
//!   output; when the answer is done it refunds the output it did not use;
//! * over a limit it answers 429 with `retry-after` (seconds), `retry-after-ms`, and the
//!   provider's rate-limit headers (`x-ratelimit-*` for OpenAI, `anthropic-ratelimit-*` for
//!   Anthropic), without consuming anything.
//!
//! Latency is fixed plus uniform jitter. Faults are injected by rate or from a script:
//! `500`, `529`, `hang`, `quota` (`insufficient_quota`), `overflow` (context window),
//! `malformed` (a truncated 200 body), `429` (a rate limit with `--retry-after-ms`), `invalid`
//! (an answer that is not JSON), `ok`. Answers are deterministic functions of the first user
//! message (a label from `positive`/`negative`/`neutral`, as `{"label":..}` when JSON was
//! asked for), with exact `usage` counts, so end-to-end tests can assert results.
//! A `sim-fault:<kind>` directive in the first user message injects that fault into every
//! request of that conversation. `POST /control` swaps the fault rates or script at run time.
//! `GET /stats` returns counters of what was received and refused, per-second counts, request
//! arrival times, and requests that came before a `retry-after` deadline.

mod faults;
mod responses;

pub use faults::Fault;
use faults::{parse_rates, parse_script};
use responses::*;
pub use responses::{estimate_tokens, label_for};

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value as Json};
use tokio_util::sync::CancellationToken;

/// Simulator settings (also the `spillway mock-llm` flags).
#[derive(Debug, Clone, clap::Args)]
pub struct SimulatorConfig {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// Requests per minute; 0 means unlimited.
    #[arg(long, default_value_t = 3000)]
    pub rpm: u64,
    /// Input (prompt) tokens per minute; 0 means unlimited.
    #[arg(long, default_value_t = 0)]
    pub input_tpm: u64,
    /// Output tokens per minute, reserved as `max_tokens` at admission; 0 means unlimited.
    #[arg(long, default_value_t = 0)]
    pub output_tpm: u64,
    /// Fixed latency of every answer, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub latency_ms: u64,
    /// Extra latency, uniform in 0..=this many milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_jitter_ms: u64,
    /// Output tokens of every answer (capped by `max_tokens`); 0 derives 20–200 from the prompt.
    #[arg(long, default_value_t = 0)]
    pub output_tokens: u32,
    /// Context window in tokens: a prompt plus `max_tokens` above it is a context overflow.
    #[arg(long, default_value_t = 128_000)]
    pub context_tokens: u64,
    /// Fault rates per request, comma separated `kind=probability`, e.g. `500=0.05,hang=0.01`.
    #[arg(long, default_value = "")]
    pub faults: String,
    /// A fault script consumed one entry per request, e.g. `500,500,ok,529,quota`; after it
    /// runs out, requests follow `--faults`.
    #[arg(long, default_value = "")]
    pub script: String,
    /// `retry-after` of an injected `429` fault, in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    pub retry_after_ms: u64,
    /// Bucket capacity as this many milliseconds' worth of each limit. 60000 lets a full
    /// minute burst; providers that enforce limits over shorter periods behave like ~1000.
    #[arg(long, default_value_t = 60_000)]
    pub burst_ms: u64,
}

impl SimulatorConfig {
    /// Defaults with the given listen address and limits, for tests.
    pub fn new(listen: SocketAddr) -> Self {
        SimulatorConfig {
            listen,
            rpm: 0,
            input_tpm: 0,
            output_tpm: 0,
            latency_ms: 0,
            latency_jitter_ms: 0,
            output_tokens: 0,
            context_tokens: 128_000,
            faults: String::new(),
            script: String::new(),
            retry_after_ms: 1_000,
            burst_ms: 60_000,
        }
    }
}

/// Errors in the simulator's own configuration.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    /// A fault kind or rate does not parse.
    #[error("invalid --faults/--script entry `{0}`: kinds are ok, 500, 529, 429, hang, quota, overflow, malformed, invalid; rates are 0..=1")]
    BadFault(String),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A per-minute limit as a continuously refilling bucket holding `burst_ms` worth of it.
#[derive(Debug)]
struct Bucket {
    limit_per_minute: f64,
    capacity: f64,
    available: f64,
    last: Instant,
}

impl Bucket {
    fn new(limit_per_minute: u64, burst_ms: u64, now: Instant) -> Self {
        let capacity = (limit_per_minute as f64 * burst_ms as f64 / 60_000.0).max(1.0);
        Bucket {
            limit_per_minute: limit_per_minute as f64,
            capacity,
            available: capacity,
            last: now,
        }
    }

    fn unlimited(&self) -> bool {
        self.limit_per_minute == 0.0
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.duration_since(self.last).as_secs_f64();
        self.available = (self.available + dt * self.limit_per_minute / 60.0).min(self.capacity);
        self.last = now;
    }

    /// Time until `n` would fit, or zero if it fits now (after a refill).
    fn wait_for(&self, n: f64) -> Duration {
        if self.unlimited() || self.available >= n {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((n - self.available) * 60.0 / self.limit_per_minute)
    }

    fn take(&mut self, n: f64) {
        if !self.unlimited() {
            self.available -= n;
        }
    }

    fn give_back(&mut self, n: f64) {
        if !self.unlimited() {
            self.available = (self.available + n).min(self.capacity);
        }
    }

    fn remaining(&self) -> u64 {
        self.available.max(0.0) as u64
    }

    /// Time until the bucket is full again.
    fn reset(&self) -> Duration {
        if self.unlimited() {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(
            (self.capacity - self.available).max(0.0) * 60.0 / self.limit_per_minute,
        )
    }
}

/// Counters of what the simulator saw; `GET /stats` returns them.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Stats {
    /// Requests received, well-formed or not.
    pub received: u64,
    /// Requests admitted past the rate limits.
    pub admitted: u64,
    /// Requests answered 429 for a rate limit.
    pub rate_limited: u64,
    /// Successful answers.
    pub completed: u64,
    /// Injected faults, by kind.
    pub server_errors: u64,
    /// 529s.
    pub overloaded: u64,
    /// Requests left hanging.
    pub hung: u64,
    /// `insufficient_quota` answers.
    pub quota_errors: u64,
    /// Context-window overflows (injected or real).
    pub context_overflows: u64,
    /// Truncated bodies.
    pub malformed: u64,
    /// Requests that were not valid JSON of the API's shape.
    pub bad_requests: u64,
    /// Prompt tokens of completed answers.
    pub input_tokens: u64,
    /// Output tokens of completed answers.
    pub output_tokens: u64,
    /// Requests that arrived before the latest `retry-after` deadline the simulator gave
    /// (more than 10 ms after giving it, so requests already on the wire do not count).
    pub early_requests: u64,
    /// Arrival time of each request, in milliseconds since start (the first 10,000).
    pub request_times_ms: Vec<u64>,
    /// Per-second counts since start (the first hour).
    pub per_second: Vec<Second>,
    /// Requests being handled right now (a hung request stays here until the client hangs up).
    pub in_progress: u64,
}

/// What happened in one second of the simulator's life.
#[derive(Debug, Default, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct Second {
    /// Requests received.
    pub received: u64,
    /// Requests admitted past the limits.
    pub admitted: u64,
    /// Requests answered 429 for a rate limit.
    pub rate_limited: u64,
    /// Output tokens of answers completed in this second.
    pub output_tokens: u64,
}

impl Stats {
    fn second(&mut self, at: Duration) -> Option<&mut Second> {
        let i = at.as_secs() as usize;
        if i >= 3_600 {
            return None;
        }
        if self.per_second.len() <= i {
            self.per_second.resize(i + 1, Second::default());
        }
        self.per_second.get_mut(i)
    }
}

struct Limits {
    requests: Bucket,
    input: Bucket,
    output: Bucket,
}

struct Shared {
    config: SimulatorConfig,
    limits: Mutex<Limits>,
    script: Mutex<VecDeque<Fault>>,
    rates: Mutex<Vec<(Fault, f64)>>,
    stats: Mutex<Stats>,
    started: Instant,
    /// When the latest `retry-after` was given, and the deadline it set.
    not_before: Mutex<Option<(Instant, Instant)>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
}

/// Binds the simulator and serves it until `shutdown` is cancelled. Returns the bound address.
pub async fn serve(
    config: SimulatorConfig,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), SimulatorError> {
    let now = Instant::now();
    let shared = Arc::new(Shared {
        limits: Mutex::new(Limits {
            requests: Bucket::new(config.rpm, config.burst_ms, now),
            input: Bucket::new(config.input_tpm, config.burst_ms, now),
            output: Bucket::new(config.output_tpm, config.burst_ms, now),
        }),
        script: Mutex::new(parse_script(&config.script)?),
        rates: Mutex::new(parse_rates(&config.faults)?),
        stats: Mutex::new(Stats::default()),
        started: now,
        not_before: Mutex::new(None),
        config,
    });
    let listener = tokio::net::TcpListener::bind(shared.config.listen)
        .await
        .map_err(|source| SimulatorError::Bind {
            addr: shared.config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| SimulatorError::Bind {
            addr: shared.config.listen,
            source,
        })?;
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|State(s): State<Arc<Shared>>, body: Bytes| async move {
                handle(s, Api::OpenAi, body).await
            }),
        )
        .route(
            "/v1/messages",
            post(|State(s): State<Arc<Shared>>, body: Bytes| async move {
                handle(s, Api::Anthropic, body).await
            }),
        )
        .route(
            "/control",
            post(
                |State(s): State<Arc<Shared>>, axum::Json(c): axum::Json<Control>| async move {
                    control(&s, c)
                },
            ),
        )
        .route(
            "/stats",
            get(|State(s): State<Arc<Shared>>| async move { axum::Json(lock(&s.stats).clone()) }),
        )
        .with_state(shared);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "mock-llm server failed");
        }
    });
    tracing::info!(%addr, "mock-llm serving /v1/chat/completions, /v1/messages and /stats");
    Ok((addr, task))
}

/// Body of `POST /control`: replaces the fault rates and/or the script while running, to
/// start or end an outage in the middle of a test or load test.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct Control {
    /// New `--faults` value.
    #[serde(default)]
    pub faults: Option<String>,
    /// New `--script` value.
    #[serde(default)]
    pub script: Option<String>,
}

fn control(s: &Shared, c: Control) -> Response {
    let parsed = (|| -> Result<_, SimulatorError> {
        Ok((
            c.faults.as_deref().map(parse_rates).transpose()?,
            c.script.as_deref().map(parse_script).transpose()?,
        ))
    })();
    match parsed {
        Ok((rates, script)) => {
            if let Some(rates) = rates {
                *lock(&s.rates) = rates;
            }
            if let Some(script) = script {
                *lock(&s.script) = script;
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// Locks a mutex, recovering the data if a holder panicked (counters stay usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a request as in progress until its handler finishes or is dropped.
struct InProgress(Arc<Shared>);

impl InProgress {
    fn new(s: &Arc<Shared>) -> Self {
        lock(&s.stats).in_progress += 1;
        InProgress(s.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        lock(&self.0.stats).in_progress -= 1;
    }
}

async fn handle(s: Arc<Shared>, api: Api, body: Bytes) -> Response {
    let _in_progress = InProgress::new(&s);
    let arrived = Instant::now();
    let early = lock(&s.not_before).is_some_and(|(given, deadline)| {
        arrived < deadline && arrived > given + Duration::from_millis(10)
    });
    {
        let mut st = lock(&s.stats);
        st.received += 1;
        st.early_requests += u64::from(early);
        let at = arrived.duration_since(s.started);
        if st.request_times_ms.len() < 10_000 {
            st.request_times_ms.push(at.as_millis() as u64);
        }
        if let Some(sec) = st.second(at) {
            sec.received += 1;
        }
    }
    let req: Json = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(&s, api, &format!("body is not JSON: {e}")),
    };
    let Some(prompt) = prompt_text(api, &req) else {
        return bad_request(
            &s,
            api,
            "`messages` must be an array of messages with text content",
        );
    };
    let max_tokens = match req["max_tokens"].as_u64() {
        Some(n) if n > 0 => n,
        None if api == Api::OpenAi => 1_024,
        _ => return bad_request(&s, api, "`max_tokens` must be a positive integer"),
    };
    let model = req["model"].as_str().unwrap_or("mock").to_string();
    let input = estimate_tokens(&prompt);

    // Admission: all three buckets must have room; a refusal consumes nothing.
    let now = Instant::now();
    let headers;
    {
        let mut l = lock(&s.limits);
        l.requests.refill(now);
        l.input.refill(now);
        l.output.refill(now);
        let wait = l
            .requests
            .wait_for(1.0)
            .max(l.input.wait_for(input as f64))
            .max(l.output.wait_for(max_tokens as f64));
        if !wait.is_zero() {
            let h = limit_headers(api, &l, Some(wait));
            drop(l);
            gave_retry_after(&s, wait);
            let kind = "rate_limit_exceeded";
            return error(
                api,
                StatusCode::TOO_MANY_REQUESTS,
                kind,
                "rate limit reached; see retry-after",
                h,
            );
        }
        l.requests.take(1.0);
        l.input.take(input as f64);
        l.output.take(max_tokens as f64);
        headers = limit_headers(api, &l, None);
    }
    let fault = next_fault(&s, &first_user_text(&req));
    if fault == Fault::RateLimit {
        // An injected refusal, like a real one: nothing stays consumed.
        {
            let mut l = lock(&s.limits);
            l.requests.give_back(1.0);
            l.input.give_back(input as f64);
            l.output.give_back(max_tokens as f64);
        }
        let wait = Duration::from_millis(s.config.retry_after_ms);
        gave_retry_after(&s, wait);
        let h = limit_headers(api, &lock(&s.limits), Some(wait));
        return error(
            api,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "rate limit reached; see retry-after",
            h,
        );
    }
    {
        let mut st = lock(&s.stats);
        st.admitted += 1;
        if let Some(sec) = st.second(arrived.duration_since(s.started)) {
            sec.admitted += 1;
        }
    }

    let overflow = input + max_tokens > s.config.context_tokens;
    let latency = s.config.latency_ms
        + if s.config.latency_jitter_ms > 0 {
            rand::rng().random_range(0..=s.config.latency_jitter_ms)
        } else {
            0
        };
    if fault == Fault::Hang {
        lock(&s.stats).hung += 1;
        refund(&s, max_tokens);
        // Never answer; the client's timeout (or a dropped connection) ends it.
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(Duration::from_millis(latency)).await;
    let failed = |kind| {
        refund(&s, max_tokens);
        kind
    };
    match fault {
        Fault::ServerError => {
            lock(&s.stats).server_errors += 1;
            failed(error(
                api,
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "internal server error",
                headers,
            ))
        }
        Fault::Overloaded => {
            lock(&s.stats).overloaded += 1;
            let status = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            failed(error(
                api,
                status,
                "overloaded_error",
                "overloaded",
                headers,
            ))
        }
        Fault::Quota => {
            lock(&s.stats).quota_errors += 1;
            failed(error(
                api,
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "You exceeded your current quota, please check your plan and billing details.",
                headers,
            ))
        }
        _ if fault == Fault::Overflow || overflow => {
            lock(&s.stats).context_overflows += 1;
            failed(error(
                api,
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                "prompt is too long: the context window is exceeded",
                headers,
            ))
        }
        Fault::Malformed => {
            lock(&s.stats).malformed += 1;
            refund(&s, max_tokens);
            (
                StatusCode::OK,
                headers,
                r#"{"id":"mock","choices":[{"message":{"content":"#,
            )
                .into_response()
        }
        _ => {
            // JSON when asked for it: OpenAI's JSON mode, or a prompt that says JSON.
            let json_mode = req["response_format"]["type"] == "json_object"
                || prompt.to_ascii_lowercase().contains("json");
            let json_mode = json_mode && fault != Fault::Invalid;
            let wanted = if s.config.output_tokens > 0 {
                u64::from(s.config.output_tokens)
            } else {
                20 + stable_hash(&prompt) % 181
            };
            let output = wanted.min(max_tokens);
            let text = answer(&first_user_text(&req), output as u32, json_mode);
            // Settle: refund the reserved output that was not produced.
            refund(&s, max_tokens - output);
            {
                let mut st = lock(&s.stats);
                st.completed += 1;
                st.input_tokens += input;
                st.output_tokens += output;
                if let Some(sec) = st.second(s.started.elapsed()) {
                    sec.output_tokens += output;
                }
            }
            let body = match api {
                Api::OpenAi => json!({
                    "id": format!("chatcmpl-mock-{:x}", stable_hash(&prompt)),
                    "object": "chat.completion",
                    "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": input, "completion_tokens": output,
                              "total_tokens": input + output},
                }),
                Api::Anthropic => json!({
                    "id": format!("msg_mock_{:x}", stable_hash(&prompt)),
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "usage": {"input_tokens": input, "output_tokens": output},
                }),
            };
            (StatusCode::OK, headers, axum::Json(body)).into_response()
        }
    }
}

/// Counts a 429 and remembers its deadline, to catch requests that do not honour it.
fn gave_retry_after(s: &Shared, wait: Duration) {
    let now = Instant::now();
    {
        let mut nb = lock(&s.not_before);
        let deadline = now + wait;
        if nb.is_none_or(|(_, d)| d < deadline) {
            *nb = Some((now, deadline));
        }
    }
    let mut st = lock(&s.stats);
    st.rate_limited += 1;
    if let Some(sec) = st.second(now.duration_since(s.started)) {
        sec.rate_limited += 1;
    }
}

fn refund(s: &Shared, output_tokens: u64) {
    let mut l = lock(&s.limits);
    l.output.refill(Instant::now());
    l.output.give_back(output_tokens as f64);
}

/// The fault for a request: a `sim-fault:<kind>` directive in its first user message (so a
/// test can fail one event deterministically), else the script, else the rates.
fn next_fault(s: &Shared, first_user: &str) -> Fault {
    if let Some((_, rest)) = first_user.split_once("sim-fault:") {
        let kind: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        if let Ok(f) = Fault::parse(&kind) {
            return f;
        }
    }
    if let Some(f) = lock(&s.script).pop_front() {
        return f;
    }
    let mut rng = rand::rng();
    for (fault, rate) in lock(&s.rates).iter() {
        if rng.random_bool(*rate) {
            return *fault;
        }
    }
    Fault::Ok
}

#[cfg(test)]
mod tests;

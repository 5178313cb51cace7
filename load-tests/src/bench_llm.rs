//! `bench-llm`: the LLM stage against the provider simulator, next to a naive SDK-style
//! client in the same run.
//!
//! * (a) request-bound: 3,000 RPM, 500 ms latency, a backlog larger than the window.
//! * (b) token-bound: 240,000 output tokens per minute, 200-token answers, `max_tokens` 1,024.
//!
//! Spillway runs the real pipeline: a topic on Apache Kafka → processor with the LLM step → HTTP
//! sink, with the account's limits in its provider config. The naive client is what an SDK
//! user writes: 64 concurrent workers, no local limiter, 2 retries with 0.5–8 s backoff and
//! jitter, `retry-after` honoured for its own request. Each client gets its own simulator,
//! which enforces the limits over a 2 s burst (providers enforce per-minute limits over
//! shorter periods) and counts what it admitted per second.
//!
//! Printed per client: the achieved rate over a 60 s steady-state window (from 5 s after the
//! first request) and its error against the limit, the worst 1 s window against the limit
//! plus Spillway's burst (1 s), the share of requests answered 429, utilisation, requests
//! sent inside a `retry-after` window, and lost and duplicated events.
//!
//! Usage: `cargo run --release -p spillway-load-tests --bin bench-llm -- [--quick] [--only a|b]`

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::Rng;
use serde_json::{json, Value};
use spillway_load_tests::{create_topic, produce_records, start_broker};
use spillway_mock_llm::{serve, SimulatorConfig, Stats};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// A 15 s window and smaller backlogs, for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Run only scenario `a` or `b`.
    #[arg(long)]
    only: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Measure {
    Requests,
    OutputTokens,
}

struct Scenario {
    id: &'static str,
    title: &'static str,
    api: &'static str,
    rpm: u64,
    output_tpm: u64,
    output_tokens: u32,
    max_tokens: u32,
    measure: Measure,
    /// Units (requests or output tokens) per second the account allows.
    limit_per_sec: f64,
    events: usize,
}

const LATENCY_MS: u64 = 500;
const WARMUP_S: usize = 5;
const NAIVE_WORKERS: usize = 64;

struct Report {
    rate: f64,
    worst: f64,
    received: u64,
    rate_limited: u64,
    early: u64,
    lost: usize,
    duplicated: usize,
    elapsed: Duration,
}

fn sim_config(sc: &Scenario) -> SimulatorConfig {
    let mut c = SimulatorConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    c.rpm = sc.rpm;
    c.output_tpm = sc.output_tpm;
    c.output_tokens = sc.output_tokens;
    c.latency_ms = LATENCY_MS;
    c.burst_ms = 2_000;
    c
}

async fn stats(base: &str) -> Stats {
    reqwest::get(format!("{base}/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats body")
}

/// Rate over the steady-state window and the worst single second, from the simulator's
/// per-second counts.
fn window(stats: &Stats, measure: Measure, window_s: usize) -> (f64, f64) {
    let units: Vec<f64> = stats
        .per_second
        .iter()
        .map(|s| match measure {
            Measure::Requests => s.admitted as f64,
            Measure::OutputTokens => s.output_tokens as f64,
        })
        .collect();
    let first = stats
        .per_second
        .iter()
        .position(|s| s.received > 0)
        .unwrap_or(0);
    let from = (first + WARMUP_S).min(units.len());
    let to = (from + window_s).min(units.len());
    let total: f64 = units[from..to].iter().sum();
    let worst = units.iter().cloned().fold(0.0, f64::max);
    // `+ 0.0` turns an empty window's -0.0 into 0.0 for printing.
    (total / window_s as f64 + 0.0, worst)
}

async fn recording_sink() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use axum::routing::post;
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();
    let r = ids.clone();
    let app = axum::Router::new().route(
        "/events",
        post(move |axum::Json(body): axum::Json<Value>| {
            let r = r.clone();
            async move {
                let id = body["data"]["n"].as_u64().unwrap_or(u64::MAX).to_string();
                r.lock().unwrap().push(id);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, ids)
}

async fn run_spillway(sc: &Scenario, window_s: usize) -> Report {
    let (_broker, bootstrap) = start_broker();
    let topic = format!("bench-llm-{}", sc.id);
    create_topic(&bootstrap, &topic, 12).await;
    create_topic(&bootstrap, &format!("{topic}.dlq"), 1).await;
    produce_records(
        &bootstrap,
        &topic,
        (0..sc.events).map(|n| {
            (
                format!("k{n}"),
                json!({"n": n, "text": format!("event {n}")}).to_string(),
            )
        }),
    )
    .await;
    let stop_sim = CancellationToken::new();
    let (sim_addr, _sim) = serve(sim_config(sc), stop_sim.clone()).await.expect("sim");
    let (sink, ids) = recording_sink().await;
    let limits = match sc.measure {
        Measure::Requests => format!("requests_per_minute = {}", sc.rpm),
        Measure::OutputTokens => format!("output_tokens_per_minute = {}", sc.output_tpm),
    };
    let toml = format!(
        r#"
[kafka]
brokers = "{bootstrap}"
group_id = "bench-{topic}"
topics = ["{topic}"]
session_timeout_ms = 6000
[kafka.properties]
"fetch.wait.max.ms" = 50
[processor]
max_in_flight = 256
[dlq]
topic = "{topic}.dlq"
[telemetry]
metrics_addr = "127.0.0.1:0"
[[steps]]
type = "llm"
name = "classify"
provider = "sim"
model = "mock"
user = "Classify: {{{{ data.text }}}}"
max_tokens = {max_tokens}
[[steps]]
type = "webhook"
url = "http://{sink}/events"
[llm.providers.sim]
api = "{api}"
base_url = "http://{sim_addr}"
{limits}
"#,
        max_tokens = sc.max_tokens,
        api = sc.api,
    );
    let config = spillway::config::Config::from_toml(&toml).expect("bench config");
    let stop = CancellationToken::new();
    let processor = spillway::pipeline::start(config, stop.clone())
        .await
        .expect("processor starts");
    let metrics = processor.metrics();
    let task = tokio::spawn(processor.run());
    let started = Instant::now();
    // Dead letters of the pipeline (`default`) and of records none took (`none`).
    let dead = || {
        ["default", "none"]
            .iter()
            .map(|p| {
                (metrics.events)
                    .with_label_values(&[p, topic.as_str(), "dead_lettered"])
                    .get() as usize
            })
            .sum::<usize>()
    };
    let budget = Duration::from_secs_f64(sc.events as f64 / sc.events_per_sec() * 2.0 + 60.0);
    loop {
        let done = ids.lock().unwrap().len() + dead();
        if done >= sc.events || started.elapsed() > budget {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    let s = stats(&format!("http://{sim_addr}")).await;
    stop.cancel();
    let _ = task.await;
    stop_sim.cancel();
    let delivered = ids.lock().unwrap().clone();
    let distinct: std::collections::HashSet<&String> = delivered.iter().collect();
    let (rate, worst) = window(&s, sc.measure, window_s);
    Report {
        rate,
        worst,
        received: s.received,
        rate_limited: s.rate_limited,
        early: s.early_requests,
        lost: sc.events.saturating_sub(distinct.len() + dead()),
        duplicated: delivered.len() - distinct.len(),
        elapsed,
    }
}

impl Scenario {
    /// Events per second at exactly the account's limit.
    fn events_per_sec(&self) -> f64 {
        match self.measure {
            Measure::Requests => self.limit_per_sec,
            Measure::OutputTokens => self.limit_per_sec / f64::from(self.output_tokens),
        }
    }
}

/// What an SDK user writes: a worker pool, each event one call with the SDK's retries.
async fn run_naive(sc: &Scenario, window_s: usize) -> Report {
    let stop_sim = CancellationToken::new();
    let (sim_addr, _sim) = serve(sim_config(sc), stop_sim.clone()).await.expect("sim");
    let base = format!("http://{sim_addr}");
    let url = match sc.api {
        "anthropic" => format!("{base}/v1/messages"),
        _ => format!("{base}/v1/chat/completions"),
    };
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let ok: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..NAIVE_WORKERS {
        let (client, url, next, ok) = (client.clone(), url.clone(), next.clone(), ok.clone());
        let (max_tokens, events) = (sc.max_tokens, sc.events);
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= events {
                    return;
                }
                let body = json!({"model": "mock", "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": format!("Classify: event {n}")}]});
                for attempt in 0..3u32 {
                    let response = client.post(&url).json(&body).send().await;
                    let retry_after = match response {
                        Ok(r) if r.status().is_success() => {
                            *ok.lock().unwrap().entry(n).or_default() += 1;
                            break;
                        }
                        Ok(r) => spillway::llm::client::retry_after(r.headers()),
                        Err(_) => None,
                    };
                    if attempt == 2 {
                        break; // the SDK gives up: the event is lost
                    }
                    // SDK backoff: 0.5 s doubling to 8 s, minus up to 25 % jitter; a
                    // retry-after of at most 60 s wins.
                    let backoff = (0.5 * 2f64.powi(attempt as i32)).min(8.0)
                        * (1.0 - 0.25 * rand::rng().random::<f64>());
                    let delay = match retry_after {
                        Some(d) if d <= Duration::from_secs(60) => d,
                        _ => Duration::from_secs_f64(backoff),
                    };
                    tokio::time::sleep(delay).await;
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    // Keep the window's length comparable: wait until it has passed if the naive run ended
    // (or gave up) early.
    let window_end = Duration::from_secs((WARMUP_S + window_s) as u64 + 1);
    if started.elapsed() < window_end {
        tokio::time::sleep(window_end - started.elapsed()).await;
    }
    let elapsed = started.elapsed();
    let s = stats(&base).await;
    stop_sim.cancel();
    let ok = ok.lock().unwrap();
    let (rate, worst) = window(&s, sc.measure, window_s);
    Report {
        rate,
        worst,
        received: s.received,
        rate_limited: s.rate_limited,
        early: s.early_requests,
        lost: sc.events - ok.len(),
        duplicated: ok.values().map(|c| c - 1).sum(),
        elapsed,
    }
}

fn print_row(name: &str, sc: &Scenario, r: &Report) {
    let limit = sc.limit_per_sec;
    let burst = limit; // Spillway's default burst: one second's worth
    println!(
        "| {name:<10} | {:>9.1} / {:<7.0} | {:>7.2} % | {:>8.0} / {:<6.0} | {:>7.3} % | {:>6.1} % | {:>6} | {:>5} | {:>5} | {:>6.1} s |",
        r.rate,
        limit,
        (r.rate - limit).abs() / limit * 100.0,
        r.worst,
        limit + burst,
        if r.received == 0 { 0.0 } else { r.rate_limited as f64 / r.received as f64 * 100.0 },
        r.rate / limit * 100.0,
        r.early,
        r.lost,
        r.duplicated,
        r.elapsed.as_secs_f64(),
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let window_s = if args.quick { 15 } else { 60 };
    let scale = |n: usize| if args.quick { n / 3 } else { n };
    let scenarios = [
        Scenario {
            id: "a",
            title: "(a) request-bound: 3,000 RPM, 500 ms latency, OpenAI API",
            api: "openai",
            rpm: 3_000,
            output_tpm: 0,
            output_tokens: 20,
            max_tokens: 64,
            measure: Measure::Requests,
            limit_per_sec: 50.0,
            events: scale(4_200),
        },
        Scenario {
            id: "b",
            title: "(b) token-bound: 240,000 output TPM, 200-token answers, max_tokens 1,024, Anthropic API",
            api: "anthropic",
            rpm: 0,
            output_tpm: 240_000,
            output_tokens: 200,
            max_tokens: 1_024,
            measure: Measure::OutputTokens,
            limit_per_sec: 4_000.0,
            events: scale(1_800),
        },
    ];
    for sc in &scenarios {
        if args.only.as_deref().is_some_and(|o| o != sc.id) {
            continue;
        }
        println!(
            "\n{}; backlog {} events; window {window_s} s after a {WARMUP_S} s warm-up",
            sc.title, sc.events
        );
        let unit = match sc.measure {
            Measure::Requests => "req/s",
            Measure::OutputTokens => "out tok/s",
        };
        println!("| client     | rate ({unit}) / limit | rate err | worst 1 s / limit+burst | 429 share | util    | RA viol | lost | dup  | run time |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        let ours = run_spillway(sc, window_s).await;
        print_row("spillway", sc, &ours);
        let naive = run_naive(sc, window_s).await;
        print_row("naive SDK", sc, &naive);
    }
}

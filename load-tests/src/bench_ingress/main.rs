//! `bench-ingress`: what the ingress costs over its two unavoidable parts, measured in one run.
//!
//! Three systems take 1 KB Standard-Webhooks-signed events from the same open-loop load
//! generator (64 keep-alive HTTP/1.1 connections, latency counted from each request's
//! scheduled send time, so a stall is not hidden by the generator waiting for it):
//!
//! - **ingress**: `spillway ingress` (its library entry point, run in a child process), which
//!   verifies, dedups, encodes Avro through the registry and answers 202 after Kafka's ack;
//! - **(a) HMAC only**: a bare hyper server in a child process that reads the body, verifies
//!   the signature with the same `ingress::auth` code and answers 202, with no Kafka;
//! - **(b) raw producer**: an idempotent `acks=all` rdkafka producer sending 1 KB values at
//!   the same offered rates (latency from the scheduled send to the delivery report).
//! - **(c) HMAC + produce**: the (a) child producing each body (idempotent, `acks=all`)
//!   and answering after the delivery report, with nothing else: the floor of any
//!   verify-then-produce service. Unlike (b), it is bound by 64 connections each waiting
//!   for its ack, as the ingress is.
//!
//! For each, the offered rate climbs until p99 exceeds 20 ms, a request fails or the achieved
//! rate falls behind (a step that fails only on latency is run once more first), then
//! bisects. It prints the max sustainable rate at p99 ≤ 20 ms, the latency percentiles
//! there, CPU µs per request of the serving process, the broker and the load generator (from
//! /proc), the ratios of ingress to min(a, b) and to (c), and checks that every 202'd id is
//! in Kafka exactly once.
//!
//! Usage: `cargo run --release -p spillway-load-tests --bin bench-ingress -- [--quick]
//! [--only a|b|c|ingress] [--rate R]`: `--only` measures one system, `--rate` offers one fixed
//! rate instead of the sweep (for profiling the serving child at a known load).
//! Tools come from SPILLWAY_TANSU_BIN / SPILLWAY_RIVVEN_BIN or scripts/tools.sh. Everything
//! runs on 127.0.0.1 and stops by itself.

mod measure;
mod profile;
mod systems;

use measure::*;
use profile::*;
use systems::*;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use spillway::ingress::auth::{Scheme, Secret};
use spillway_load_tests::{create_topic, free_port, start_broker, start_registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECTIONS: usize = 64;
const BODY_BYTES: usize = 1024;
const P99_BOUND_MS: f64 = 20.0;
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PARTITIONS: i32 = 12;

/// `linger.ms` for both the ingress and the raw producer: BENCH_LINGER_MS, default 1 (the
/// ingress's default).
fn linger_ms() -> u64 {
    std::env::var("BENCH_LINGER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A 1 KB JSON comment with a unique id.
fn body(id: &str) -> Vec<u8> {
    let head = format!(r#"{{"id":"{id}","post":"hello-world","text":""#);
    let mut b = head.into_bytes();
    let pad = BODY_BYTES.saturating_sub(b.len() + 2);
    b.extend(std::iter::repeat_n(b'x', pad));
    b.extend_from_slice(b"\"}");
    b
}

/// Complete signed HTTP/1.1 requests for ids `first..first+n`.
fn signed_requests(path: &str, first: usize, n: usize) -> Vec<Bytes> {
    let secret = Secret::new(&Scheme::StandardWebhooks, WHSEC).expect("valid secret");
    let ts = unix_secs();
    (first..first + n)
        .map(|i| {
            let id = format!("msg_{i}");
            let b = body(&id);
            let sig = secret.sign_standard_webhooks(&id, ts, &b);
            let mut req = format!(
                "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
                 webhook-id: {id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\n\
                 content-length: {}\r\n\r\n",
                b.len()
            )
            .into_bytes();
            req.extend_from_slice(&b);
            Bytes::from(req)
        })
        .collect()
}

fn print_row(name: &str, r: &Option<StepResult>) {
    match r {
        Some(r) => println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} |",
            r.offered, r.p50_ms, r.p99_ms, r.p999_ms, r.cpu_us
        ),
        None => println!("| {name} | not sustainable at 500 req/s | | | | |"),
    }
}

/// Command-line options of a benchmark run.
struct Opts {
    seconds: f64,
    only: Option<String>,
    rate: Option<f64>,
}

impl Opts {
    fn parse(args: &[String]) -> Opts {
        let value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1).cloned())
        };
        let only = value("--only");
        if let Some(o) = &only {
            assert!(
                ["a", "b", "c", "ingress"].contains(&o.as_str()),
                "--only takes a, b, c or ingress"
            );
        }
        Opts {
            seconds: if args.iter().any(|a| a == "--quick") {
                2.0
            } else {
                5.0
            },
            only,
            rate: value("--rate").map(|r| r.parse().expect("--rate takes requests per second")),
        }
    }

    fn runs(&self, system: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == system)
    }
}

async fn bench(opts: Opts) {
    let (broker, bootstrap) = start_broker();
    let _ = BROKER_PID.set(broker.pid());
    let registry = start_registry();
    let topic = "bench-ingress";
    let raw_topic = "bench-raw";
    create_topic(&bootstrap, topic, PARTITIONS).await;
    create_topic(&bootstrap, raw_topic, PARTITIONS).await;
    println!(
        "# Ingress: {BODY_BYTES} B signed bodies, {CONNECTIONS} connections, p99 bound {P99_BOUND_MS} ms, {} s per step, linger.ms {}",
        opts.seconds,
        linger_ms()
    );

    let a = if opts.runs("a") {
        hmac_only(&opts, None).await
    } else {
        None
    };
    let c_topic = "bench-floor";
    let c = if opts.runs("c") {
        create_topic(&bootstrap, c_topic, PARTITIONS).await;
        hmac_only(&opts, Some((&bootstrap, c_topic))).await
    } else {
        None
    };
    let (b, raw_accepted) = if opts.runs("b") {
        raw_producer(&opts, &bootstrap, raw_topic).await
    } else {
        (None, Vec::new())
    };
    let (i, accepted) = if opts.runs("ingress") {
        ingress(&opts, &bootstrap, &registry.url(), topic).await
    } else {
        (None, Vec::new())
    };

    println!("\n| system | max req/s at p99 ≤ {P99_BOUND_MS} ms | p50 ms | p99 ms | p99.9 ms | CPU µs/req |");
    println!("|---|---|---|---|---|---|");
    print_row("(a) HMAC only, no Kafka", &a);
    print_row("(b) raw producer, acks=all", &b);
    print_row("(c) HMAC + produce, nothing else", &c);
    print_row("spillway ingress", &i);
    let floor = a
        .as_ref()
        .map_or(0.0, |r| r.offered)
        .min(b.as_ref().map_or(0.0, |r| r.offered));
    let ingress_rate = i.as_ref().map_or(0.0, |r| r.offered);
    let ratio = |den: f64| if den > 0.0 { ingress_rate / den } else { 0.0 };
    println!(
        "\nratio ingress / min(a, b) = {:.2} (target ≥ 0.6); ingress / (c) = {:.2}; ingress CPU {:.1} µs/req at its max rate (target ≤ 25)",
        ratio(floor),
        ratio(c.as_ref().map_or(0.0, |r| r.offered)),
        i.as_ref().map_or(0.0, |r| r.cpu_us)
    );

    // Every 202 is in Kafka, and no id is in it twice; the raw producer's acknowledged
    // records are checked the same way, to tell the broker's losses from the ingress's.
    if opts.runs("ingress") {
        verify(&bootstrap, topic, "bench", "202'd", &accepted);
    }
    if opts.runs("b") {
        verify(&bootstrap, raw_topic, "raw", "acknowledged", &raw_accepted);
    }
}

/// (a) HMAC only: a child that verifies and answers 202 without Kafka; or, given a broker
/// and topic, (c) the same child producing each body before it answers.
async fn hmac_only(opts: &Opts, kafka: Option<(&str, &str)>) -> Option<StepResult> {
    let hmac_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let addr = hmac_addr.to_string();
    let mut args = vec!["serve-hmac", &addr];
    if let Some((bootstrap, topic)) = kafka {
        args.extend([bootstrap, topic]);
    }
    let hmac = Killed(spawn_child(&args));
    wait_for_port(hmac_addr).await;
    let mut first = 0usize;
    let hmac_pid = hmac.0.id();
    if kafka.is_some() {
        // Metadata and the producer id, as for the others.
        let warm = http_step(
            hmac_addr,
            1 << 30,
            signed_requests("/webhooks/bench", 1 << 30, 64),
            200.0,
            hmac_pid,
        )
        .await;
        assert_eq!(warm.failed, 0, "(c)'s warm-up failed");
    }
    let name = if kafka.is_some() {
        "(c) HMAC + produce"
    } else {
        "(a) HMAC only"
    };
    let (a, _) = sweep(name, opts, |rate, n| {
        let reqs = signed_requests("/webhooks/bench", first, n);
        let step = http_step(hmac_addr, first, reqs, rate, hmac_pid);
        first += n;
        step
    })
    .await;
    a
}

/// (b) A raw producer, with the ingress's size and acks. Returns the best step and the
/// indices of every acknowledged record.
async fn raw_producer(
    opts: &Opts,
    bootstrap: &str,
    raw_topic: &str,
) -> (Option<StepResult>, Vec<usize>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms().to_string())
        .set("message.timeout.ms", "5000")
        .create()
        .expect("producer");
    // Warm up: metadata, the producer id and the connections, as for the ingress.
    let warm_raw = raw_step(&producer, raw_topic, 1 << 30, 64, 200.0).await;
    assert_eq!(warm_raw.failed, 0, "the raw producer's warm-up failed");
    let mut first_raw = 0usize;
    let (b, raw_steps) = sweep("(b) raw producer", opts, |rate, n| {
        let f = first_raw;
        first_raw += n;
        let producer = &producer;
        async move { raw_step(producer, raw_topic, f, n, rate).await }
    })
    .await;
    drop(producer);
    (b, raw_steps.into_iter().flat_map(|s| s.accepted).collect())
}

/// The ingress, in a child process. Returns the best step and the indices of every 202.
async fn ingress(
    opts: &Opts,
    bootstrap: &str,
    registry: &str,
    topic: &str,
) -> (Option<StepResult>, Vec<usize>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, metrics_port) = (free_port(), free_port());
    let cfg = dir.path().join("ingress.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
plaintext = true
[kafka]
brokers = "{bootstrap}"
message_timeout_ms = 5000
linger_ms = {linger}
[registry]
url = "{registry}"
[replay]
ttl_secs = 900
[telemetry]
metrics_addr = "127.0.0.1:{metrics_port}"
log_format = "text"
[sources.bench]
scheme = "standard-webhooks"
secrets = ["{WHSEC}"]
max_body_bytes = 65536
event_type = "com.example.blog.comment"
topic = "{topic}"
"#,
            linger = linger_ms(),
        ),
    )
    .expect("write config");
    let ingress = Killed(spawn_child(&[
        "serve-ingress",
        cfg.to_str().expect("utf-8 path"),
    ]));
    let ingress_addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_ready(SocketAddr::from(([127, 0, 0, 1], metrics_port))).await;
    // Warm the registry cache and the producer's metadata, as a running service would be.
    let ingress_pid = ingress.0.id();
    const WARM: usize = 1 << 30;
    let warm = http_step(
        ingress_addr,
        WARM,
        signed_requests("/webhooks/bench", WARM, 64),
        200.0,
        ingress_pid,
    )
    .await;
    let mut first_ing = 0usize;
    let (i, steps) = sweep("ingress", opts, |rate, n| {
        let reqs = signed_requests("/webhooks/bench", first_ing, n);
        let step = http_step(ingress_addr, first_ing, reqs, rate, ingress_pid);
        first_ing += n;
        step
    })
    .await;
    let accepted: Vec<usize> = warm
        .accepted
        .into_iter()
        .chain(steps.into_iter().flat_map(|s| s.accepted))
        .collect();
    let rss_kb = std::fs::read_to_string(format!("/proc/{ingress_pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    drop(ingress); // SIGTERM: drain and flush
    println!("  ingress peak RSS {rss_kb} kB");
    (i, accepted)
}

fn verify(bootstrap: &str, topic: &str, prefix: &str, what: &str, accepted: &[usize]) {
    let (records, watermarks, ids) = tokio::task::block_in_place(|| topic_ids(bootstrap, topic));
    let lost: Vec<String> = accepted
        .iter()
        .map(|i| format!("{prefix}:msg_{i}"))
        .filter(|id| !ids.contains(id))
        .collect();
    if !lost.is_empty() {
        println!(
            "LOST in {topic} (first 10): {:?}",
            &lost[..lost.len().min(10)]
        );
    }
    println!(
        "{topic}: {} {what}; {records} read, {watermarks} by the watermarks; distinct ids {}; lost ({what}, not in Kafka) {}; duplicated {}",
        accepted.len(),
        ids.len(),
        lost.len(),
        records.saturating_sub(ids.len())
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // BENCH_SERVER_THREADS: tokio worker threads of the serving children (default: one per
    // core), to see what cross-thread wakeups cost.
    if let Some(n) = std::env::var("BENCH_SERVER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|_| args.get(1).is_some_and(|a| a.starts_with("serve-")))
    {
        builder.worker_threads(n.max(1));
    }
    let runtime = builder.enable_all().build().expect("runtime");
    match args.get(1).map(String::as_str) {
        Some("serve-hmac") => runtime.block_on(serve_hmac(
            args[2].parse().expect("addr"),
            args.get(3).cloned().zip(args.get(4).cloned()),
        )),
        Some("serve-ingress") => runtime.block_on(serve_ingress(&args[2])),
        Some("closed-loop") => runtime.block_on(closed_loop()),
        Some("parts") => runtime.block_on(parts()),
        _ => runtime.block_on(bench(Opts::parse(&args))),
    }
}

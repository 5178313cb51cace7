//! `bench-rebalance`: a rolling restart of a three-member consumer group on Apache Kafka,
//! under a 500 ms LLM step, for each way a group can rebalance:
//!
//! - `eager`: classic protocol, `range` assignor; every join or leave revokes every partition
//!   of every member, and each drains its in-flight work;
//! - `cooperative`: classic protocol, `cooperative-sticky` (Spillway's default); only the
//!   partitions that move are revoked;
//! - `kip848`: `group_protocol = "consumer"`; the broker assigns incrementally.
//!
//! Each member is a child process (this binary re-executed as `serve-processor`) with
//! `max_in_flight = 32`, an LLM step against the provider simulator (500 ms per call) and a
//! webhook sink. The roll: SIGTERM a member (it drains, commits and leaves), start its
//! replacement, wait until the replacement has partitions and 3 s more (Kubernetes'
//! `minReadySeconds`), then the next.
//!
//! Printed per mode: the steady rate before the roll, the roll's duration, the events the
//! roll cost (steady rate × roll time − events completed during it), the lowest 1 s rate
//! during the roll, partitions revoked by rebalances during the roll (from the members that
//! keep running; a stopping member's own partitions at its SIGTERM are not counted), and lost
//! events (must be 0).
//! `BENCH_REPEAT=N` runs each mode N times.
//!
//! Usage: `cargo run --release -p spillway-load-tests --bin bench-rebalance -- [eager|cooperative|kip848]...`
//! (default: all three). Bounded: each mode stops after its events or 10 minutes.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spillway_load_tests::{create_topic, free_port, produce_events, start_broker, Events};

const PARTITIONS: i32 = 12;
const KEYS: u64 = 600;
const EVENTS: u64 = 16_000;
const IN_FLIGHT: u64 = 32;
const LLM_MS: u64 = 500;
const MEMBERS: usize = 3;
static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    /// When each first effect arrived.
    firsts: Vec<Instant>,
}

async fn receiver() -> (SocketAddr, Arc<Mutex<Seen>>) {
    use axum::http::HeaderMap;
    use axum::routing::post;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/events",
        post(move |headers: HeaderMap| {
            let s = s.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let mut s = s.lock().unwrap();
                if s.ids.insert(key) {
                    s.firsts.push(Instant::now());
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    (addr, seen)
}

struct Member {
    child: Child,
    metrics: u16,
    _dir: tempfile::TempDir,
}

impl Member {
    fn spawn(config: &str) -> Member {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = free_port();
        let path = dir.path().join("processor.toml");
        std::fs::write(
            &path,
            config.replace("127.0.0.1:0", &format!("127.0.0.1:{metrics}")),
        )
        .expect("config");
        let log = std::fs::File::create(dir.path().join("processor.log")).expect("log");
        let child = Command::new(std::env::current_exe().expect("own path"))
            .arg("serve-processor")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn processor");
        Member {
            child,
            metrics,
            _dir: dir,
        }
    }

    async fn scrape(&self) -> String {
        match reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        self.scrape()
            .await
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until the member has partitions; panics at `deadline`.
    async fn wait_assigned(&self, deadline: Instant, mode: &str) {
        while self.metric("spillway_assigned_partitions").await < 1.0 {
            assert!(
                Instant::now() < deadline,
                "{mode}: a member got no partitions"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM and wait for the exit; returns the partitions revoked from it before the stop.
    async fn stop(mut self) -> f64 {
        let revoked = self.metric("spillway_revoked_partitions_total").await;
        // SAFETY: kill(2) has no memory preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = tokio::task::spawn_blocking(move || self.child.wait()).await;
        revoked
    }
}

/// Completions per second over `[from, to)`.
fn rate(firsts: &[Instant], from: Instant, to: Instant) -> f64 {
    let n = firsts.iter().filter(|t| **t >= from && **t < to).count();
    n as f64 / to.duration_since(from).as_secs_f64().max(1e-3)
}

async fn run_mode(mode: &str, bootstrap: &str) {
    let stop = tokio_util::sync::CancellationToken::new();
    let mut sim_config =
        spillway_mock_llm::SimulatorConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    sim_config.latency_ms = LLM_MS;
    let (sim_addr, _sim) = spillway_mock_llm::serve(sim_config, stop.clone())
        .await
        .expect("simulator");
    let (sink, seen) = receiver().await;
    let tag = format!(
        "{}-{mode}-{}",
        std::process::id(),
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let (topic, dlq) = (format!("rb-{tag}"), format!("rb-dlq-{tag}"));
    create_topic(bootstrap, &topic, PARTITIONS).await;
    create_topic(bootstrap, &dlq, 1).await;
    produce_events(bootstrap, &topic, &Events::comments(EVENTS, KEYS)).await;
    let group = match mode {
        "eager" => "session_timeout_ms = 10000\npartition_assignment_strategy = \"range\"",
        "cooperative" => "session_timeout_ms = 10000",
        "kip848" => "group_protocol = \"consumer\"",
        other => panic!("unknown mode {other}"),
    };
    let config = format!(
        r#"
[kafka]
brokers = "{bootstrap}"
group_id = "rb-{tag}"
topics = ["{topic}"]
{group}
[kafka.properties]
"fetch.wait.max.ms" = 100
[processor]
max_in_flight = {IN_FLIGHT}
commit_interval_ms = 1000
rebalance_timeout_ms = 20000
[dlq]
topic = "{dlq}"
[telemetry]
metrics_addr = "127.0.0.1:0"
log_format = "text"

[[steps]]
type = "llm"
name = "classify"
provider = "sim"
model = "mock-small"
system = "You classify blog comments. Answer with JSON only."
user = "Comment: {{{{ data.text }}}}"
max_tokens = 16
output = {{ format = "json" }}

[[steps]]
type = "webhook"
name = "notify"
url = "http://{sink}/events"
timeout_ms = 10000

[llm.providers.sim]
api = "openai"
base_url = "http://{sim_addr}"
api_key = "bench"
requests_per_minute = 10000000
"#
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    let done = |seen: &Arc<Mutex<Seen>>| seen.lock().unwrap().firsts.len() as u64;
    let mut members: Vec<Member> = (0..MEMBERS).map(|_| Member::spawn(&config)).collect();
    for m in &members {
        m.wait_assigned(deadline, mode).await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let roll_start = Instant::now();
    let steady = rate(
        &seen.lock().unwrap().firsts,
        roll_start - Duration::from_secs(5),
        roll_start,
    );
    let mut revoked = 0.0;
    for i in 0..MEMBERS {
        revoked += members.remove(i).stop().await;
        members.insert(i, Member::spawn(&config));
        members[i].wait_assigned(deadline, mode).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let roll_end = Instant::now();
    // Revoked during the roll: each stopped member's count just before its SIGTERM, plus the
    // live members' now (the final shutdown below is not part of the roll).
    for m in &members {
        revoked += m.metric("spillway_revoked_partitions_total").await;
    }
    let (during, lowest) = {
        let s = seen.lock().unwrap();
        let during = s
            .firsts
            .iter()
            .filter(|t| **t >= roll_start && **t < roll_end)
            .count();
        let mut lowest = f64::MAX;
        let mut t = roll_start;
        while t + Duration::from_secs(1) <= roll_end {
            lowest = lowest.min(rate(&s.firsts, t, t + Duration::from_secs(1)));
            t += Duration::from_millis(250);
        }
        (during, lowest)
    };
    while done(&seen) < EVENTS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for m in members {
        m.stop().await;
    }
    stop.cancel();
    let roll = roll_end.duration_since(roll_start).as_secs_f64();
    let cost = (steady * roll - during as f64).max(0.0);
    println!(
        "{mode:>11}: steady {steady:.0} events/s; roll {roll:.1} s; {during} completed during it \
         ({:.0}/s), {cost:.0} events short of the steady rate ({:.0} %); lowest 1 s rate {lowest:.0}/s; \
         {revoked:.0} partitions revoked during the roll; lost {}",
        during as f64 / roll,
        100.0 * cost / (steady * roll).max(1.0),
        EVENTS - done(&seen)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if spillway_load_tests::serve_processor_if_asked(&runtime, &args) {
        return;
    }
    let modes: Vec<String> = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec!["eager".into(), "cooperative".into(), "kip848".into()]
    };
    runtime.block_on(async {
        let (_broker, bootstrap) = start_broker();
        println!(
            "# Rolling restart of {MEMBERS} members: {EVENTS} events, {PARTITIONS} partitions, {LLM_MS} ms LLM step, max_in_flight {IN_FLIGHT} per member"
        );
        let repeat: usize = std::env::var("BENCH_REPEAT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        for _ in 0..repeat {
            for mode in &modes {
                run_mode(mode, &bootstrap).await;
            }
        }
    });
}

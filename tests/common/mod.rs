//! Test harness on top of the shared test kit (`spillway-testkit`: the broker process, the
//! registry, tools, ports, topics, waits): one broker per test binary or one of a test's own
//! (lanes), producer helpers, a recording HTTP sink, in-process scripted steps, and condition waits
//! with deadlines.
//!
//! The broker is started by `scripts/broker.sh run`, which installs Apache Kafka through
//! `scripts/tools.sh kafka` on first use. If it cannot be installed or started, the test
//! fails with the reason: nothing here ever skips.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

mod kafka;
mod process;
#[allow(unused_imports)]
pub use kafka::*;
#[allow(unused_imports)]
pub use process::*;

// Re-exported for every test binary; each uses only some of them.
#[allow(unused_imports)]
pub use spillway_testkit::{
    blocking, create_topic, free_port, tool, unique, wait_until, wait_until_async,
    wait_until_blocking, BrokerProcess, Registry, ROOT,
};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

/// An Apache Kafka broker (KRaft, single node) on loopback, run by `scripts/broker.sh run`.
///
/// [`Broker::start`] hands out the broker shared by every test of this test binary (each
/// test uses its own topics and groups); [`Broker::start_own`] starts one only this test
/// uses, for tests that kill or restart it. Every broker process dies with the test process
/// (`PR_SET_PDEATHSIG`), so an aborted run leaves no JVM behind.
pub struct Broker {
    port: u16,
    own: Option<BrokerProcess>,
    _lane: Lane,
}

impl Broker {
    /// The broker shared by this test binary, started on first use.
    pub fn start() -> Broker {
        Self::shared(Lane::shared())
    }

    /// The shared broker, with no other test of this binary that uses a broker running
    /// beside this one: for crash, rebalance and timing-sensitive tests on 2 cores.
    pub fn start_exclusive() -> Broker {
        Self::shared(Lane::exclusive())
    }

    fn shared(lane: Lane) -> Broker {
        static SHARED: OnceLock<u16> = OnceLock::new();
        let port = *SHARED.get_or_init(|| {
            let process = blocking(|| {
                BrokerProcess::start_in(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("brokers"))
            });
            let port = process.port();
            // Never stopped: it dies with this process (PR_SET_PDEATHSIG); its data directory
            // is removed by the next test process's `broker_dir`.
            std::mem::forget(process);
            port
        });
        Broker {
            port,
            own: None,
            _lane: lane,
        }
    }

    /// A broker of this test's own, with its data on disk: it can be killed and restarted.
    /// It runs with no other broker test of this binary beside it.
    pub fn start_own() -> Broker {
        let lane = Lane::exclusive();
        let process = blocking(|| {
            BrokerProcess::start_in(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("brokers"))
        });
        Broker {
            port: process.port(),
            own: Some(process),
            _lane: lane,
        }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL the broker (only a broker of the test's own).
    pub fn kill(&mut self) {
        self.own_process().kill();
    }

    /// Starts the broker again on the same ports and data (only a broker of the test's own).
    pub fn restart(&mut self) {
        let p = self.own_process();
        p.kill();
        p.spawn();
    }

    fn own_process(&mut self) -> &mut BrokerProcess {
        self.own
            .as_mut()
            .expect("only a broker from Broker::start_own can be killed or restarted")
    }
}

/// Who may run beside whom: any number of shared-lane tests at once, or one exclusive test.
/// On 2 cores, crash, rebalance and broker-restart tests run with no other broker test.
pub struct Lane {
    exclusive: bool,
}

static LANES: Mutex<(usize, bool)> = Mutex::new((0, false));
static LANES_CHANGED: std::sync::Condvar = std::sync::Condvar::new();

impl Lane {
    fn shared() -> Lane {
        let mut s = LANES.lock().unwrap_or_else(|e| e.into_inner());
        while s.1 {
            s = LANES_CHANGED.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.0 += 1;
        Lane { exclusive: false }
    }

    fn exclusive() -> Lane {
        let mut s = LANES.lock().unwrap_or_else(|e| e.into_inner());
        // Claim first, so a stream of shared tests cannot starve this one.
        while s.1 {
            s = LANES_CHANGED.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.1 = true;
        while s.0 > 0 {
            s = LANES_CHANGED.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Lane { exclusive: true }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let mut s = LANES.lock().unwrap_or_else(|e| e.into_inner());
        if self.exclusive {
            s.1 = false;
        } else {
            s.0 -= 1;
        }
        LANES_CHANGED.notify_all();
    }
}
/// What the recording HTTP sink received.
#[derive(Clone, Default)]
pub struct Received {
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    /// The `Idempotency-Key` of each request, in the order of `bodies`.
    pub idempotency_keys: Arc<Mutex<Vec<String>>>,
}

impl Received {
    pub fn len(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }

    /// Event ids received (topic/partition/offset for records without `ce_id`).
    pub fn ids(&self) -> Vec<String> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Each body's `data.text`, in arrival order (`?` where there is none).
    pub fn texts(&self) -> Vec<String> {
        (self.bodies.lock().unwrap().iter())
            .map(|b| b["data"]["text"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    /// (key, seq) pairs in arrival order.
    pub fn seqs(&self) -> Vec<(String, u64)> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["data"]["key"].as_str().unwrap_or_default().to_string(),
                    b["data"]["seq"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect()
    }
}

/// An HTTP server on loopback that records every JSON body POSTed to it and answers 200.
pub async fn recording_sink() -> (SocketAddr, Received) {
    recording_sink_with(Duration::ZERO).await
}

/// Like [`recording_sink`], but each request takes `delay` before it is recorded and answered.
pub async fn recording_sink_with(delay: Duration) -> (SocketAddr, Received) {
    use axum::routing::post;
    let received = Received::default();
    let r = received.clone();
    let app = axum::Router::new().route(
        "/events",
        post(
            move |headers: axum::http::HeaderMap,
                  axum::Json(body): axum::Json<serde_json::Value>| {
                let r = r.clone();
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
                    let mut bodies = r.bodies.lock().unwrap();
                    r.idempotency_keys
                        .lock()
                        .unwrap()
                        .push(key.unwrap_or_default().to_string());
                    bodies.push(body);
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, received)
}

/// A processor configuration for tests: fast group joins and commits, port-0 telemetry.
pub fn config_toml(bootstrap: &str, group: &str, topic: &str, dlq: &str, extra: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "{bootstrap}"
group_id = "{group}"
topics = ["{topic}"]
session_timeout_ms = 6000
statistics_interval_ms = 1000
[kafka.properties]
"fetch.wait.max.ms" = 100
"topic.metadata.refresh.interval.ms" = 2000
[dlq]
topic = "{dlq}"
[telemetry]
metrics_addr = "127.0.0.1:0"
{extra}
"#
    )
}

/// Reads a metric's value from a Prometheus text exposition (first matching series).
pub fn metric_value(text: &str, series_prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sum of every series of a metric family whose line starts with `series_prefix`.
pub fn metric_sum(text: &str, series_prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(series_prefix))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

pub async fn scrape(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics body")
}

/// Decides, from an event's payload, whether the step keeps holding it.
pub type HoldFn = Arc<dyn Fn(&serde_json::Value) -> bool + Send + Sync>;

/// What a [`ScriptedStep`] saw, per event: (key, seq, partition, offset).
pub type Seen = Arc<Mutex<Vec<(String, u64, i32, i64)>>>;

/// An in-process step with scripted latency and failures, recording what it processed.
pub struct ScriptedStep {
    pub seen: Seen,
    /// Latency of each call, uniform in `0..=max_latency_ms`.
    pub max_latency_ms: u64,
    /// Returns an error to fail the event with, given its JSON payload.
    pub fail: fn(&serde_json::Value) -> Option<spillway::step::StepError>,
    /// While this returns true for an event, the call does not finish.
    pub hold: Option<HoldFn>,
}

impl ScriptedStep {
    pub fn new(max_latency_ms: u64) -> (Self, Seen) {
        let seen: Seen = Default::default();
        (
            ScriptedStep {
                seen: seen.clone(),
                max_latency_ms,
                fail: |_| None,
                hold: None,
            },
            seen,
        )
    }
}

impl spillway::step::Step for ScriptedStep {
    fn name(&self) -> &str {
        "scripted"
    }

    fn run<'a>(
        &'a self,
        ctx: &'a spillway::step::EventContext,
        _attempt: spillway::step::Attempt,
    ) -> spillway::step::BoxFuture<'a, Result<spillway::step::StepOutput, spillway::step::StepError>>
    {
        use rdkafka::Message;
        Box::pin(async move {
            let data = &ctx.event.data;
            if let Some(hold) = &self.hold {
                while hold(data) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            if self.max_latency_ms > 0 {
                let ms = rand::random_range(0..=self.max_latency_ms);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if let Some(e) = (self.fail)(data) {
                return Err(e);
            }
            self.seen.lock().unwrap().push((
                data["key"].as_str().unwrap_or_default().to_string(),
                data["seq"].as_u64().unwrap_or(u64::MAX),
                ctx.record.partition(),
                ctx.record.offset(),
            ));
            Ok(spillway::step::StepOutput::none())
        })
    }
}

/// Per-key order violations in a sequence of (key, seq): a seq not greater than the
/// previous one seen for its key.
pub fn order_violations(seqs: impl IntoIterator<Item = (String, u64)>) -> usize {
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut violations = 0;
    for (k, s) in seqs {
        if let Some(prev) = last.get(&k) {
            if s <= *prev {
                violations += 1;
            }
        }
        last.insert(k, s);
    }
    violations
}

/// Starts an in-process processor with the given steps; returns its metrics address and
/// the task running it.
pub async fn start_processor(
    toml: &str,
    steps: Vec<Arc<dyn spillway::step::Step>>,
    shutdown: tokio_util::sync::CancellationToken,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<Result<(), spillway::processor::ProcessorError>>,
) {
    let config = spillway::config::Config::from_toml(toml).expect("test config is valid");
    let p = spillway::processor::Processor::start(config, steps.into(), shutdown)
        .await
        .expect("processor starts");
    let addr = p.metrics_addr();
    (addr, tokio::spawn(p.run()))
}

/// Asserts that for every partition, every offset below the group's committed offset was
/// finished (received by the sink, whose ids are `topic/partition/offset`).
pub fn assert_commits_cover_only_finished(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    received: &Received,
) -> HashMap<i32, i64> {
    // Commits first, then the sink: the sink holds every finished record, so reading it
    // second can only add records; the other order races with a running processor.
    let c = committed(bootstrap, group, topic, partitions);
    let ids: std::collections::HashSet<String> = received.ids().into_iter().collect();
    for (p, off) in &c {
        for o in 0..*off {
            assert!(
                ids.contains(&format!("{topic}/{p}/{o}")),
                "committed offset {off} of partition {p} passes unfinished offset {o}"
            );
        }
    }
    c
}

/// Ids received more than once.
pub fn duplicates(received: &Received) -> usize {
    let ids = received.ids();
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    ids.len() - distinct.len()
}

/// A test config whose single step is the webhook sink at `sink`.
pub fn webhook_config(
    bootstrap: &str,
    group: &str,
    topic: &str,
    dlq: &str,
    sink: SocketAddr,
    processor: &str,
) -> String {
    config_toml(
        bootstrap,
        group,
        topic,
        dlq,
        &format!(
            "[[steps]]\ntype = \"webhook\"\nurl = \"http://{sink}/events\"\ntimeout_ms = 10000\n{processor}"
        ),
    )
}

/// `toml` with its journal state in `dir`, unless it names a `state_dir` itself.
pub fn with_state_dir(toml: &str, dir: &Path) -> String {
    if toml.contains("[journal]\n") && !toml.contains("state_dir") {
        toml.replacen(
            "[journal]\n",
            &format!("[journal]\nstate_dir = \"{}\"\n", dir.display()),
            1,
        )
    } else {
        toml.to_string()
    }
}

/// Starts a processor in this process on `toml` (its journal state, if any, in a directory
/// of its own under the test target's temporary directory).
pub async fn start_configured(
    toml: &str,
    shutdown: tokio_util::sync::CancellationToken,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<Result<(), spillway::processor::ProcessorError>>,
) {
    let state = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("state")
        .join(unique("processor"));
    let config = spillway::config::Config::from_toml(&with_state_dir(toml, &state))
        .expect("test config is valid");
    let p = spillway::pipeline::start(config, shutdown)
        .await
        .expect("processor starts");
    let addr = p.metrics_addr();
    (addr, tokio::spawn(p.run()))
}

/// A provider simulator (`spillway mock-llm`) on a loopback port, stopped on drop.
pub struct Sim {
    pub base: String,
    stop: tokio_util::sync::CancellationToken,
}

impl Sim {
    pub async fn start(tune: impl FnOnce(&mut spillway_mock_llm::SimulatorConfig)) -> Sim {
        let mut config =
            spillway_mock_llm::SimulatorConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        tune(&mut config);
        let stop = tokio_util::sync::CancellationToken::new();
        let (addr, _task) = spillway_mock_llm::serve(config, stop.clone())
            .await
            .expect("simulator starts");
        Sim {
            base: format!("http://{addr}"),
            stop,
        }
    }

    pub async fn stats(&self) -> spillway_mock_llm::Stats {
        reqwest::get(format!("{}/stats", self.base))
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats body")
    }

    /// Swaps the simulator's fault rates (and clears its script) at run time.
    pub async fn set_faults(&self, faults: &str) {
        let status = reqwest::Client::new()
            .post(format!("{}/control", self.base))
            .json(&serde_json::json!({"faults": faults, "script": ""}))
            .send()
            .await
            .expect("control")
            .status();
        assert!(status.is_success(), "control answered {status}");
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A JSON record `{"text": ..}` keyed by `key`, for LLM pipelines.
pub fn text_rec(key: &str, text: &str) -> Rec {
    Rec {
        key: Some(key.to_string()),
        value: serde_json::json!({ "text": text }).to_string().into_bytes(),
        headers: vec![],
    }
}

/// One request as a server saw it: method, path and its `authorization`/`x-api-key` values.
pub type SeenRequests = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// A server that answers every request, whatever its method or path, with `status` and an
/// optional `Location`, recording what it saw.
pub async fn answering_server(
    status: u16,
    location: Option<String>,
) -> (std::net::SocketAddr, SeenRequests) {
    let seen: SeenRequests = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let s = s.clone();
        let location = location.clone();
        async move {
            let credential = ["authorization", "x-api-key"]
                .iter()
                .find_map(|h| req.headers().get(*h))
                .map(|v| v.to_str().unwrap_or_default().to_string());
            s.lock().unwrap().push((
                req.method().to_string(),
                req.uri().path().to_string(),
                credential,
            ));
            let mut response = axum::response::Response::builder().status(status);
            if let Some(l) = location {
                response = response.header("location", l);
            }
            response
                .body(axum::body::Body::from("{\"ok\":true}"))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

/// A redirector on one port pointing at a receiver on another (another origin, as another
/// host would be), with a token in the redirect's path and query. Returns the redirector,
/// the receiver's origin and what the receiver saw.
pub async fn redirect_to_elsewhere(status: u16) -> (std::net::SocketAddr, String, SeenRequests) {
    let (target, target_seen) = answering_server(200, None).await;
    let origin = format!("http://{target}");
    let (redirector, _) =
        answering_server(status, Some(format!("{origin}/{TOKEN}?t={TOKEN}"))).await;
    (redirector, origin, target_seen)
}

/// A secret in the redirect's `Location`, which must not reach logs or DLQ headers.
pub const TOKEN: &str = "t0k3n-in-the-path";

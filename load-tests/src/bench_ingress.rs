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

/// What one step of offered load gave.
#[derive(Debug, Clone, Default)]
struct StepResult {
    offered: f64,
    achieved: f64,
    failed: usize,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    cpu_us: f64,
    /// CPU µs per request of the broker (Apache Kafka) and of this load generator: on 2 cores the
    /// three share the machine, so these say what is left for the serving process.
    broker_cpu_us: f64,
    client_cpu_us: f64,
    /// Global indices of the requests answered 202 (HTTP systems only).
    accepted: Vec<usize>,
}

impl StepResult {
    fn sustainable(&self) -> bool {
        self.failed == 0 && self.p99_ms <= P99_BOUND_MS && self.achieved >= 0.97 * self.offered
    }
}

fn percentiles(mut lat_us: Vec<u32>) -> (f64, f64, f64) {
    if lat_us.is_empty() {
        return (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    }
    lat_us.sort_unstable();
    let at =
        |q: f64| lat_us[((lat_us.len() as f64 * q) as usize).min(lat_us.len() - 1)] as f64 / 1e3;
    (at(0.50), at(0.99), at(0.999))
}

/// The broker's process id, once started (its CPU is printed beside each step's).
static BROKER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// CPU seconds so far of the broker, 0 before it started.
fn broker_cpu() -> f64 {
    BROKER_PID.get().map_or(0.0, |pid| process_cpu(*pid))
}

/// CPU seconds (user + system) of process `pid` so far.
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Reads one HTTP/1.1 response (head plus a Content-Length body); returns its status.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            let total = end + 4 + len;
            while buf.len() < total {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..total);
            return Ok(status);
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Offers `requests` at `rate` per second over `CONNECTIONS` keep-alive connections.
/// `serving_pid` is the process whose CPU is charged to the requests.
async fn http_step(
    addr: SocketAddr,
    first: usize,
    requests: Vec<Bytes>,
    rate: f64,
    serving_pid: u32,
) -> StepResult {
    let n = requests.len();
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut streams = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        streams.push(s);
    }
    let cpu0 = process_cpu(serving_pid);
    let (broker0, client0) = (broker_cpu(), self_cpu());
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let (requests, next) = (requests.clone(), next.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n / CONNECTIONS + 16);
                let (mut ok, mut failed) = (Vec::new(), 0usize);
                let mut buf = Vec::with_capacity(8192);
                let mut last = t0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let at = t0 + interval * i as u32;
                    tokio::time::sleep_until(at).await;
                    let sent = stream.write_all(&requests[i]).await;
                    let status = match sent {
                        Ok(()) => read_response(&mut stream, &mut buf).await.unwrap_or(0),
                        Err(_) => 0,
                    };
                    let now = tokio::time::Instant::now();
                    last = last.max(now);
                    lat.push(now.duration_since(at).as_micros().min(u32::MAX as u128) as u32);
                    if status == 202 {
                        ok.push(first + i);
                    } else {
                        failed += 1;
                        if status == 0 {
                            break; // the connection is gone; the others carry on
                        }
                    }
                }
                (lat, ok, failed, last)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    let (mut accepted, mut failed, mut last) = (Vec::with_capacity(n), 0, t0);
    for t in tasks {
        let (l, o, f, e) = t.await.expect("load task");
        all.extend(l);
        accepted.extend(o);
        failed += f;
        last = last.max(e);
    }
    let ok = accepted.len();
    let cpu = process_cpu(serving_pid) - cpu0;
    let (broker, client) = (broker_cpu() - broker0, self_cpu() - client0);
    let secs = last.duration_since(t0).as_secs_f64().max(1e-3);
    let (p50, p99, p999) = percentiles(all);
    StepResult {
        offered: rate,
        achieved: ok as f64 / secs,
        failed: failed + (n - ok - failed),
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        cpu_us: per_request(cpu, ok),
        broker_cpu_us: per_request(broker, ok),
        client_cpu_us: per_request(client, ok),
        accepted,
    }
}

fn per_request(cpu_secs: f64, requests: usize) -> f64 {
    if requests > 0 {
        cpu_secs * 1e6 / requests as f64
    } else {
        0.0
    }
}

/// Offers `n` 1 KB records at `rate` per second to an idempotent `acks=all` producer.
async fn raw_step(
    producer: &FutureProducer,
    topic: &str,
    first: usize,
    n: usize,
    rate: f64,
) -> StepResult {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let values: Vec<(String, Vec<u8>)> = (first..first + n)
        .map(|i| {
            let id = format!("raw:msg_{i}");
            let b = body(&id);
            (id, b)
        })
        .collect();
    let (cpu0, broker0) = (self_cpu(), broker_cpu());
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut pending = Vec::with_capacity(n);
    for (i, (key, value)) in values.iter().enumerate() {
        let at = t0 + interval * i as u32;
        tokio::time::sleep_until(at).await;
        let delivery = producer
            .send_result(FutureRecord::to(topic).key(key).payload(value))
            .map_err(|(e, _)| e);
        pending.push(tokio::spawn(async move {
            let ok = match delivery {
                Ok(f) => matches!(f.await, Ok(Ok(_))),
                Err(_) => false,
            };
            let now = tokio::time::Instant::now();
            (ok, now, now.duration_since(at).as_micros() as u32)
        }));
    }
    let (mut ok, mut failed, mut last, mut lat) = (0, 0, t0, Vec::with_capacity(n));
    let mut accepted = Vec::with_capacity(n);
    for (i, p) in pending.into_iter().enumerate() {
        let (good, at, l) = p.await.expect("delivery task");
        if good {
            accepted.push(first + i);
            ok += 1;
        } else {
            failed += 1;
        }
        last = last.max(at);
        lat.push(l);
    }
    let (cpu, broker) = (self_cpu() - cpu0, broker_cpu() - broker0);
    let secs = last.duration_since(t0).as_secs_f64().max(1e-3);
    let (p50, p99, p999) = percentiles(lat);
    StepResult {
        offered: rate,
        achieved: ok as f64 / secs,
        failed,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        cpu_us: per_request(cpu, ok),
        broker_cpu_us: per_request(broker, ok),
        // The producer is this process: its CPU is the serving CPU.
        client_cpu_us: 0.0,
        accepted,
    }
}

fn self_cpu() -> f64 {
    process_cpu(std::process::id())
}

/// Climbs the offered rate by ×1.5 until a step is not sustainable, then bisects twice.
/// Returns the best sustainable step (if any) and every step's result.
async fn sweep<F, Fut>(
    name: &str,
    opts: &Opts,
    mut step: F,
) -> (Option<StepResult>, Vec<StepResult>)
where
    F: FnMut(f64, usize) -> Fut,
    Fut: std::future::Future<Output = StepResult>,
{
    let seconds = opts.seconds;
    let mut best: Option<StepResult> = None;
    let mut all = Vec::new();
    let mut fail: Option<f64> = None;
    let mut rate = opts.rate.unwrap_or(500.0);
    let mut tries = 0;
    println!(
        "  {name}: offered → achieved req/s, p50 / p99 / p99.9 ms, CPU µs/req (serving; broker, load generator)"
    );
    let mut retried = false;
    loop {
        tries += 1;
        let n = (rate * seconds) as usize;
        let r = step(rate, n).await;
        // One latency spike (the broker, the other processes on a small machine) should not
        // end the climb: a failed step is run once more before the rate counts as too high.
        let retry = !r.sustainable() && r.failed == 0 && !retried && opts.rate.is_none();
        println!(
            "    {:>8.0} → {:>8.0}  {:>6.2} / {:>6.2} / {:>6.2}  {:>6.1} ({:.1}, {:.1}){}",
            r.offered,
            r.achieved,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.cpu_us,
            r.broker_cpu_us,
            r.client_cpu_us,
            if r.sustainable() {
                String::new()
            } else if retry {
                "  ✗ (run again)".to_string()
            } else {
                format!("  ✗ ({} failed)", r.failed)
            }
        );
        all.push(r.clone());
        if retry {
            retried = true;
            continue;
        }
        retried = false;
        if r.sustainable() {
            best = Some(r.clone());
        } else {
            fail = Some(rate);
        }
        let lo = best.as_ref().map_or(0.0, |b| b.offered);
        rate = match fail {
            None => rate * 1.5,
            Some(hi) => (lo + hi) / 2.0,
        };
        // Two bisections after the first failure, or give up on a system that cannot even
        // sustain the lowest rate; a fixed rate is one step.
        if opts.rate.is_some()
            || tries >= 25
            || fail.is_some_and(|hi| (hi - lo) / hi < 0.12)
            || (best.is_none() && tries >= 3)
        {
            break;
        }
    }
    (best, all)
}

/// Starts this binary again as `role` (a serving child whose CPU is measured on its own).
fn spawn_child(args: &[&str]) -> Child {
    Command::new(std::env::current_exe().expect("own path"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn serving child")
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; SIGTERM lets the ingress drain and flush.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

async fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_ready(metrics: SocketAddr) {
    let url = format!("http://{metrics}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        assert!(Instant::now() < deadline, "ingress never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ids of every record in `topic`, with how often each occurs.
/// Reads every partition of `topic` to its end. The end is where a fetch reports
/// `PartitionEOF`, not the ListOffsets high watermark: tansu 0.6 can answer ListOffsets with
/// an offset below the log end (the base of the last batch), which would make records that
/// are there look lost. Returns (records read, the watermarks' sum, distinct keys).
fn topic_ids(bootstrap: &str, topic: &str) -> (usize, i64, HashSet<String>) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("verify-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut watermarks = 0i64;
    for p in 0..PARTITIONS {
        let (lo, hi) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        watermarks += hi - lo;
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .expect("offset");
    }
    c.assign(&tpl).expect("assign");
    let (mut total, mut ids) = (0usize, HashSet::new());
    let mut at_end = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    while at_end.len() < PARTITIONS as usize && Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                total += 1;
                if let Some(k) = m.key() {
                    ids.insert(String::from_utf8_lossy(k).into_owned());
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            _ => {}
        }
    }
    if at_end.len() < PARTITIONS as usize {
        println!("WARNING: {topic} was not read to its end before the deadline; the counts below are incomplete");
    }
    (total, watermarks, ids)
}

// ---------------------------------------------------------------------------------------
// Serving children.

/// `bench-ingress serve-hmac ADDR [BOOTSTRAP TOPIC]`: reads each body, verifies it like the
/// ingress and answers 202; with a broker, first produces the raw body keyed by its
/// `webhook-id` (idempotent, `acks=all`) and answers after the delivery report: the floor
/// of any verify-then-produce service, with none of the ingress's other work.
async fn serve_hmac(addr: SocketAddr, kafka: Option<(String, String)>) {
    use http_body_util::{BodyExt, Full};
    use hyper::{Response, StatusCode};
    let secret = Arc::new(Secret::new(&Scheme::StandardWebhooks, WHSEC).expect("secret"));
    let producer = kafka.map(|(bootstrap, topic)| {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger_ms().to_string())
            .set("message.timeout.ms", "5000")
            .create()
            .expect("producer");
        Arc::new((p, topic))
    });
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let secret = secret.clone();
        let producer = producer.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let secret = secret.clone();
                    let producer = producer.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let bytes = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let verified = spillway::ingress::auth::verify(
                            &Scheme::StandardWebhooks,
                            std::slice::from_ref(&secret),
                            &parts.headers,
                            &bytes,
                            unix_secs(),
                            300,
                        );
                        let mut status = if verified.is_ok() {
                            StatusCode::ACCEPTED
                        } else {
                            StatusCode::UNAUTHORIZED
                        };
                        if let (Some(p), true) = (&producer, verified.is_ok()) {
                            let (producer, topic) = &**p;
                            let key = parts
                                .headers
                                .get("webhook-id")
                                .map(|v| format!("bench:{}", v.to_str().unwrap_or("")))
                                .unwrap_or_default();
                            let delivered = match producer
                                .send_result(FutureRecord::to(topic).key(&key).payload(&bytes[..]))
                            {
                                Ok(d) => matches!(d.await, Ok(Ok(_))),
                                Err(_) => false,
                            };
                            if !delivered {
                                status = StatusCode::SERVICE_UNAVAILABLE;
                            }
                        }
                        let mut r = Response::new(Full::new(Bytes::from_static(
                            br#"{"status":"accepted"}"#,
                        )));
                        *r.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `bench-ingress serve-ingress CONFIG`: the ingress service exactly as `spillway ingress`
/// runs it.
async fn serve_ingress(config: &str) {
    spillway::telemetry::init_logging(spillway::telemetry::LogFormat::Text);
    let config = spillway::ingress::config::IngressConfig::load(std::path::Path::new(config))
        .expect("bench ingress config");
    spillway::ingress::run(config, spillway::shutdown::on_signal())
        .await
        .expect("ingress ran");
}

// ---------------------------------------------------------------------------------------

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

/// `bench-ingress closed-loop`: the ceiling 64 connections put on any ingress that answers
/// after the ack. 64 tasks each keep one record in flight on a raw producer, as 64 HTTP/1.1
/// connections do; prints the rate, ack latency and CPU per record of this process and the broker.
async fn closed_loop() {
    let (broker, bootstrap) = start_broker();
    let topic = "bench-closed";
    create_topic(&bootstrap, topic, PARTITIONS).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms().to_string())
        .set("message.timeout.ms", "5000")
        .create()
        .expect("producer");
    let warm = raw_step(&producer, topic, 1 << 30, 64, 200.0).await;
    assert_eq!(warm.failed, 0, "warm-up failed");
    let producer = Arc::new(producer);
    for in_flight in [1usize, 8, 64] {
        let (cpu0, broker0) = (self_cpu(), process_cpu(broker.pid()));
        let t0 = Instant::now();
        let run = Duration::from_secs(3);
        let tasks: Vec<_> = (0..in_flight)
            .map(|t| {
                let producer = producer.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let value = body("closed");
                    let key = format!("k{t}");
                    while t0.elapsed() < run {
                        let s = Instant::now();
                        let r = producer
                            .send_result(FutureRecord::to(topic).key(&key).payload(&value))
                            .map_err(|(e, _)| e)
                            .expect("enqueue")
                            .await;
                        assert!(matches!(r, Ok(Ok(_))), "delivery failed: {r:?}");
                        lat.push(s.elapsed().as_micros() as u32);
                    }
                    lat
                })
            })
            .collect();
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.expect("task"));
        }
        let secs = t0.elapsed().as_secs_f64();
        let n = lat.len() as f64;
        let (cpu, broker_cpu) = (self_cpu() - cpu0, process_cpu(broker.pid()) - broker0);
        let (p50, p99, _) = percentiles(lat);
        println!(
            "{in_flight:>3} in flight, linger.ms {}: {:>7.0} records/s, ack p50 {p50:.2} ms p99 {p99:.2} ms; CPU µs/record: producer {:.1}, broker {:.1}",
            linger_ms(),
            n / secs,
            cpu * 1e6 / n,
            broker_cpu * 1e6 / n
        );
    }
}

/// `bench-ingress parts`: CPU µs of each step of the ingress's request path, in process, one
/// at a time over many 1 KB requests: what the ingress spends beyond hyper and librdkafka.
async fn parts() {
    use spillway::codec::{Envelope, EnvelopeEncoder};
    use spillway::ingress::replay::{Claim, ReplayCache};
    let registry = start_registry();
    const N: usize = 50_000;
    let secret = Secret::new(&Scheme::StandardWebhooks, WHSEC).expect("secret");
    let ts = unix_secs();
    let requests: Vec<(hyper::HeaderMap, Vec<u8>)> = (0..N)
        .map(|i| {
            let id = format!("msg_{i}");
            let b = body(&id);
            let mut h = hyper::HeaderMap::new();
            h.insert("webhook-id", id.parse().expect("header"));
            h.insert("webhook-timestamp", ts.to_string().parse().expect("header"));
            h.insert(
                "webhook-signature",
                secret
                    .sign_standard_webhooks(&id, ts, &b)
                    .parse()
                    .expect("header"),
            );
            (h, b)
        })
        .collect();
    let time = |name: &str, t0: Instant| {
        println!(
            "  {name:<34} {:>6.2} µs/request",
            t0.elapsed().as_secs_f64() * 1e6 / N as f64
        );
    };
    println!("# Ingress request path, in process, {N} requests of {BODY_BYTES} B");
    let t0 = Instant::now();
    for (h, b) in &requests {
        spillway::ingress::auth::verify(
            &Scheme::StandardWebhooks,
            std::slice::from_ref(&secret),
            h,
            b,
            ts,
            300,
        )
        .expect("verifies");
    }
    time("signature (Standard Webhooks)", t0);
    let t0 = Instant::now();
    for (_, b) in &requests {
        std::hint::black_box(spillway::ingress::source::parse_json(b).expect("json"));
    }
    time("JSON parse", t0);
    let cache = ReplayCache::new(Duration::from_secs(900), 1_000_000);
    let t0 = Instant::now();
    for i in 0..N {
        match cache.claim(&format!("bench:msg_{i}")).await {
            Claim::First(f) => f.accepted(),
            Claim::Duplicate => panic!("fresh id"),
        }
    }
    time("replay cache claim + accept", t0);
    // Memory: a million more ids, as many as `replay.max_ids` defaults to.
    let rss0 = rss_kb();
    for i in N..N + 1_000_000 {
        if let Claim::First(f) = cache.claim(&format!("bench:msg_{i}")).await {
            f.accepted();
        }
    }
    println!(
        "  {:<34} {:>6.0} bytes/id (RSS growth over 1,000,000 ids)",
        "replay cache memory",
        (rss_kb() - rss0) as f64 * 1024.0 / 1e6
    );
    let encoder = EnvelopeEncoder::new(&registry.url(), Duration::from_secs(5)).expect("encoder");
    let data = String::from_utf8(body("x")).expect("utf-8");
    fn envelope<'a>(id: &'a str, data: &'a str) -> Envelope<'a> {
        Envelope {
            id,
            source: "/webhooks/bench",
            event_type: "com.example.blog.comment",
            time: Some("2026-12-04T17:03:09.123Z"),
            subject: None,
            delivery_id: None,
            received_at_ms: Some(1),
            data,
        }
    }
    encoder
        .encode("bench-parts", &envelope("warm", &data))
        .await
        .expect("registers");
    let t0 = Instant::now();
    for i in 0..N {
        let id = format!("bench:msg_{i}");
        std::hint::black_box(
            encoder
                .encode("bench-parts", &envelope(&id, &data))
                .await
                .expect("encodes"),
        );
    }
    time("Avro envelope (cached schema id)", t0);
    let t0 = Instant::now();
    for i in 0..N {
        std::hint::black_box(spillway::codec::rfc3339_millis(i as i64));
    }
    time("ce_time text", t0);
}

/// This process's resident set, in kB.
fn rss_kb() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
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

//! Shared by the load-test binaries: an Apache Kafka broker (`scripts/broker.sh run`) and a
//! rivven-schema registry on free loopback ports, topic creation and a bulk producer.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

/// A running Apache Kafka broker (single KRaft node), killed on drop with its data.
pub struct Broker {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// The broker's process id (to charge its CPU in benchmarks).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of a tool from `env` or, failing that, from `scripts/tools.sh` (which installs
/// it once and caches it).
fn tool(env: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/tools.sh");
    let out = Command::new(script)
        .arg(name)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/tools.sh");
    assert!(out.status.success(), "installing {name} failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A running rivven-schema registry (Confluent-compatible REST API), killed on drop.
pub struct Registry {
    child: Child,
    port: u16,
}

impl Registry {
    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts rivven-schema on a free port and waits until it accepts connections.
pub fn start_registry() -> Registry {
    let port = free_port();
    let child = Command::new(tool("SPILLWAY_RIVVEN_BIN", "rivven-schema"))
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rivven-schema");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "rivven-schema did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry { child, port }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Starts Apache Kafka (`scripts/broker.sh run`, which installs it once) on a free port;
/// returns it and its bootstrap address.
pub fn start_broker() -> (Broker, String) {
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = std::fs::File::create(dir.path().join("broker.log")).expect("broker log");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/broker.sh");
    let child = Command::new(script)
        .arg("run")
        .env("BROKER_PORT", port.to_string())
        .env("BROKER_CONTROLLER_PORT", free_port().to_string())
        .env("BROKER_DIR", dir.path())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("start scripts/broker.sh run");
    let bootstrap = format!("127.0.0.1:{port}");
    let probe: rdkafka::producer::BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        || probe
            .client()
            .fetch_metadata(None, Duration::from_secs(2))
            .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "Apache Kafka did not start; see {}",
            dir.path().join("broker.log").display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (Broker { child, _dir: dir }, bootstrap)
}

/// Creates `topic` with `partitions` partitions.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin");
    for r in admin
        .create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .expect("create topics")
    {
        r.expect("topic created");
    }
}

/// Produces `(key, value)` records with an idempotent producer and waits for every ack.
pub async fn produce_records(
    bootstrap: &str,
    topic: &str,
    records: impl IntoIterator<Item = (String, String)>,
) -> Duration {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let started = Instant::now();
    let mut pending = Vec::with_capacity(4096);
    for (key, value) in records {
        let f = p
            .send_result(FutureRecord::to(topic).key(&key).payload(&value))
            .map_err(|(e, _)| e)
            .expect("enqueue");
        pending.push(f);
        if pending.len() == 4096 {
            for f in pending.drain(..) {
                f.await.expect("future").expect("delivered");
            }
        }
    }
    for f in pending {
        f.await.expect("future").expect("delivered");
    }
    p.flush(Timeout::After(Duration::from_secs(30)))
        .expect("flush");
    started.elapsed()
}

/// Demo and benchmark events: JSON `{"key","seq","text"}` with per-key sequence numbers and
/// CloudEvents headers (`ce_id` = `<id_prefix><i>`).
pub struct Events<'a> {
    /// How many.
    pub count: u64,
    /// Over how many keys (`<key_prefix><i mod keys>`).
    pub keys: u64,
    /// Key prefix.
    pub key_prefix: &'a str,
    /// `ce_id` prefix.
    pub id_prefix: &'a str,
    /// `ce_source`.
    pub source: &'a str,
    /// The text is `<text_prefix><i>`.
    pub text_prefix: &'a str,
}

impl Events<'static> {
    /// The benchmarks' comments: `k<i mod keys>`, `evt-<i>`, from `/bench`.
    pub fn comments(count: u64, keys: u64) -> Self {
        Events {
            count,
            keys,
            key_prefix: "k",
            id_prefix: "evt-",
            source: "/bench",
            text_prefix: "comment ",
        }
    }
}

impl Events<'_> {
    /// Event `i`: its key, its value and its CloudEvents headers. The same `i` gives the same
    /// record, so an upstream copy is `record(i)` again.
    pub fn record(&self, i: u64) -> (String, String, rdkafka::message::OwnedHeaders) {
        use rdkafka::message::{Header, OwnedHeaders};
        let key = format!("{}{}", self.key_prefix, i % self.keys);
        let value = format!(
            r#"{{"key":"{key}","seq":{},"text":"{}{i}"}}"#,
            i / self.keys,
            self.text_prefix
        );
        let id = format!("{}{i}", self.id_prefix);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "ce_source",
                value: Some(self.source),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("com.example.comment"),
            })
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            });
        (key, value, headers)
    }
}

/// Produces `events` with an idempotent producer and waits for every ack.
pub async fn produce_events(bootstrap: &str, topic: &str, events: &Events<'_>) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut pending = Vec::with_capacity(4096);
    for i in 0..events.count {
        let (key, value, headers) = events.record(i);
        let f = p
            .send_result(
                FutureRecord::to(topic)
                    .key(&key)
                    .payload(&value)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .expect("enqueue");
        pending.push(f);
        if pending.len() == 4096 {
            for f in pending.drain(..) {
                f.await.expect("future").expect("delivered");
            }
        }
    }
    for f in pending {
        f.await.expect("future").expect("delivered");
    }
    p.flush(Timeout::After(Duration::from_secs(30)))
        .expect("flush");
}

/// `<bench> serve-processor <config>`: the benchmark re-executed as a processor child (so a
/// SIGKILL or SIGTERM hits only the processor). Runs it to its end and returns true when
/// asked to; exits 1 if the processor fails.
pub fn serve_processor_if_asked(runtime: &tokio::runtime::Runtime, args: &[String]) -> bool {
    if args.get(1).map(String::as_str) != Some("serve-processor") {
        return false;
    }
    let config =
        spillway::config::Config::load(std::path::Path::new(&args[2])).expect("processor config");
    spillway::telemetry::init_logging(config.telemetry.log_format);
    let result = runtime.block_on(async {
        let shutdown = spillway::shutdown::on_signal();
        spillway::pipeline::run(config, shutdown).await
    });
    if let Err(e) = result {
        eprintln!("processor: {e}");
        std::process::exit(1);
    }
    true
}

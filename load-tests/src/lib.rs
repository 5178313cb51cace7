//! Shared by the load-test binaries: the broker, registry, ports and topics of the shared test
//! kit (`spillway-testkit`, also used by `tests/`), a bulk producer and event generators.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

pub use spillway_testkit::{create_topic, free_port, BrokerProcess, Registry};

/// Starts a rivven-schema registry on a free port (the shared test kit's).
pub fn start_registry() -> Registry {
    Registry::start()
}

/// Starts Apache Kafka (`scripts/broker.sh run`, which installs it once) on a free port;
/// returns it (killed, with its data, on drop) and its bootstrap address.
pub fn start_broker() -> (BrokerProcess, String) {
    let broker = BrokerProcess::start();
    let bootstrap = broker.bootstrap();
    (broker, bootstrap)
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

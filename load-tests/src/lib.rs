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

/// Sends one Standard Webhooks delivery (`webhook-id` = `id`, signed with `secret`) and
/// retries it like a well-behaved sender: after `Retry-After` on 429 and 503, and after a
/// second on a connection error, up to 20 times. Returns the final status (0: never answered).
pub async fn deliver_signed(
    client: &reqwest::Client,
    url: &str,
    secret: &spillway::ingress::auth::Secret,
    id: &str,
    body: &str,
) -> u16 {
    for _ in 0..20 {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs() as i64;
        let signature = secret.sign_standard_webhooks(id, ts, body.as_bytes());
        let r = client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body.to_string())
            .send()
            .await;
        let wait = match r {
            Ok(r) if matches!(r.status().as_u16(), 429 | 503) => r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(1),
            Ok(r) => return r.status().as_u16(),
            Err(_) => 1,
        };
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
    0
}

/// Reads every partition of `topic` from its start to its end as a `read_committed`
/// consumer (what a transactional sink promises its readers), calling `each` per record, for
/// at most `within`. Returns whether every partition's end was reached (false also when the
/// topic does not exist).
pub fn read_committed_to_end(
    brokers: &str,
    topic: &str,
    within: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "spillway-load-tests-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
        return false;
    };
    let partitions = md.topics().first().map_or(0, |t| t.partitions().len());
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .expect("partition");
    }
    if partitions == 0 || consumer.assign(&tpl).is_err() {
        return false;
    }
    let mut at_end = std::collections::HashSet::new();
    let deadline = Instant::now() + within;
    while at_end.len() < partitions && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                at_end.remove(&m.partition());
                each(&m);
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => eprintln!("reading {topic}: {e}"),
            None => {}
        }
    }
    at_end.len() >= partitions
}

//! Topics, producing, committed offsets and reading topics back.

use super::*;

/// A topic's configuration entries that are not broker defaults (e.g. `cleanup.policy`).
pub async fn topic_config(bootstrap: &str, topic: &str) -> HashMap<String, String> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let res = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("describe_configs request");
    let resource = res
        .into_iter()
        .next()
        .expect("one resource")
        .unwrap_or_else(|e| panic!("describe {topic}: {e:?}"));
    resource
        .entries
        .into_iter()
        .filter(|e| !e.is_default)
        .filter_map(|e| Some((e.name, e.value?)))
        .collect()
}

/// Sets `configs` on `topic`, keeping its other non-default entries (AlterConfigs replaces
/// the whole set).
pub async fn set_topic_config(bootstrap: &str, topic: &str, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AlterConfig, ResourceSpecifier};
    let mut all = topic_config(bootstrap, topic).await;
    for (k, v) in configs {
        all.insert(k.to_string(), v.to_string());
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (k, v) in &all {
        alter = alter.set(k, v);
    }
    for r in admin
        .alter_configs(
            [&alter],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("alter_configs request")
    {
        r.unwrap_or_else(|e| panic!("alter {topic}: {e:?}"));
    }
}

pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("producer")
}

/// One record to produce.
pub struct Rec {
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Rec {
    /// A JSON record `{"key":..,"seq":..}` keyed by `key`.
    pub fn seq(key: &str, seq: u64) -> Rec {
        Rec {
            key: Some(key.to_string()),
            value: format!(r#"{{"key":"{key}","seq":{seq}}}"#).into_bytes(),
            headers: vec![],
        }
    }
}

/// Produces every record and waits for all acknowledgements.
pub async fn produce_all(bootstrap: &str, topic: &str, recs: impl IntoIterator<Item = Rec>) {
    let p = producer(bootstrap);
    let mut pending = Vec::new();
    for r in recs {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut fr: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
            .payload(r.value.as_slice())
            .headers(headers);
        if let Some(k) = &r.key {
            fr = fr.key(k);
        }
        let fut = p.send_result(fr).map_err(|(e, _)| e).expect("enqueue");
        pending.push(fut);
        if pending.len() >= 5_000 {
            for f in pending.drain(..) {
                f.await.expect("delivery future").expect("delivery");
            }
        }
    }
    for f in pending {
        f.await.expect("delivery future").expect("delivery");
    }
    p.flush(Timeout::After(Duration::from_secs(30)))
        .expect("flush");
}

/// Committed offsets of `group` for `topic`'s partitions (missing = nothing committed).
pub fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    blocking(|| committed_inner(bootstrap, group, topic, partitions))
}

fn committed_inner(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> HashMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    got.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Reads every record of `topic` (from the beginning) until `count` arrived or `timeout`.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    blocking(|| read_topic_inner(bootstrap, topic, count, timeout))
}

fn read_topic_inner(
    bootstrap: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::Message;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let _ = m.offset();
            out.push(m.detach());
        }
    }
    out
}

/// Sum of the high watermarks of `topic`'s partitions: how many records it ever held.
pub fn records_in(bootstrap: &str, topic: &str, partitions: i32) -> i64 {
    blocking(|| {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("watermarks"))
            .create()
            .expect("consumer");
        (0..partitions)
            .map(|p| {
                c.fetch_watermarks(topic, p, Duration::from_secs(10))
                    .expect("watermarks")
                    .1
            })
            .sum()
    })
}

/// Reads every partition of `topic` from the beginning to its end (`PartitionEOF` on each),
/// at `isolation` (`read_committed` or `read_uncommitted`). With `read_committed` the end is
/// the last stable offset: records of open or aborted transactions are never returned.
pub fn read_to_eof(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    isolation: &str,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::error::KafkaError;
    use rdkafka::Message;
    blocking(|| {
        let c: spillway::kafka::Reader = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("eof-reader"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", isolation)
            .create_with_context(spillway::kafka::ReaderContext)
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition");
        }
        c.assign(&tpl).expect("assign");
        let mut at_end = std::collections::HashSet::new();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while (at_end.len() as i32) < partitions {
            assert!(
                Instant::now() < deadline,
                "{topic}: no end of partition within 60 s ({} of {partitions} partitions)",
                at_end.len()
            );
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    at_end.remove(&m.partition());
                    out.push(m.detach());
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        out
    })
}

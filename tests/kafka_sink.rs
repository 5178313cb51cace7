//! The Kafka result-topic sink, against Apache Kafka (and MockCluster for an injected fence).
//!
//! - Transactional (the default): Confluent-framed Avro of `schemas/result.avsc`; under
//!   SIGKILL before the send, between the send and the commit, and after the commit, a
//!   `read_committed` reader sees exactly one result per event and never an aborted one; a
//!   stalled instance that its group gave up on is fenced and commits nothing visible.
//! - `transactional = false`: under SIGKILL at every step boundary no event without a
//!   result, at most one repeat per event in flight, no second LLM call.
//! - MockCluster: a commit refused as fenced closes the lane, and the next one re-reads the
//!   journal and writes nothing twice.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use rdkafka::Message;

const PARTITIONS: i32 = 3;
const IN_FLIGHT: u64 = 4;

fn comment(key: &str, id: &str) -> Rec {
    Rec {
        key: Some(key.to_string()),
        value: format!(r#"{{"text":"comment {id}"}}"#).into_bytes(),
        headers: vec![
            ("ce_id".into(), id.into()),
            ("ce_source".into(), "/test".into()),
            ("ce_type".into(), "com.example.comment".into()),
            ("ce_specversion".into(), "1.0".into()),
        ],
    }
}

struct Names {
    topic: String,
    results: String,
    group: String,
    journal: String,
    dlq: String,
}

fn new_names(prefix: &str) -> Names {
    Names {
        topic: unique(prefix),
        results: unique(&format!("{prefix}-results")),
        group: unique("g"),
        journal: unique(&format!("{prefix}-journal")),
        dlq: unique(&format!("{prefix}-dlq")),
    }
}

async fn names(broker: &Broker, prefix: &str) -> Names {
    let n = new_names(prefix);
    create_topic(&broker.bootstrap(), &n.topic, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &n.results, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &n.journal, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &n.dlq, 1).await;
    n
}

/// An LLM classification, then the result topic (`format`: avro or json).
fn toml(
    bootstrap: &str,
    n: &Names,
    sim: &Sim,
    format: &str,
    registry: Option<&str>,
    transactional: bool,
) -> String {
    let codec = registry
        .map(|url| format!("[codec]\nschema_registry_url = \"{url}\"\n"))
        .unwrap_or_default();
    config_toml(
        bootstrap,
        &n.group,
        &n.topic,
        &n.dlq,
        &format!(
            r#"
[processor]
max_in_flight = {IN_FLIGHT}
commit_interval_ms = 60000

{codec}
[journal]
topic = "{journal}"

[[steps]]
type = "llm"
name = "classify"
provider = "sim"
model = "mock-small"
system = "You classify blog comments. Answer with JSON only."
user = "Comment: {{{{ data.text }}}}"
max_tokens = 64
output = {{ format = "json" }}

[[steps]]
type = "kafka"
name = "publish"
topic = "{results}"
format = "{format}"
transactional = {transactional}

[llm.providers.sim]
api = "openai"
base_url = "{base}"
api_key = "test-key"
requests_per_minute = 60000
"#,
            journal = n.journal,
            results = n.results,
            base = sim.base,
        ),
    )
}

/// Every committed record of the result topic.
fn committed_results(bootstrap: &str, n: &Names) -> Vec<rdkafka::message::OwnedMessage> {
    read_to_eof(bootstrap, &n.results, PARTITIONS, "read_committed")
}

/// Result records by dedup key (the record key), with how many times each appears.
fn by_key(records: &[rdkafka::message::OwnedMessage]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in records {
        let key = String::from_utf8(r.key().expect("keyed").to_vec()).unwrap();
        *m.entry(key).or_insert(0) += 1;
    }
    m
}

fn header<'a>(m: &'a rdkafka::message::OwnedMessage, name: &str) -> Option<&'a str> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_confluent_avro_of_the_result_schema_one_per_event_even_for_duplicates() {
    let broker = Broker::start();
    let registry = Registry::start();
    let n = names(&broker, "avro").await;
    let sim = Sim::start(|c| c.latency_ms = 10).await;
    // evt-0..9 once, evt-3 twice more (an upstream producer retry).
    let mut recs: Vec<Rec> = (0..10)
        .map(|i| comment(&format!("k{i}"), &format!("evt-{i}")))
        .collect();
    recs.push(comment("k3", "evt-3"));
    recs.push(comment("k3", "evt-3"));
    produce_all(&broker.bootstrap(), &n.topic, recs).await;
    let config = toml(
        &broker.bootstrap(),
        &n,
        &sim,
        "avro",
        Some(&registry.url()),
        true,
    );
    let mut p = SpillwayProc::spawn(&config);
    p.wait_finished(12, "all records handled").await;
    let metrics = p.try_scrape().await.unwrap_or_default();
    p.terminate();

    let results = committed_results(&broker.bootstrap(), &n);
    let keys = by_key(&results);
    assert_eq!(results.len(), 10, "one result per event: {keys:?}");
    assert!(keys.values().all(|c| *c == 1));
    assert_eq!(sim.stats().await.received, 10, "one LLM call per event");
    assert_eq!(metric_sum(&metrics, "spillway_duplicates_total"), 2.0);

    // Confluent wire format: magic 0, the id the registry gave `<topic>-value`, then Avro
    // that the registry's schema (schemas/result.avsc) reads.
    let latest: serde_json::Value = reqwest::get(format!(
        "{}/subjects/{}-value/versions/latest",
        registry.url(),
        n.results
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = latest["id"].as_u64().expect("schema id") as u32;
    let schema = apache_avro::Schema::parse_str(latest["schema"].as_str().expect("schema text"))
        .expect("the registry's schema parses");
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .expect("a reader of the registry's schema");
    for r in &results {
        let value = r.payload().expect("value");
        assert_eq!(value[0], 0, "magic byte");
        assert_eq!(spillway::codec::schema_id(value).unwrap(), id);
        let datum = reader
            .read_value(&mut &value[5..])
            .expect("Avro of the registry's schema");
        let apache_avro::types::Value::Record(fields) = datum else {
            panic!("a record");
        };
        let f: HashMap<String, apache_avro::types::Value> = fields.into_iter().collect();
        let key = std::str::from_utf8(r.key().unwrap()).unwrap();
        assert_eq!(
            f["dedup_key"],
            apache_avro::types::Value::String(key.into())
        );
        let apache_avro::types::Value::String(outputs) = &f["outputs"] else {
            panic!("outputs is a string");
        };
        let outputs: serde_json::Value = serde_json::from_str(outputs).unwrap();
        assert!(
            outputs["classify"]["json"].is_object(),
            "the LLM's answer: {outputs}"
        );
        assert_eq!(
            f["input_topic"],
            apache_avro::types::Value::String(n.topic.clone())
        );
        assert_eq!(header(r, "ce_id"), Some(key));
        assert_eq!(header(r, "content-type"), Some("application/avro"));
    }
}

/// One point of a crash sweep: `events` comments produced, the processor killed at `fault`
/// (`<point>:<step>:<n>`), then restarted without it until every event finished. Returns the
/// topics, the simulator, and how many records the crashed process left in the result topic,
/// committed or not.
async fn crash_and_restart(
    broker: &Broker,
    prefix: &str,
    fault: &str,
    transactional: bool,
    events: u64,
) -> (Names, Sim, usize) {
    let n = names(broker, prefix).await;
    produce_all(
        &broker.bootstrap(),
        &n.topic,
        (0..events).map(|i| comment(&format!("k{}", i % 5), &format!("evt-{i}"))),
    )
    .await;
    let sim = Sim::start(|c| c.latency_ms = 20).await;
    let config = toml(&broker.bootstrap(), &n, &sim, "json", None, transactional);
    crash_at(&config, fault);
    let left = read_to_eof(
        &broker.bootstrap(),
        &n.results,
        PARTITIONS,
        "read_uncommitted",
    )
    .len();
    // Restart without the fault; nothing was committed, so everything comes again.
    let mut p = SpillwayProc::spawn(&config);
    p.wait_finished(events, fault).await;
    p.terminate();
    (n, sim, left)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_at_every_sink_boundary_leaves_one_result_per_event_and_repeats_only_in_flight() {
    const EVENTS: u64 = 24;
    const CRASH_AT: u64 = 6;
    let broker = Broker::start();
    // Before the sink; after it produced (acknowledged, no journal entry yet); after the
    // event's `done` entry, before its offset is stored.
    let points = [
        ("before_step", "publish"),
        ("after_step", "publish"),
        ("after_done", "publish"),
    ];
    for (point, step) in points {
        let fault = format!("{point}:{step}:{CRASH_AT}");
        let (n, sim, _) = crash_and_restart(&broker, "sinkcrash", &fault, false, EVENTS).await;
        let results = committed_results(&broker.bootstrap(), &n);
        let keys = by_key(&results);
        let calls = sim.stats().await.received;
        let repeats = results.len() as u64 - keys.len() as u64;
        println!(
            "{fault}: {} results for {EVENTS} events ({repeats} repeats, same key and ce_id), {calls} LLM calls",
            results.len()
        );
        for i in 0..EVENTS {
            assert!(
                keys.contains_key(&format!("/test|evt-{i}")),
                "{fault}: evt-{i} has no result: {keys:?}"
            );
        }
        assert_eq!(
            keys.len() as u64,
            EVENTS,
            "{fault}: no result for an unknown key"
        );
        // Only an event between its ack and its journal entry at the crash can repeat: at
        // most one per event in flight, whichever event's boundary the crash hit.
        assert!(
            repeats <= IN_FLIGHT,
            "{fault}: {repeats} repeats, more than in flight"
        );
        assert!(
            calls <= EVENTS + IN_FLIGHT,
            "{fault}: {calls} LLM calls for {EVENTS} events with {IN_FLIGHT} in flight"
        );
    }
}

/// Transactional mode on rdkafka's MockCluster, which can refuse a commit on cue: every
/// result and its journal entry go through transactions. A commit refused with PRODUCER_FENCED has an
/// unknown outcome: the lane closes, a new lane fences and re-reads the journal partition,
/// and writes only what the journal does not show as committed. (The mock keeps the refused
/// transaction's records visible, so the re-read finds its entries and nothing is written
/// twice; on Kafka the re-read would find them only if the commit had gone through.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_results_commit_with_their_journal_entries_and_survive_a_fenced_commit() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let mock = MockCluster::new(1).expect("mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let n = new_names("txn");
    for (t, parts) in [
        (&n.topic, PARTITIONS),
        (&n.results, PARTITIONS),
        (&n.journal, PARTITIONS),
        (&n.dlq, 1),
    ] {
        mock.create_topic(t, parts, 1).unwrap();
    }
    let mut recs: Vec<Rec> = (0..10)
        .map(|i| comment(&format!("k{i}"), &format!("evt-{i}")))
        .collect();
    recs.push(comment("k3", "evt-3"));
    produce_all(&bootstrap, &n.topic, recs).await;
    // The first commit is refused as fenced: a fatal producer error.
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let sim = Sim::start(|c| c.latency_ms = 10).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (addr, task) = start_configured(
        &toml(&bootstrap, &n, &sim, "json", None, true),
        stop.clone(),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let metrics = loop {
        let m = scrape(addr).await;
        if metric_sum(&m, "spillway_events_total") >= 11.0 {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "events did not finish: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.cancel();
    task.await.unwrap().unwrap();
    let committed = metric_sum(
        &metrics,
        "spillway_journal_transactions_total{outcome=\"committed\"",
    );
    let unknown = metric_sum(
        &metrics,
        "spillway_journal_transactions_total{outcome=\"unknown\"",
    );
    println!("transactions: {committed} committed, {unknown} with an unknown outcome");
    assert!(committed >= 1.0 && unknown == 1.0, "{metrics}");
    // At least the upstream copy; a rebalance under load redelivers uncommitted records too,
    // and the journal skips those as well.
    assert!(
        metric_sum(&metrics, "spillway_duplicates_total") >= 1.0,
        "{metrics}"
    );
    assert_eq!(sim.stats().await.received, 10, "one LLM call per event");

    let results = committed_results(&bootstrap, &n);
    let keys = by_key(&results);
    assert_eq!(keys.len(), 10, "every event has its result: {keys:?}");
    assert_eq!(results.len(), 10, "no result written twice: {keys:?}");
    // Each event's last journal entry, written in the same transactions, says done.
    let entries = read_to_eof(&bootstrap, &n.journal, PARTITIONS, "read_committed");
    let mut last: HashMap<String, serde_json::Value> = HashMap::new();
    for e in &entries {
        let key = String::from_utf8(e.key().unwrap().to_vec()).unwrap();
        last.insert(key, serde_json::from_slice(e.payload().unwrap()).unwrap());
    }
    for i in 0..10 {
        let entry = &last[&format!("/test|evt-{i}")];
        assert_eq!(entry["done"], true, "{entry}");
        assert_eq!(entry["steps"]["publish"]["topic"], n.results.as_str());
    }
}

/// Transactional mode under SIGKILL at each boundary of a result's transaction: before the
/// send, after the send and before the commit (the transaction is left open and the
/// restarted lane's `init_transactions` aborts it), and after the commit (the redelivered
/// event finds its `done` entry, committed with the result). A `read_committed` reader sees
/// exactly one result per event, and the records of the aborted transaction never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_at_every_transaction_boundary_leaves_exactly_one_committed_result_per_event() {
    const EVENTS: u64 = 24;
    const CRASH_AT: u64 = 3;
    let broker = Broker::start_exclusive();
    let points = [
        ("before_step", "publish"),
        ("before_commit", "publish"),
        ("after_done", "publish"),
    ];
    for (point, step) in points {
        let fault = format!("{point}:{step}:{CRASH_AT}");
        let (n, sim, written_before_restart) =
            crash_and_restart(&broker, "txncrash", &fault, true, EVENTS).await;
        let results = committed_results(&broker.bootstrap(), &n);
        let keys = by_key(&results);
        let all = read_to_eof(
            &broker.bootstrap(),
            &n.results,
            PARTITIONS,
            "read_uncommitted",
        );
        let calls = sim.stats().await.received;
        println!(
            "{fault}: {} committed results for {EVENTS} events; {} records in the log \
             ({written_before_restart} before the restart); {calls} LLM calls",
            results.len(),
            all.len()
        );
        for i in 0..EVENTS {
            assert_eq!(
                keys.get(&format!("/test|evt-{i}")),
                Some(&1),
                "{fault}: evt-{i} must have exactly one committed result: {keys:?}"
            );
        }
        assert_eq!(
            results.len() as u64,
            EVENTS,
            "{fault}: no other committed result"
        );
        if point == "before_commit" {
            // The crash left a transaction's records in the log; the restarted lane's fence
            // aborted them, so the log holds more records than a read_committed reader sees.
            assert!(
                written_before_restart > 0 && all.len() > results.len(),
                "{fault}: the open transaction's records should be in the log but not read: \
                 {} in the log, {} committed",
                all.len(),
                results.len()
            );
        }
        assert!(
            calls <= EVENTS + IN_FLIGHT,
            "{fault}: {calls} LLM calls for {EVENTS} events with {IN_FLIGHT} in flight"
        );
    }
}

/// A stalled instance (SIGSTOP after it wrote a transaction's records, before the commit)
/// that its group gives up on: its successor's lanes fence it and abort its open
/// transaction, and when it wakes up (SIGCONT) its commit fails. Every event has exactly one
/// committed result, and the zombie's records are in the log but never visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_zombie_commits_nothing_visible() {
    const EVENTS: u64 = 24;
    let broker = Broker::start_exclusive();
    let n = names(&broker, "zombie").await;
    produce_all(
        &broker.bootstrap(),
        &n.topic,
        (0..EVENTS).map(|i| comment(&format!("k{}", i % 5), &format!("evt-{i}"))),
    )
    .await;
    let sim = Sim::start(|c| c.latency_ms = 20).await;
    let config = toml(&broker.bootstrap(), &n, &sim, "json", None, true);
    let zombie = SpillwayProc::spawn_with_env(
        &config,
        &[("SPILLWAY_FAULT", "before_commit:publish:3:stop")],
    );
    zombie
        .wait_until(
            "the zombie stopped inside a transaction",
            Duration::from_secs(60),
            || {
                zombie
                    .log_text()
                    .contains("fault point before_commit:publish reached; SIGSTOP")
            },
        )
        .await;
    let open = read_to_eof(
        &broker.bootstrap(),
        &n.results,
        PARTITIONS,
        "read_uncommitted",
    );
    // Records in the log while the transaction is open, beyond those a read_committed reader
    // sees (which stops at the open transaction): the stopped transaction wrote some.
    let behind_open = open.len() - committed_results(&broker.bootstrap(), &n).len();
    assert!(
        behind_open > 0,
        "the zombie stopped inside a transaction that wrote results ({} in the log)",
        open.len()
    );

    // The group gives up on the stopped member after session.timeout.ms; the successor takes
    // every partition, fences the zombie's transactional ids and finishes every event.
    let mut successor = SpillwayProc::spawn(&config);
    successor
        .wait_finished(EVENTS, "the successor finished every event")
        .await;

    zombie.signal("CONT");
    wait_until_async(
        "the zombie's commit fails (aborted or unknown outcome)",
        Duration::from_secs(90),
        || async {
            let m = zombie.try_scrape().await.unwrap_or_default();
            metric_sum(
                &m,
                "spillway_journal_transactions_total{outcome=\"aborted\"",
            ) + metric_sum(
                &m,
                "spillway_journal_transactions_total{outcome=\"unknown\"",
            ) >= 1.0
        },
    )
    .await;
    let mut zombie = zombie;
    successor.terminate();
    zombie.terminate();

    let results = committed_results(&broker.bootstrap(), &n);
    let keys = by_key(&results);
    let all = read_to_eof(
        &broker.bootstrap(),
        &n.results,
        PARTITIONS,
        "read_uncommitted",
    );
    println!(
        "zombie: {behind_open} records at or behind its open transaction at the stop; {} committed \
         results for {EVENTS} events, {} records in the log, {} LLM calls",
        results.len(),
        all.len(),
        sim.stats().await.received
    );
    for i in 0..EVENTS {
        assert_eq!(
            keys.get(&format!("/test|evt-{i}")),
            Some(&1),
            "evt-{i} must have exactly one committed result: {keys:?}"
        );
    }
    assert_eq!(results.len() as u64, EVENTS, "no other committed result");
    // The zombie's records stay in the log, aborted, and are never read.
    assert!(
        all.len() > results.len(),
        "the zombie's aborted records are in the log ({}) but not read ({})",
        all.len(),
        results.len()
    );
}

#[test]
fn the_kafka_sink_without_a_journal_is_a_config_error() {
    let toml = config_toml(
        "127.0.0.1:9092",
        "g",
        "in",
        "dlq",
        "[[steps]]\ntype = \"kafka\"\ntopic = \"results\"\nformat = \"json\"\n",
    );
    let err = spillway::config::Config::from_toml(&toml)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[journal]"), "{err}");
}

/// A result too large for its topic (the broker's `max.message.bytes`) cannot ever be
/// written: its event goes to the DLQ with `record_too_large`, and the other events, whose
/// results were in the same group-committed transactions, commit exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_result_goes_to_the_dlq_and_the_rest_of_its_lane_commits() {
    const EVENTS: usize = 12;
    const BIG: usize = 5;
    let broker = Broker::start();
    // One input partition, so every event shares one transactional lane and its group
    // commits put the oversized result in a batch with others.
    let n = new_names("oversized");
    create_topic(&broker.bootstrap(), &n.topic, 1).await;
    create_topic(&broker.bootstrap(), &n.results, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &n.journal, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &n.dlq, 1).await;
    set_topic_config(
        &broker.bootstrap(),
        &n.results,
        &[("max.message.bytes", "8000")],
    )
    .await;
    let mut recs: Vec<Rec> = (0..EVENTS)
        .map(|i| comment(&format!("k{i}"), &format!("evt-{i}")))
        .collect();
    // The result carries the event's data: 12 KB of text makes it too large for the topic.
    recs[BIG].value = format!(r#"{{"text":"{}"}}"#, "x".repeat(12_000)).into_bytes();
    produce_all(&broker.bootstrap(), &n.topic, recs).await;
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let config = toml(&broker.bootstrap(), &n, &sim, "json", None, true).replace(
        &format!("max_in_flight = {IN_FLIGHT}"),
        "max_in_flight = 12",
    );
    let mut p = SpillwayProc::spawn(&config);
    p.wait_finished(EVENTS as u64, "every event finished").await;
    let metrics = p.try_scrape().await.unwrap_or_default();
    p.terminate();
    let dlq = read_to_eof(&broker.bootstrap(), &n.dlq, 1, "read_uncommitted");
    assert_eq!(
        dlq.len(),
        1,
        "only the oversized event is dead-lettered\n{}",
        p.log_text()
    );
    assert_eq!(header(&dlq[0], "dlq.reason"), Some("record_too_large"));
    assert_eq!(header(&dlq[0], "dlq.attempts"), Some("1"));
    let results = by_key(&committed_results(&broker.bootstrap(), &n));
    assert_eq!(results.len(), EVENTS - 1, "{results:?}");
    assert!(results.values().all(|c| *c == 1), "{results:?}");
    assert!(!results.contains_key(&format!("/test|evt-{BIG}")));
    assert!(
        metric_sum(
            &metrics,
            "spillway_journal_transactions_total{outcome=\"too_large\""
        ) >= 1.0,
        "{metrics}"
    );
    println!(
        "the oversized result shared a transaction with others: {}",
        p.log_text().contains("one by one")
    );
}

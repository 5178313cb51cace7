//! Exactly-once effects on top of at-least-once delivery: the dedup key, the step journal on
//! a compacted topic, and an idempotent, signed webhook sink. The real binary is SIGKILLed at
//! each step boundary (`SPILLWAY_FAULT`) and restarted; the receiving server records every
//! post with its `Idempotency-Key` and verifies its Standard Webhooks signature.

#[path = "../common/mod.rs"]
mod common;
mod routing;
mod stores;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use spillway::ingress::auth::{self, Scheme, Secret};

const PARTITIONS: i32 = 3;
const IN_FLIGHT: u64 = 4;
const SIGNING: &str = "whsec_c3BpbGx3YXktdGVzdC1zaWduaW5nLXNlY3JldC0zMmI=";

/// Every post the receiver accepted: Idempotency-Key → how many times it arrived.
#[derive(Clone, Default)]
struct Receiver {
    posts: Arc<Mutex<Vec<String>>>,
    bad_signatures: Arc<Mutex<u64>>,
}

impl Receiver {
    /// Raw posts (repeats included).
    fn raw(&self) -> usize {
        self.posts.lock().unwrap().len()
    }

    /// Side effects: what a receiver that dedups by Idempotency-Key did, once per key.
    fn effects(&self) -> HashMap<String, u64> {
        let mut m = HashMap::new();
        for k in self.posts.lock().unwrap().iter() {
            *m.entry(k.clone()).or_insert(0) += 1;
        }
        m
    }
}

/// A webhook receiver that verifies each request's Standard Webhooks signature and records
/// its Idempotency-Key. A receiver keyed on it performs each side effect once.
async fn receiver() -> (SocketAddr, Receiver) {
    use axum::http::HeaderMap;
    use axum::routing::post;
    let r = Receiver::default();
    let rec = r.clone();
    let secret = Secret::new(&Scheme::StandardWebhooks, SIGNING).unwrap();
    let secrets = Arc::new(vec![secret]);
    let app = axum::Router::new().route(
        "/events",
        post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (rec, secrets) = (rec.clone(), secrets.clone());
            async move {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64;
                if auth::verify(
                    &Scheme::StandardWebhooks,
                    &secrets,
                    &headers,
                    &body,
                    now,
                    300,
                )
                .is_err()
                {
                    *rec.bad_signatures.lock().unwrap() += 1;
                    return axum::http::StatusCode::UNAUTHORIZED;
                }
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("<none>")
                    .to_string();
                assert_eq!(
                    headers.get("webhook-id").and_then(|v| v.to_str().ok()),
                    Some(key.as_str()),
                    "webhook-id is the dedup key"
                );
                rec.posts.lock().unwrap().push(key);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, r)
}

/// A comment with CloudEvents headers; `id` is its `ce_id`.
fn comment(key: &str, id: &str, seq: u64) -> Rec {
    Rec {
        key: Some(key.to_string()),
        value: format!(r#"{{"key":"{key}","seq":{seq},"text":"comment {id}"}}"#).into_bytes(),
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
    dlq: String,
    group: String,
    journal: String,
}

/// Fresh names, no topics created.
fn new_names(prefix: &str) -> Names {
    Names {
        topic: unique(prefix),
        dlq: unique(&format!("{prefix}-dlq")),
        group: unique("g"),
        journal: unique(&format!("{prefix}-journal")),
    }
}

async fn names(broker: &Broker, prefix: &str) -> Names {
    let n = new_names(prefix);
    create_topic(&broker.bootstrap(), &n.topic, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &n.dlq, 1).await;
    create_topic(&broker.bootstrap(), &n.journal, PARTITIONS).await;
    n
}

/// LLM classification then the signed webhook, with the journal. Offsets are committed
/// rarely, so a crash redelivers everything: only the journal stands between a redelivery
/// and a second LLM call or post.
fn toml(broker: &Broker, n: &Names, sim: &Sim, sink: SocketAddr) -> String {
    classify_then(broker, n, sim, IN_FLIGHT, &webhook("notify", sink, ""))
}

/// The journal and the LLM classification step, then `steps`, with `in_flight` events at once.
fn classify_then(broker: &Broker, n: &Names, sim: &Sim, in_flight: u64, steps: &str) -> String {
    config_toml(
        &broker.bootstrap(),
        &n.group,
        &n.topic,
        &n.dlq,
        &format!(
            r#"
[processor]
max_in_flight = {in_flight}
commit_interval_ms = 60000

[journal]
topic = "{journal}"
ttl_secs = 86400
ttl_by_type = {{ "com.example.presence" = 3600 }}

[[steps]]
type = "llm"
name = "classify"
provider = "sim"
model = "mock-small"
system = "You classify blog comments. Answer with JSON only."
user = "Comment: {{{{ data.text }}}}"
max_tokens = 64
output = {{ format = "json" }}

{steps}

[llm.providers.sim]
api = "openai"
base_url = "{base}"
api_key = "test-key"
requests_per_minute = 60000
"#,
            journal = n.journal,
            base = sim.base,
        ),
    )
}

/// A signed webhook step named `name` to `sink`, with `extra` settings (`when`, `route`).
fn webhook(name: &str, sink: SocketAddr, extra: &str) -> String {
    format!(
        "[[steps]]\ntype = \"webhook\"\nname = \"{name}\"\nurl = \"http://{sink}/events\"\n\
         timeout_ms = 10000\nsigning_secret = \"{SIGNING}\"\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_at_every_step_boundary_loses_nothing_and_repeats_no_side_effect() {
    const EVENTS: u64 = 30;
    const CRASH_AT: u64 = 8;
    let broker = Broker::start_exclusive();
    // (fault point, step): before the LLM; after the LLM and before its journal entry; after
    // the journal and before the sink; after the sink and before the event is marked done;
    // after done and before the offset is stored.
    let points = [
        ("before_step", "classify"),
        ("after_step", "classify"),
        ("after_journal", "classify"),
        ("after_step", "notify"),
        ("after_done", "notify"),
    ];
    for (point, step) in points {
        let n = names(&broker, "crash").await;
        produce_all(
            &broker.bootstrap(),
            &n.topic,
            (0..EVENTS).map(|i| comment(&format!("k{}", i % 6), &format!("evt-{i}"), i / 6)),
        )
        .await;
        let sim = Sim::start(|c| {
            c.rpm = 60_000;
            c.latency_ms = 30;
        })
        .await;
        let (sink, received) = receiver().await;
        let config = toml(&broker, &n, &sim, sink);

        let fault = format!("{point}:{step}:{CRASH_AT}");
        crash_at(&config, &fault);
        let calls_before = sim.stats().await.received;
        let posts_before = received.raw();

        // Restart without the fault: nothing was committed, so every record comes again.
        let p = SpillwayProc::spawn(&config);
        p.wait_finished(EVENTS, &fault).await;
        let mut p = p;
        p.terminate();

        let effects = received.effects();
        let calls = sim.stats().await.received;
        let repeats: u64 = effects.values().map(|c| c - 1).sum();
        println!(
            "{fault}: before the crash {calls_before} LLM calls, {posts_before} posts; after the restart {calls} LLM calls, {} posts, {} distinct side effects, {repeats} repeated posts (dropped by Idempotency-Key)",
            received.raw(),
            effects.len()
        );
        assert_eq!(*received.bad_signatures.lock().unwrap(), 0, "{fault}");
        assert_eq!(
            effects.len() as u64,
            EVENTS,
            "{fault}: every event's side effect happened"
        );
        for i in 0..EVENTS {
            assert!(
                effects.contains_key(&format!("/test|evt-{i}")),
                "{fault}: evt-{i} lost"
            );
        }
        // A repeat can only come from an event that was between its post and its `done`
        // entry at the crash, so at most one per event in flight; the receiver drops it by
        // its Idempotency-Key, so no side effect happens twice.
        assert!(
            repeats <= IN_FLIGHT,
            "{fault}: {repeats} repeated posts; only the {IN_FLIGHT} in flight may repeat"
        );
        assert!(
            calls <= EVENTS + IN_FLIGHT,
            "{fault}: {calls} LLM calls for {EVENTS} events with {IN_FLIGHT} in flight"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_produced_three_times_upstream_costs_one_llm_call_and_one_post() {
    let broker = Broker::start();
    let n = names(&broker, "dups").await;
    let sim = Sim::start(|c| c.latency_ms = 20).await;
    let (sink, received) = receiver().await;
    // evt-a three times under one key (a producer retry); evt-b three times under three keys
    // (re-keyed upstream), so its copies may run at once on different partitions.
    let recs = vec![
        comment("k1", "evt-a", 0),
        comment("k1", "evt-a", 0),
        comment("k1", "evt-a", 0),
        comment("k1", "evt-b", 1),
        comment("k2", "evt-b", 1),
        comment("k3", "evt-b", 1),
        comment("k4", "evt-c", 0),
    ];
    produce_all(&broker.bootstrap(), &n.topic, recs).await;
    let mut p = SpillwayProc::spawn(&toml(&broker, &n, &sim, sink));
    p.wait_finished(7, "all copies handled").await;
    let metrics = p.try_scrape().await.unwrap_or_default();
    p.terminate();
    let effects = received.effects();
    assert_eq!(received.raw(), 3, "one post per event: {effects:?}");
    assert_eq!(effects.len(), 3);
    assert_eq!(sim.stats().await.received, 3, "one LLM call per event");
    assert_eq!(metric_sum(&metrics, "spillway_duplicates_total"), 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_state_survives_a_restart_and_a_partition_moving_to_another_instance() {
    let broker = Broker::start();
    let n = names(&broker, "restore").await;
    let sim = Sim::start(|c| c.latency_ms = 20).await;
    let (sink, received) = receiver().await;
    let config = toml(&broker, &n, &sim, sink);
    produce_all(
        &broker.bootstrap(),
        &n.topic,
        (0..12).map(|i| comment(&format!("k{i}"), &format!("evt-{i}"), 0)),
    )
    .await;
    // Instance A processes everything and stops cleanly (its offsets are committed).
    let mut a = SpillwayProc::spawn(&config);
    a.wait_finished(12, "instance A").await;
    a.terminate();
    assert_eq!(received.raw(), 12);

    // Instance B is a new process with an empty cache: the group gives it A's partitions,
    // and it restores their journal partitions from the topic before it trusts its cache.
    let mut b = SpillwayProc::spawn(&config);
    produce_all(
        &broker.bootstrap(),
        &n.topic,
        (0..12).map(|i| comment(&format!("k{i}"), &format!("evt-{i}"), 0)),
    )
    .await;
    b.wait_finished(12, "instance B skips the duplicates").await;
    let metrics = b.try_scrape().await.unwrap_or_default();
    b.terminate();
    assert_eq!(
        metric_sum(&metrics, "spillway_duplicates_total"),
        12.0,
        "{metrics}\n{}",
        b.log_text()
    );
    assert_eq!(received.raw(), 12, "no second post after the move");
    assert_eq!(sim.stats().await.received, 12, "no second LLM call");
    assert!(
        metric_sum(&metrics, "spillway_journal_restore_duration_seconds_count") >= 1.0,
        "B restored journal partitions"
    );
}

/// Other instances keep writing to the journal partitions this instance restores (they share
/// them through `p mod J`): the restore still ends, because only records below the end
/// taken at its start hold it open, and every event is processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_partition_under_constant_writes_from_others_still_restores() {
    let broker = Broker::start();
    let n = names(&broker, "busyjournal").await;
    let sim = Sim::start(|c| c.latency_ms = 10).await;
    let (sink, received) = receiver().await;
    // Another instance's entries, ten a second on every journal partition, for the whole
    // test.
    let stop = tokio_util::sync::CancellationToken::new();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (bootstrap, journal, stop) = (broker.bootstrap(), n.journal.clone(), stop.clone());
        let written = written.clone();
        tokio::spawn(async move {
            let producer = producer(&bootstrap);
            let mut i = 0u64;
            while !stop.is_cancelled() {
                for p in 0..PARTITIONS {
                    let key = format!("/elsewhere|other-{i}");
                    let value = format!(
                        r#"{{"v":1,"expires_at_ms":{},"done":true,"steps":{{}}}}"#,
                        u64::MAX / 2
                    );
                    let record = rdkafka::producer::FutureRecord::to(&journal)
                        .key(&key)
                        .payload(&value)
                        .partition(p);
                    producer
                        .send(record, Duration::from_secs(5))
                        .await
                        .expect("journal write from the other instance");
                    i += 1;
                    written.store(i, std::sync::atomic::Ordering::Release);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            i
        })
    };
    produce_all(
        &broker.bootstrap(),
        &n.topic,
        (0..12).map(|i| comment(&format!("k{i}"), &format!("evt-{i}"), 0)),
    )
    .await;
    // The other writer is under way before the processor starts, so its restores begin on
    // partitions that keep growing.
    wait_until(
        "the other writer is writing",
        Duration::from_secs(30),
        || written.load(std::sync::atomic::Ordering::Acquire) >= 30,
    )
    .await;
    let before = written.load(std::sync::atomic::Ordering::Acquire);
    let mut p = SpillwayProc::spawn(&toml(&broker, &n, &sim, sink));
    p.wait_finished(12, "restores end despite the other writer")
        .await;
    let metrics = p.try_scrape().await.unwrap_or_default();
    p.terminate();
    stop.cancel();
    let others = writer.await.unwrap();
    assert!(
        others > before,
        "the other writer kept writing while the processor ran ({before} entries before it \
         started, {others} in all)"
    );
    assert_eq!(
        received.effects().len(),
        12,
        "every event's effect happened once"
    );
    assert_eq!(received.raw(), 12);
    assert_eq!(
        metric_sum(
            &metrics,
            "spillway_step_retries_total{pipeline=\"default\",reason=\"kafka\",step=\"journal_session\""
        ),
        0.0,
        "no restore timed out: {metrics}"
    );
}

/// The journal topic really compacts: the processor creates it compacted, and once Kafka's
/// log cleaner has run it holds one entry per dedup key; a restore by a new instance reads
/// only those (plus at most the probe records this test writes to roll segments), yet still
/// skips every redelivered copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_compacts_and_a_restore_reads_only_the_latest_entry_per_key() {
    use rdkafka::producer::FutureRecord;
    use rdkafka::Message;
    const EVENTS: u64 = 30;
    let broker = Broker::start();
    let n = new_names("compact");
    create_topic(&broker.bootstrap(), &n.topic, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &n.dlq, 1).await;
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (sink, received) = receiver().await;
    // The processor creates the journal topic, as in development setups.
    let config = toml(&broker, &n, &sim, sink).replace(
        "session_timeout_ms = 6000",
        &format!("session_timeout_ms = 6000\ncreate_topics_partitions = {PARTITIONS}"),
    );
    let events = || (0..EVENTS).map(|i| comment(&format!("k{i}"), &format!("evt-{i}"), 0));
    let mut a = SpillwayProc::spawn(&config);
    a.wait_until("the processor is ready", Duration::from_secs(60), || {
        a.log_text().contains("partitions assigned")
    })
    .await;
    assert_eq!(
        topic_config(&broker.bootstrap(), &n.journal)
            .await
            .get("cleanup.policy")
            .map(String::as_str),
        Some("compact,delete"),
        "the journal topic is created compacted, with retention past the TTL"
    );
    // Segments that roll and get cleaned within seconds.
    set_topic_config(
        &broker.bootstrap(),
        &n.journal,
        &[("segment.ms", "100"), ("min.cleanable.dirty.ratio", "0.01")],
    )
    .await;
    produce_all(&broker.bootstrap(), &n.topic, events()).await;
    a.wait_finished(EVENTS, "instance A").await;
    a.terminate();
    let appended = records_in(&broker.bootstrap(), &n.journal, PARTITIONS);
    assert!(
        appended >= 2 * EVENTS as i64,
        "each event wrote several journal entries: {appended}"
    );

    // The active segment is never cleaned, and it rolls only on an append after segment.ms:
    // append a tombstone probe to every partition until the cleaner has left one entry per key.
    let probes = producer(&broker.bootstrap());
    let mut probes_sent = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let live = loop {
        for p in 0..PARTITIONS {
            let probe: FutureRecord<'_, str, [u8]> = FutureRecord::to(&n.journal)
                .key("compaction-probe")
                .partition(p);
            probes
                .send(probe, Duration::from_secs(10))
                .await
                .expect("probe");
            probes_sent += 1;
        }
        let entries = read_to_eof(
            &broker.bootstrap(),
            &n.journal,
            PARTITIONS,
            "read_committed",
        );
        let mut per_key: HashMap<String, u64> = HashMap::new();
        for e in &entries {
            let key = String::from_utf8_lossy(e.key().unwrap_or_default()).to_string();
            if key != "compaction-probe" {
                *per_key.entry(key).or_insert(0) += 1;
            }
        }
        if per_key.len() as u64 == EVENTS && per_key.values().all(|c| *c == 1) {
            break entries.len() as i64;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the journal was not compacted within 90 s: {} records, {} keys",
            entries.len(),
            per_key.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    println!(
        "journal: {appended} entries appended for {EVENTS} events, {live} records after \
         compaction ({probes_sent} probes sent)"
    );

    // Every event again (an upstream replay), read by a new instance that restores the
    // compacted journal: all skipped, and the restore read about one record per key.
    produce_all(&broker.bootstrap(), &n.topic, events()).await;
    let mut b = SpillwayProc::spawn(&config);
    b.wait_finished(EVENTS, "instance B").await;
    let metrics = b.try_scrape().await.unwrap_or_default();
    b.terminate();
    let restored = metric_sum(&metrics, "spillway_journal_restored_records_total");
    println!("restore read {restored} records");
    assert_eq!(
        metric_sum(&metrics, "spillway_duplicates_total"),
        EVENTS as f64
    );
    assert_eq!(sim.stats().await.received, EVENTS, "one LLM call per event");
    assert_eq!(received.raw() as u64, EVENTS, "one post per event");
    // The restore read what compaction left (the cleaner only shrinks it after the check
    // above: the live entries, one per key, and a few probe tombstones), not the history.
    assert!(
        restored >= EVENTS as f64 && restored <= live as f64,
        "the restore should read only the latest entry per key: {restored} records read, \
         {live} left after compaction, {appended} appended"
    );
    assert!(
        live < appended,
        "compaction removed superseded entries: {live} of {appended}"
    );
}

/// On a brand-new cluster, a processor with `create_topics_partitions` creates its input,
/// DLQ and compacted journal topics and starts: topic creation returns only once the topics
/// are visible with leaders, so the journal's metadata check right after it finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_on_a_new_cluster_creates_its_topics_and_starts() {
    let broker = Broker::start_own();
    let n = new_names("fresh");
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (sink, received) = receiver().await;
    let config = toml(&broker, &n, &sim, sink).replace(
        "session_timeout_ms = 6000",
        &format!("session_timeout_ms = 6000\ncreate_topics_partitions = {PARTITIONS}"),
    );
    let mut p = SpillwayProc::spawn(&config);
    p.wait_until("partitions assigned", Duration::from_secs(60), || {
        p.log_text().contains("partitions assigned")
    })
    .await;
    produce_all(
        &broker.bootstrap(),
        &n.topic,
        (0..5).map(|i| comment(&format!("k{i}"), &format!("evt-{i}"), 0)),
    )
    .await;
    p.wait_finished(5, "events on the new cluster").await;
    p.terminate();
    assert_eq!(received.raw(), 5);
    assert_eq!(
        topic_config(&broker.bootstrap(), &n.journal)
            .await
            .get("cleanup.policy")
            .map(String::as_str),
        Some("compact,delete")
    );
}

//! Exactly-once effects on top of at-least-once delivery: the dedup key, the step journal on
//! a compacted topic, and an idempotent, signed webhook sink. The real binary is SIGKILLed at
//! each step boundary (`SPILLWAY_FAULT`) and restarted; the receiving server records every
//! post with its `Idempotency-Key` and verifies its Standard Webhooks signature.

mod common;

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
    config_toml(
        &broker.bootstrap(),
        &n.group,
        &n.topic,
        &n.dlq,
        &format!(
            r#"
[processor]
max_in_flight = {IN_FLIGHT}
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

[[steps]]
type = "webhook"
name = "notify"
url = "http://{sink}/events"
timeout_ms = 10000
signing_secret = "{SIGNING}"

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
            "spillway_step_retries_total{reason=\"kafka\",step=\"journal_session\""
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

/// `toml` with the journal's state in `state` (one disk kept across restarts) and `extra`
/// journal settings.
fn toml_on_disk(
    broker: &Broker,
    n: &Names,
    sim: &Sim,
    sink: SocketAddr,
    state: &std::path::Path,
    extra: &str,
) -> String {
    toml(broker, n, sim, sink).replace(
        "[journal]\n",
        &format!("[journal]\nstate_dir = \"{}\"\n{extra}\n", state.display()),
    )
}

async fn scrape_sum(p: &SpillwayProc, series: &str) -> f64 {
    p.try_scrape()
        .await
        .map(|m| metric_sum(&m, series))
        .unwrap_or(-1.0)
}

/// Waits until `p`'s changelog reader has read every record of the journal topic, so the
/// stores' checkpoints are at the log end.
async fn wait_changelog_read(p: &SpillwayProc, broker: &Broker, journal: &str, partitions: i32) {
    let end = records_in(&broker.bootstrap(), journal, partitions) as f64;
    wait_until_async(
        "the changelog reader reached the log end",
        Duration::from_secs(60),
        || async { scrape_sum(p, "spillway_journal_restored_records_total").await >= end },
    )
    .await;
}

/// The stores are the dedup state and the topic their changelog: a restart on the same disk
/// reads only the tail past the checkpoint (nothing, here), a deleted state directory
/// restores everything from the topic, and a store file with a corrupted header is rebuilt
/// from the topic. Every time, each upstream copy is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_only_the_changelog_tail_and_a_lost_or_corrupted_store_is_rebuilt() {
    const EVENTS: u64 = 12;
    let broker = Broker::start();
    let n = names(&broker, "ondisk").await;
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (sink, received) = receiver().await;
    let state = tempfile::tempdir().unwrap();
    let config = toml_on_disk(&broker, &n, &sim, sink, state.path(), "");
    let events = || (0..EVENTS).map(|i| comment(&format!("k{i}"), &format!("evt-{i}"), 0));
    produce_all(&broker.bootstrap(), &n.topic, events()).await;
    let mut a = SpillwayProc::spawn(&config);
    a.wait_finished(EVENTS, "first run").await;
    wait_changelog_read(&a, &broker, &n.journal, PARTITIONS).await;
    a.terminate();
    let journal_records = records_in(&broker.bootstrap(), &n.journal, PARTITIONS);

    // Same disk: the checkpoint is at the log end, so the restore reads nothing.
    let mut b = SpillwayProc::spawn(&config);
    produce_all(&broker.bootstrap(), &n.topic, events()).await;
    b.wait_finished(EVENTS, "restart on the same disk").await;
    let metrics = b.try_scrape().await.unwrap_or_default();
    b.terminate();
    assert_eq!(
        metric_sum(&metrics, "spillway_duplicates_total"),
        EVENTS as f64,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "spillway_journal_restored_records_total"),
        0.0,
        "a restart on the same disk reads only the tail past the checkpoint ({journal_records} records in the topic)\n{}",
        b.log_text()
    );

    // A lost disk: everything is read from the topic again.
    std::fs::remove_dir_all(state.path()).unwrap();
    let mut c = SpillwayProc::spawn(&config);
    produce_all(&broker.bootstrap(), &n.topic, events()).await;
    c.wait_finished(EVENTS, "restart on an empty disk").await;
    let metrics = c.try_scrape().await.unwrap_or_default();
    c.terminate();
    assert_eq!(
        metric_sum(&metrics, "spillway_duplicates_total"),
        EVENTS as f64,
        "{metrics}"
    );
    assert!(
        metric_sum(&metrics, "spillway_journal_restored_records_total") >= journal_records as f64,
        "an empty disk restores the whole topic ({journal_records} records): {metrics}"
    );

    // A corrupted file: rebuilt from the topic, never trusted.
    let mut corrupted = 0;
    for f in std::fs::read_dir(state.path()).unwrap() {
        let path = f.unwrap().path();
        if path.extension().is_some_and(|e| e == "redb") {
            let mut bytes = std::fs::read(&path).unwrap();
            for b in bytes.iter_mut().take(4096) {
                *b ^= 0x5A;
            }
            std::fs::write(&path, bytes).unwrap();
            corrupted += 1;
        }
    }
    assert_eq!(
        corrupted, PARTITIONS,
        "one store file per journal partition"
    );
    let mut d = SpillwayProc::spawn(&config);
    produce_all(&broker.bootstrap(), &n.topic, events()).await;
    d.wait_finished(EVENTS, "restart on corrupted stores").await;
    let metrics = d.try_scrape().await.unwrap_or_default();
    d.terminate();
    assert_eq!(
        metric_sum(&metrics, "spillway_duplicates_total"),
        EVENTS as f64,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "spillway_journal_store_rebuilds_total"),
        PARTITIONS as f64,
        "{metrics}"
    );
    assert!(
        metric_sum(&metrics, "spillway_journal_restored_records_total") >= journal_records as f64,
        "a rebuilt store restores the whole topic: {metrics}"
    );
    assert_eq!(
        sim.stats().await.received,
        EVENTS,
        "one LLM call per event in all"
    );
    assert_eq!(received.raw() as u64, EVENTS, "one post per event in all");
}

/// The bug the stores fix: with a capped in-memory cache, upstream copies of events that
/// finished long ago were called and posted again once more keys had arrived than the cache
/// held. Here the journal has one partition and the smallest page cache (1 MiB), and more
/// events finish than that holds; then every one comes again upstream, across three SIGKILLs
/// and a restart. None costs an LLM call or a post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_events_finished_long_ago_cost_nothing_with_more_keys_than_memory_holds() {
    const EVENTS: u64 = 4_000;
    let broker = Broker::start_exclusive();
    let n = new_names("manykeys");
    create_topic(&broker.bootstrap(), &n.topic, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &n.dlq, 1).await;
    create_topic(&broker.bootstrap(), &n.journal, 1).await;
    let sim = Sim::start(|c| c.latency_ms = 0).await;
    let (sink, received) = receiver().await;
    let state = tempfile::tempdir().unwrap();
    let config = toml_on_disk(
        &broker,
        &n,
        &sim,
        sink,
        state.path(),
        "store_cache_bytes = 1048576",
    )
    .replace(
        &format!("max_in_flight = {IN_FLIGHT}"),
        "max_in_flight = 64",
    );
    let events = || (0..EVENTS).map(|i| comment(&format!("k{}", i % 97), &format!("evt-{i}"), i));
    produce_all(&broker.bootstrap(), &n.topic, events()).await;
    let mut first = SpillwayProc::spawn(&config);
    wait_until_async(
        "every original finished",
        Duration::from_secs(300),
        || async { first.events_finished().await >= EVENTS as f64 },
    )
    .await;
    wait_changelog_read(&first, &broker, &n.journal, 1).await;
    first.terminate();
    let calls = sim.stats().await.received;
    assert_eq!(calls, EVENTS, "one LLM call per original");
    assert_eq!(received.raw() as u64, EVENTS, "one post per original");
    let file = std::fs::metadata(spillway::journal::store::Store::path(
        state.path(),
        &n.journal,
        0,
    ))
    .expect("store file")
    .len();
    assert!(
        file > 1_048_576,
        "the store ({file} bytes) holds more than its 1 MiB page cache"
    );

    // Every event again, upstream; offsets are committed once a minute, so each SIGKILL
    // redelivers all the copies since the start.
    produce_all(&broker.bootstrap(), &n.topic, events()).await;
    for kill in 1..=3u64 {
        let mut p = SpillwayProc::spawn(&config);
        let at = kill * EVENTS / 4;
        wait_until_async("copies being skipped", Duration::from_secs(300), || async {
            scrape_sum(&p, "spillway_duplicates_total").await >= at as f64
        })
        .await;
        p.kill9();
    }
    // The last run finishes what the killed ones left uncommitted (each may have committed
    // some once its minute was up), then stops cleanly.
    let committed_before: i64 = committed(&broker.bootstrap(), &n.group, &n.topic, PARTITIONS)
        .values()
        .sum();
    let left = records_in(&broker.bootstrap(), &n.topic, PARTITIONS) - committed_before;
    let mut last = SpillwayProc::spawn(&config);
    wait_until_async("every copy skipped", Duration::from_secs(300), || async {
        last.events_finished().await >= left as f64
    })
    .await;
    last.terminate();
    assert_eq!(sim.stats().await.received, EVENTS, "no copy called the LLM");
    assert_eq!(received.raw() as u64, EVENTS, "no copy was posted");
}

/// Entries past their TTL leave the stores (swept) and, on Apache Kafka, the topic (deleted
/// by retention, `retention.ms` = TTL + margin): state does not grow with time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_past_their_ttl_leave_the_store_and_the_topic() {
    use rdkafka::Message;
    const EVENTS: u64 = 10;
    let broker = Broker::start();
    let n = new_names("ttl");
    create_topic(&broker.bootstrap(), &n.topic, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &n.dlq, 1).await;
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (sink, received) = receiver().await;
    let state = tempfile::tempdir().unwrap();
    // The processor creates the journal topic with the retention the TTL needs.
    let config = toml_on_disk(
        &broker,
        &n,
        &sim,
        sink,
        state.path(),
        "retention_margin_secs = 1",
    )
    .replace("ttl_secs = 86400", "ttl_secs = 3")
    .replace("ttl_by_type = { \"com.example.presence\" = 3600 }", "")
    .replace(
        "session_timeout_ms = 6000",
        &format!("session_timeout_ms = 6000\ncreate_topics_partitions = {PARTITIONS}"),
    );
    let mut p = SpillwayProc::spawn(&config);
    produce_all(
        &broker.bootstrap(),
        &n.topic,
        (0..EVENTS).map(|i| comment(&format!("k{i}"), &format!("evt-{i}"), 0)),
    )
    .await;
    p.wait_finished(EVENTS, "events").await;
    let settings = topic_config(&broker.bootstrap(), &n.journal).await;
    assert_eq!(
        settings.get("cleanup.policy").map(String::as_str),
        Some("compact,delete")
    );
    assert_eq!(
        settings.get("retention.ms").map(String::as_str),
        Some("4000")
    );
    let keys_in_topic = || {
        read_to_eof(
            &broker.bootstrap(),
            &n.journal,
            PARTITIONS,
            "read_committed",
        )
        .iter()
        .filter(|m| m.key().is_some_and(|k| k.starts_with(b"/test|evt-")))
        .count()
    };
    assert!(
        keys_in_topic() >= EVENTS as usize,
        "the entries are in the topic"
    );
    // The stores sweep them once their deadline has passed.
    wait_until_async(
        "expired entries swept from the stores",
        Duration::from_secs(30),
        || async {
            let m = p.try_scrape().await.unwrap_or_default();
            metric_sum(&m, "spillway_journal_expired_entries_total") >= EVENTS as f64
                && metric_sum(&m, "spillway_journal_store_entries") == 0.0
        },
    )
    .await;
    // Kafka deletes them by retention (checked every second on the test broker).
    wait_until(
        "expired entries deleted from the topic",
        Duration::from_secs(60),
        || keys_in_topic() == 0,
    )
    .await;
    // A copy after the TTL is a new event: the TTL is the dedup window, by design.
    produce_all(&broker.bootstrap(), &n.topic, [comment("k0", "evt-0", 1)]).await;
    p.wait_finished(EVENTS + 1, "a copy after the TTL").await;
    p.terminate();
    assert_eq!(sim.stats().await.received, EVENTS + 1);
    assert_eq!(received.raw() as u64, EVENTS + 1);
}

async fn readyz(p: &SpillwayProc) -> Option<u16> {
    reqwest::get(format!("http://{}/readyz", p.metrics))
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// A restore that cannot move (here: another producer's transaction left open on every
/// journal partition, which a `read_committed` read cannot pass) has no deadline that fails
/// it: the processor reports not ready, `spillway status` shows the stall, and once the
/// transaction ends the restore finishes and every event runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_cannot_progress_marks_the_processor_not_ready_until_it_moves() {
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    const EVENTS: u64 = 6;
    let broker = Broker::start();
    let n = names(&broker, "stall").await;
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (sink, received) = receiver().await;
    let state = tempfile::tempdir().unwrap();
    let config = toml_on_disk(
        &broker,
        &n,
        &sim,
        sink,
        state.path(),
        "restore_stall_ms = 1000",
    );
    // A transaction that stays open on every journal partition.
    let foreign: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("transactional.id", unique("foreign"))
        .set("transaction.timeout.ms", "120000")
        .create()
        .expect("transactional producer");
    let f = foreign.clone();
    tokio::task::spawn_blocking(move || {
        f.init_transactions(Duration::from_secs(30))?;
        f.begin_transaction()
    })
    .await
    .unwrap()
    .expect("transaction begins");
    for p in 0..PARTITIONS {
        let value = r#"{"v":1,"expires_at_ms":1,"done":true,"steps":{}}"#;
        foreign
            .send(
                FutureRecord::to(&n.journal)
                    .key("/other|x")
                    .payload(value)
                    .partition(p),
                Duration::from_secs(10),
            )
            .await
            .expect("write inside the open transaction");
    }
    produce_all(
        &broker.bootstrap(),
        &n.topic,
        (0..EVENTS).map(|i| comment(&format!("k{i}"), &format!("evt-{i}"), 0)),
    )
    .await;
    let p = SpillwayProc::spawn(&config);
    wait_until_async(
        "the stalled restore is reported",
        Duration::from_secs(60),
        || async {
            scrape_sum(&p, "spillway_journal_restore_stalled").await >= 1.0
                && readyz(&p).await == Some(503)
        },
    )
    .await;
    assert_eq!(
        p.events_finished().await,
        0.0,
        "no event ran past an unfinished restore"
    );
    let file = p.log.with_file_name("spillway.toml");
    let metrics = p.metrics;
    let status = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
            .args(["status", "--config"])
            .arg(&file)
            .arg("--metrics-url")
            .arg(format!("http://{metrics}/metrics"))
            .output()
            .expect("spillway status")
    });
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("STALLED"), "status shows the stall:\n{text}");

    // The transaction ends: the restore moves, the processor is ready and finishes its work.
    let f = foreign.clone();
    tokio::task::spawn_blocking(move || f.commit_transaction(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("commit");
    p.wait_finished(EVENTS, "events after the restore moved")
        .await;
    wait_until_async("ready again", Duration::from_secs(30), || async {
        readyz(&p).await == Some(200)
            && scrape_sum(&p, "spillway_journal_restore_stalled").await == 0.0
    })
    .await;
    let mut p = p;
    p.terminate();
    assert_eq!(received.raw() as u64, EVENTS);
}

/// A fatal error of the journal producer (librdkafka's lost idempotence state, raised here
/// through its test API) is not retried for ever: `/healthz` fails, the processor exits
/// non-zero, and no committed offset passes an event whose effect did not happen. A restart
/// finishes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_fails_liveness_and_exits_non_zero_committing_nothing_unfinished() {
    use rdkafka::Message;
    const EVENTS: u64 = 12;
    let broker = Broker::start();
    let n = names(&broker, "fatal").await;
    let sim = Sim::start(|c| c.latency_ms = 20).await;
    let (sink, received) = receiver().await;
    // Offsets stored often, so a commit past unfinished work would show.
    let config = toml(&broker, &n, &sim, sink)
        .replace("commit_interval_ms = 60000", "commit_interval_ms = 100");
    produce_all(
        &broker.bootstrap(),
        &n.topic,
        (0..EVENTS).map(|i| comment(&format!("k{i}"), &format!("evt-{i}"), 0)),
    )
    .await;
    let mut p = SpillwayProc::spawn_with_env(
        &config,
        &[("SPILLWAY_FAULT", "journal_write:classify:6:fatal")],
    );
    let metrics = p.metrics;
    let mut saw_unhealthy = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = p.wait_exit_nonblocking() {
            break status;
        }
        if let Ok(r) = reqwest::get(format!("http://{metrics}/healthz")).await {
            saw_unhealthy |= r.status().as_u16() == 503;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the processor did not exit:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log = p.log_text();
    assert!(!status.success(), "exits non-zero: {status:?}\n{log}");
    assert!(saw_unhealthy, "/healthz failed before the exit\n{log}");
    assert!(log.contains("fatal"), "{log}");

    // Every record below a committed offset had its effect.
    let committed = committed(&broker.bootstrap(), &n.group, &n.topic, PARTITIONS);
    let effects = received.effects();
    let inputs = read_to_eof(
        &broker.bootstrap(),
        &n.topic,
        PARTITIONS,
        "read_uncommitted",
    );
    let mut below = 0;
    for m in &inputs {
        if committed
            .get(&m.partition())
            .is_some_and(|c| m.offset() < *c)
        {
            below += 1;
            let id = spillway::codec::header_str(m, "ce_id").unwrap_or_default();
            assert!(
                effects.contains_key(&format!("/test|{id}")),
                "offset {} of partition {} is committed but {id} never finished: {effects:?}",
                m.offset(),
                m.partition()
            );
        }
    }
    assert!(
        below < EVENTS as usize,
        "the failed event is not committed: {committed:?}"
    );

    let mut again = SpillwayProc::spawn(&config);
    wait_until(
        "every event took effect after the restart",
        Duration::from_secs(60),
        || received.effects().len() as u64 == EVENTS,
    )
    .await;
    again.terminate();
    // At most the events in flight at the failure post twice (their `done` entry could not
    // be written); the receiver drops those by Idempotency-Key.
    let repeats = received.raw() as u64 - EVENTS;
    assert!(
        repeats <= IN_FLIGHT,
        "{repeats} repeats: {:?}",
        received.effects()
    );
}

/// A cold restore bigger than one round of the changelog reader (10,000 records or 4 MiB of
/// values), on three journal partitions at once (rounds that large are applied on two
/// threads): every entry arrives, so a copy of any of those events is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_restore_larger_than_one_round_misses_no_entry() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    const EVENTS: u64 = 12_000;
    let broker = Broker::start();
    let n = names(&broker, "bigrestore").await;
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (sink, received) = receiver().await;
    // What an earlier owner left: every event done, its ~1 KB LLM output kept, event `i`
    // on journal partition `i mod 3`. 12,000 records, 13 MB: more than one round by count
    // and by bytes.
    let output = "x".repeat(1_000);
    let p = producer(&broker.bootstrap());
    let mut pending = Vec::new();
    for i in 0..EVENTS {
        let (key, part) = (format!("/test|evt-{i}"), (i % PARTITIONS as u64) as i32);
        let value = format!(
            r#"{{"v":1,"expires_at_ms":{},"done":true,"steps":{{"classify":{{"text":"{output}"}},"notify":null}}}}"#,
            u64::MAX / 2
        );
        let record = FutureRecord::to(&n.journal)
            .key(&key)
            .payload(&value)
            .partition(part);
        pending.push(p.send_result(record).map_err(|(e, _)| e).expect("enqueue"));
    }
    // Copies of every 97th event, each on the input partition whose journal partition holds
    // its entry.
    let copies: Vec<u64> = (0..EVENTS).step_by(97).collect();
    for i in &copies {
        let (id, part) = (format!("evt-{i}"), (i % PARTITIONS as u64) as i32);
        let value = format!(r#"{{"key":"k{i}","seq":0,"text":"comment {id}"}}"#);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "ce_source",
                value: Some("/test"),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("com.example.comment"),
            })
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            });
        let record = FutureRecord::to(&n.topic)
            .key(&id)
            .payload(&value)
            .headers(headers)
            .partition(part);
        pending.push(p.send_result(record).map_err(|(e, _)| e).expect("enqueue"));
    }
    for d in pending {
        d.await.expect("delivery").expect("record");
    }
    let state = tempfile::tempdir().unwrap();
    // Every copy starts at once, so all three journal partitions restore together.
    let config = toml_on_disk(&broker, &n, &sim, sink, state.path(), "").replace(
        &format!("max_in_flight = {IN_FLIGHT}"),
        "max_in_flight = 256",
    );
    let mut proc = SpillwayProc::spawn(&config);
    proc.wait_finished(copies.len() as u64, "the copies").await;
    let metrics = proc.try_scrape().await.unwrap_or_default();
    proc.terminate();
    assert_eq!(
        metric_sum(&metrics, "spillway_duplicates_total"),
        copies.len() as f64,
        "every copy found its entry: {metrics}"
    );
    assert!(
        metric_sum(&metrics, "spillway_journal_restored_records_total") >= EVENTS as f64,
        "the whole journal was read: {metrics}"
    );
    assert_eq!(sim.stats().await.received, 0, "no copy called the LLM");
    assert_eq!(received.raw(), 0, "no copy was posted");
}

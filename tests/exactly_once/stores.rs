//! The local stores: restarts read the changelog's tail, rebuilds, keys past memory, expiry, stalled restores, fatal errors, cold restores.

use super::*;

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

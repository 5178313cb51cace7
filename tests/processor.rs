//! In-process processor behaviour against Apache Kafka: ordering, commits, poison.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::Message;
use spillway::codec::header_str;
use spillway::step::StepError;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_under_concurrency() {
    const EVENTS: u64 = 10_000;
    const KEYS: u64 = 100;
    const PARTITIONS: i32 = 12;
    const MAX_LATENCY_MS: u64 = 20;
    let broker = Broker::start_exclusive();
    let (topic, dlq, group) = (unique("order"), unique("order-dlq"), unique("g"));
    create_topic(&broker.bootstrap(), &topic, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;
    // Per-key sequence numbers, keys interleaved.
    let per_key = EVENTS / KEYS;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..per_key).flat_map(|s| (0..KEYS).map(move |k| Rec::seq(&format!("k{k}"), s))),
    )
    .await;

    let (step, seen) = ScriptedStep::new(MAX_LATENCY_MS);
    let toml = config_toml(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        "[processor]\nmax_in_flight = 1024\ncommit_interval_ms = 200",
    );
    let stop = CancellationToken::new();
    let started = Instant::now();
    let (_addr, task) = start_processor(&toml, vec![Arc::new(step)], stop.clone()).await;
    wait_until("all events processed", Duration::from_secs(240), || {
        seen.lock().unwrap().len() as u64 >= EVENTS
    })
    .await;
    let elapsed = started.elapsed();
    stop.cancel();
    task.await.unwrap().unwrap();

    let seen = seen.lock().unwrap().clone();
    let distinct: HashSet<(String, u64)> =
        seen.iter().map(|(k, s, _, _)| (k.clone(), *s)).collect();
    assert_eq!(distinct.len() as u64, EVENTS, "every event processed");
    assert_eq!(
        seen.len() as u64,
        EVENTS,
        "no event processed twice in a clean run"
    );
    let violations = order_violations(seen.iter().map(|(k, s, _, _)| (k.clone(), *s)));
    assert_eq!(violations, 0, "per-key order held");
    // Partition-serial bound: each partition's records one after another, mean latency each.
    let serial = Duration::from_millis(EVENTS * (MAX_LATENCY_MS / 2) / PARTITIONS as u64);
    let rate = EVENTS as f64 / elapsed.as_secs_f64();
    let serial_rate = EVENTS as f64 / serial.as_secs_f64();
    println!(
        "key order: {EVENTS} events in {elapsed:?} = {rate:.0}/s; partition-serial would take \
         {serial:?} = {serial_rate:.0}/s ({:.1}x)",
        rate / serial_rate
    );
    assert!(
        rate > 2.0 * serial_rate,
        "concurrency across keys must beat partition-serial processing by far: {rate:.0}/s vs {serial_rate:.0}/s"
    );
    let committed = committed(&broker.bootstrap(), &group, &topic, PARTITIONS);
    let total: i64 = committed.values().sum();
    assert_eq!(
        total as u64, EVENTS,
        "final commit covers every record: {committed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_never_passes_an_unfinished_record() {
    let broker = Broker::start();
    let (topic, dlq, group) = (unique("held"), unique("held-dlq"), unique("g"));
    create_topic(&broker.bootstrap(), &topic, 1).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;
    // Offset 0 is key "slow" seq 0, held until released; offsets 1..=200 are other keys.
    let mut recs = vec![Rec::seq("slow", 0)];
    recs.extend((1..=200).map(|i| Rec::seq(&format!("fast{i}"), i)));
    produce_all(&broker.bootstrap(), &topic, recs).await;

    let release = Arc::new(AtomicBool::new(false));
    let (mut step, seen) = ScriptedStep::new(0);
    let r = release.clone();
    step.hold = Some(Arc::new(move |d| {
        d["key"] == "slow" && !r.load(Ordering::SeqCst)
    }));
    let toml = config_toml(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        "[processor]\ncommit_interval_ms = 100",
    );
    let stop = CancellationToken::new();
    let (addr, task) = start_processor(&toml, vec![Arc::new(step)], stop.clone()).await;
    wait_until(
        "later records of other keys finish",
        Duration::from_secs(60),
        || seen.lock().unwrap().len() == 200,
    )
    .await;
    // Several commit intervals pass while offset 0 is held: nothing may be committed past it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let c = committed(&broker.bootstrap(), &group, &topic, 1);
        assert!(
            c.get(&0).is_none_or(|o| *o == 0),
            "committed {c:?} while offset 0 is unfinished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = scrape(addr).await;
    assert_eq!(
        metric_value(&metrics, "spillway_committed_offset_lag{"),
        Some(201.0),
        "committed-offset lag shows the held-back records"
    );
    release.store(true, Ordering::SeqCst);
    wait_until(
        "commit advances once the held record finishes",
        Duration::from_secs(30),
        || committed(&broker.bootstrap(), &group, &topic, 1).get(&0) == Some(&201),
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dlq_and_the_partition_moves_on() {
    let broker = Broker::start();
    let (topic, dlq, group) = (unique("poison"), unique("poison-dlq"), unique("g"));
    create_topic(&broker.bootstrap(), &topic, 1).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;
    let recs = vec![
        Rec::seq("a", 0),
        // Not JSON, not Avro.
        Rec {
            key: Some("a".into()),
            value: b"\x07garbage{".to_vec(),
            headers: vec![("ce_id".into(), "bad-1".into())],
        },
        // Confluent magic byte but truncated frame.
        Rec {
            key: Some("b".into()),
            value: vec![0, 0, 1],
            headers: vec![],
        },
        // Decodes, but the step fails it deterministically.
        Rec {
            key: Some("a".into()),
            value: br#"{"key":"a","seq":1,"fail":true}"#.to_vec(),
            headers: vec![],
        },
        Rec::seq("a", 2),
        Rec::seq("b", 3),
    ];
    produce_all(&broker.bootstrap(), &topic, recs).await;

    let (mut step, seen) = ScriptedStep::new(0);
    step.fail = |d| {
        (d["fail"] == true).then(|| StepError::deterministic("scripted_reject", "rejected by test"))
    };
    let toml = config_toml(&broker.bootstrap(), &group, &topic, &dlq, "");
    let stop = CancellationToken::new();
    let (addr, task) = start_processor(&toml, vec![Arc::new(step)], stop.clone()).await;
    wait_until(
        "good records after the poison ones are processed",
        Duration::from_secs(60),
        || seen.lock().unwrap().len() == 3,
    )
    .await;
    let dead = read_topic(&broker.bootstrap(), &dlq, 3, Duration::from_secs(30));
    assert_eq!(dead.len(), 3, "three records dead-lettered");
    let header = |m: &rdkafka::message::OwnedMessage, k: &str| header_str(m, k).map(str::to_string);
    let by_offset: HashMap<String, &rdkafka::message::OwnedMessage> = dead
        .iter()
        .map(|m| (header(m, "__connect.errors.offset").unwrap(), m))
        .collect();
    let bad = by_offset["1"];
    assert_eq!(
        bad.payload(),
        Some(&b"\x07garbage{"[..]),
        "value copied byte for byte"
    );
    assert_eq!(bad.key(), Some(&b"a"[..]), "key copied");
    assert_eq!(
        header(bad, "ce_id").as_deref(),
        Some("bad-1"),
        "original headers kept"
    );
    assert_eq!(header(bad, "dlq.reason").as_deref(), Some("invalid_json"));
    assert_eq!(
        header(bad, "__connect.errors.stage").as_deref(),
        Some("decode")
    );
    assert_eq!(
        header(bad, "__connect.errors.topic").as_deref(),
        Some(topic.as_str())
    );
    assert_eq!(
        header(bad, "__connect.errors.partition").as_deref(),
        Some("0")
    );
    assert_eq!(
        header(bad, "dlq.consumer_group").as_deref(),
        Some(group.as_str())
    );
    for h in [
        "__connect.errors.exception.class.name",
        "__connect.errors.exception.message",
        "dlq.attempts",
        "dlq.first_failure_ts",
        "dlq.last_failure_ts",
    ] {
        assert!(header(bad, h).is_some(), "header {h} present");
    }
    assert_eq!(
        header(by_offset["2"], "dlq.reason").as_deref(),
        Some("avro_truncated")
    );
    let failed = by_offset["3"];
    assert_eq!(
        header(failed, "dlq.reason").as_deref(),
        Some("scripted_reject")
    );
    assert_eq!(
        header(failed, "__connect.errors.stage").as_deref(),
        Some("step.scripted")
    );
    wait_until(
        "commit passes the poison records",
        Duration::from_secs(30),
        || committed(&broker.bootstrap(), &group, &topic, 1).get(&0) == Some(&6),
    )
    .await;
    let m = scrape(addr).await;
    assert_eq!(metric_sum(&m, "spillway_dlq_records_total{"), 3.0);
    // Undecodable ones under pipeline `none`, failed steps under `default`: 3 in all.
    assert_eq!(
        metric_sum(&m, "spillway_events_total{outcome=\"dead_lettered\","),
        3.0
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_retry_then_dead_letter_without_blocking_other_keys() {
    let broker = Broker::start();
    let (topic, dlq, group) = (unique("retry"), unique("retry-dlq"), unique("g"));
    create_topic(&broker.bootstrap(), &topic, 1).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;
    let mut recs = vec![Rec {
        key: Some("flaky".into()),
        value: br#"{"key":"flaky","seq":0,"fail":true}"#.to_vec(),
        headers: vec![],
    }];
    recs.extend((1..=50).map(|i| Rec::seq(&format!("ok{i}"), i)));
    produce_all(&broker.bootstrap(), &topic, recs).await;
    let (mut step, seen) = ScriptedStep::new(0);
    step.fail = |d| (d["fail"] == true).then(|| StepError::transient("scripted_503", "try later"));
    let toml = config_toml(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        "[processor.retry]\nmax_attempts = 4\ninitial_backoff_ms = 300\nmax_backoff_ms = 600",
    );
    let stop = CancellationToken::new();
    let (addr, task) = start_processor(&toml, vec![Arc::new(step)], stop.clone()).await;
    wait_until(
        "other keys finish while the flaky key retries",
        Duration::from_secs(60),
        || seen.lock().unwrap().len() == 50,
    )
    .await;
    let dead = read_topic(&broker.bootstrap(), &dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header_str(&dead[0], "dlq.attempts"),
        Some("4"),
        "dead-lettered after max_attempts"
    );
    let m = scrape(addr).await;
    assert_eq!(
        metric_value(
            &m,
            "spillway_step_retries_total{pipeline=\"default\",reason=\"scripted_503\",step=\"scripted\"}"
        ),
        Some(3.0)
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_and_lag_metrics_reflect_the_consumer() {
    let broker = Broker::start();
    let (topic, dlq, group) = (unique("health"), unique("health-dlq"), unique("g"));
    create_topic(&broker.bootstrap(), &topic, 2).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..100).map(|i| Rec::seq(&format!("k{i}"), i)),
    )
    .await;
    // Every event is held, so nothing finishes and the whole backlog stays as lag.
    let release = Arc::new(AtomicBool::new(false));
    let (mut step, seen) = ScriptedStep::new(0);
    let r = release.clone();
    step.hold = Some(Arc::new(move |_| !r.load(Ordering::SeqCst)));
    let toml = config_toml(&broker.bootstrap(), &group, &topic, &dlq, "");
    let stop = CancellationToken::new();
    let (addr, task) = start_processor(&toml, vec![Arc::new(step)], stop.clone()).await;
    let get = |path: &'static str| async move {
        reqwest::get(format!("http://{addr}{path}"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(get("/healthz").await, 200, "live while polling");
    assert_eq!(get("/readyz").await, 200, "ready once running");
    let mut lag = 0.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while lag < 100.0 {
        assert!(
            Instant::now() < deadline,
            "consumer lag never reached the backlog: {lag}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        lag = metric_sum(&scrape(addr).await, "spillway_consumer_lag{");
    }
    // Lag counts from the committed offset, so it can read 100 before every record is
    // fetched: wait for all of them to be in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = scrape(addr).await;
        if metric_value(&m, "spillway_inflight_events") == Some(100.0) {
            assert_eq!(metric_value(&m, "spillway_assigned_partitions"), Some(2.0));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the held events never all got in flight"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    release.store(true, Ordering::SeqCst);
    wait_until("held events finish", Duration::from_secs(30), || {
        seen.lock().unwrap().len() == 100
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_sum(&scrape(addr).await, "spillway_consumer_lag{") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "lag never went back to zero after commits"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = scrape(addr).await;
    assert!(
        metric_value(&m, "spillway_offset_commits_total{outcome=\"stored\"}").unwrap_or(0.0) >= 1.0,
        "offset stores are counted: {}",
        m.lines()
            .filter(|l| l.contains("commits"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Kafka fault injection (rdkafka MockCluster): the DLQ cannot be written for a while. The
/// poison record must stay unfinished (its offset uncommitted) while later records of other
/// keys finish, and land in the DLQ once Kafka accepts it again. Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_unavailable_holds_the_commit_until_the_dead_letter_is_written() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let mock = MockCluster::new(1).expect("mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let (topic, dlq, group) = (unique("mock"), unique("mock-dlq"), unique("g"));
    mock.create_topic(&topic, 1, 1).unwrap();
    mock.create_topic(&dlq, 1, 1).unwrap();
    let mut recs = vec![Rec {
        key: Some("poison".into()),
        value: b"not json".to_vec(),
        headers: vec![],
    }];
    recs.extend((1..=10).map(|i| Rec::seq(&format!("k{i}"), i)));
    produce_all(&bootstrap, &topic, recs).await;
    // From now on, the next produce requests (the DLQ writes) are refused.
    let refusals = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 6];
    mock.request_errors(RDKafkaApiKey::Produce, &refusals);

    let (step, seen) = ScriptedStep::new(0);
    let toml = config_toml(
        &bootstrap,
        &group,
        &topic,
        &dlq,
        "[processor]\ncommit_interval_ms = 100\n[processor.retry]\ninitial_backoff_ms = 200\nmax_backoff_ms = 400",
    );
    let stop = CancellationToken::new();
    let (addr, task) = start_processor(&toml, vec![Arc::new(step)], stop.clone()).await;
    wait_until(
        "later records of other keys finish",
        Duration::from_secs(60),
        || seen.lock().unwrap().len() == 10,
    )
    .await;
    let mut saw_refusal = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The commit first, then the metrics: a dead letter is counted before its record
        // finishes, so a commit past it seen first is always seen with its count. (Read the
        // other way round, the write and the commit could both land between the two reads.)
        let c = committed(&bootstrap, &group, &topic, 1);
        let m = scrape(addr).await;
        let written = metric_sum(&m, "spillway_dlq_records_total{");
        saw_refusal |= metric_value(&m, "spillway_dlq_write_errors_total").unwrap_or(0.0) >= 1.0;
        if written == 0.0 {
            assert!(
                c.get(&0).is_none_or(|o| *o == 0),
                "committed {c:?} past the record whose dead letter is not written yet"
            );
        } else if c.get(&0) == Some(&11) {
            break;
        }
        assert!(Instant::now() < deadline, "the DLQ write never succeeded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_refusal, "the refused DLQ writes were counted");
    let dead = read_topic(&bootstrap, &dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload(), Some(&b"not json"[..]));
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// The poll loop never waits on processing: a step that runs longer than
/// `max.poll.interval.ms` does not get the member evicted (no revoke), and the event finishes
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_longer_than_max_poll_interval_does_not_trigger_a_rebalance() {
    let broker = Broker::start();
    let (topic, dlq, group) = (unique("slowstep"), unique("slowstep-dlq"), unique("g"));
    create_topic(&broker.bootstrap(), &topic, 1).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        [Rec::seq("slow", 0), Rec::seq("slow", 1)],
    )
    .await;
    let started = Instant::now();
    let (mut step, seen) = ScriptedStep::new(0);
    // Seq 0 takes 9 s, half again the 6 s poll interval.
    step.hold = Some(Arc::new(move |d| {
        d["seq"] == 0 && started.elapsed() < Duration::from_secs(9)
    }));
    let toml = config_toml(&broker.bootstrap(), &group, &topic, &dlq, "").replace(
        "session_timeout_ms = 6000",
        "session_timeout_ms = 6000\nmax_poll_interval_ms = 6000",
    ) + "\n[processor]\nrebalance_timeout_ms = 3000\n";
    let stop = CancellationToken::new();
    let (addr, task) = start_processor(&toml, vec![Arc::new(step)], stop.clone()).await;
    wait_until(
        "both events finish in order",
        Duration::from_secs(60),
        || seen.lock().unwrap().len() == 2,
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "the slow step really ran long"
    );
    let seqs: Vec<u64> = seen.lock().unwrap().iter().map(|s| s.1).collect();
    assert_eq!(seqs, vec![0, 1], "each event once, in key order");
    let m = scrape(addr).await;
    assert_eq!(
        metric_value(&m, "spillway_rebalances_total{kind=\"revoke\"}"),
        None,
        "no revoke: the member was never evicted"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A dead letter Kafka refuses as too large is written without its value (marked, with its
/// size) instead of being retried for ever, so the partition moves on and the record can
/// still be found at its source coordinates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_kafka_is_written_without_its_value() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let mock = MockCluster::new(1).expect("mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let (topic, dlq, group) = (unique("big"), unique("big-dlq"), unique("g"));
    mock.create_topic(&topic, 1, 1).unwrap();
    mock.create_topic(&dlq, 1, 1).unwrap();
    let poison = b"not json at all".to_vec();
    produce_all(
        &bootstrap,
        &topic,
        [
            Rec {
                key: Some("k".into()),
                value: poison.clone(),
                headers: vec![],
            },
            Rec::seq("k", 1),
        ],
    )
    .await;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let (step, seen) = ScriptedStep::new(0);
    let toml = config_toml(&bootstrap, &group, &topic, &dlq, "");
    let stop = CancellationToken::new();
    let (_addr, task) = start_processor(&toml, vec![Arc::new(step)], stop.clone()).await;
    wait_until(
        "the record after the poison one is processed",
        Duration::from_secs(60),
        || seen.lock().unwrap().len() == 1,
    )
    .await;
    let dead = read_topic(&bootstrap, &dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload(), None, "value dropped");
    let header = |k: &str| header_str(&dead[0], k).map(str::to_string);
    assert_eq!(
        header("dlq.payload_dropped").as_deref(),
        Some("message_size_too_large")
    );
    assert_eq!(header("dlq.original_size"), Some(poison.len().to_string()));
    assert_eq!(header("__connect.errors.offset").as_deref(), Some("0"));
    assert_eq!(header("dlq.reason").as_deref(), Some("invalid_json"));
    wait_until(
        "commit passes both records",
        Duration::from_secs(30),
        || committed(&bootstrap, &group, &topic, 1).get(&0) == Some(&2),
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

//! The real `spillway` binary against a real broker: SIGTERM, SIGKILL, rebalances, a broker
//! restart and backpressure. The sink is a recording HTTP server in the test; records carry
//! no `ce_id`, so each event id is `topic/partition/offset` and commits can be checked
//! against exactly what finished.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use rand::Rng;

const PARTITIONS: i32 = 6;

async fn setup(broker: &Broker, name: &str, events: u64, keys: u64) -> (String, String, String) {
    let (topic, dlq, group) = (unique(name), unique(&format!("{name}-dlq")), unique("g"));
    create_topic(&broker.bootstrap(), &topic, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..events).map(|i| Rec::seq(&format!("k{}", i % keys), i / keys)),
    )
    .await;
    (topic, dlq, group)
}

fn distinct(received: &Received) -> usize {
    received.ids().into_iter().collect::<HashSet<_>>().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_sigterm_finishes_in_flight_work_and_commits() {
    let broker = Broker::start_exclusive();
    let (topic, dlq, group) = setup(&broker, "term", 3_000, 300).await;
    let (sink, received) = recording_sink_with(Duration::from_millis(300)).await;
    let toml = webhook_config(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        sink,
        "[processor]\nmax_in_flight = 64\nshutdown_timeout_ms = 15000\ncommit_interval_ms = 500",
    );
    let mut p = SpillwayProc::spawn(&toml);
    wait_until("processing under way", Duration::from_secs(60), || {
        received.len() >= 200
    })
    .await;
    let t0 = Instant::now();
    p.signal("TERM");
    let status = blocking(|| p.wait_exit(Duration::from_secs(30)));
    let took = t0.elapsed();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        p.log_text()
    );
    assert!(
        took < Duration::from_secs(15),
        "exited within the drain deadline: {took:?}"
    );
    let before_restart = received.len();
    let c = assert_commits_cover_only_finished(
        &broker.bootstrap(),
        &group,
        &topic,
        PARTITIONS,
        &received,
    );
    let committed_total: i64 = c.values().sum();
    assert_eq!(
        committed_total as usize, before_restart,
        "every finished record is covered by the final commit, nothing more: {c:?}"
    );
    println!("SIGTERM: exited 0 in {took:?} with {before_restart} events finished and committed");

    // A restarted instance picks up exactly where the first stopped.
    let mut p2 = SpillwayProc::spawn(&toml);
    p2.wait_until(
        "the rest is processed after restart",
        Duration::from_secs(120),
        || distinct(&received) >= 3_000,
    )
    .await;
    assert_eq!(duplicates(&received), 0, "nothing finished was reprocessed");
    p2.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_with_sigkill_loses_nothing_and_commits_only_finished_work() {
    const EVENTS: u64 = 20_000;
    let broker = Broker::start_exclusive();
    let (topic, dlq, group) = setup(&broker, "crash", EVENTS, 500).await;
    let (sink, received) = recording_sink_with(Duration::from_millis(2)).await;
    let toml = webhook_config(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        sink,
        "[processor]\nmax_in_flight = 256\ncommit_interval_ms = 200",
    );
    let mut kills = 0;
    let mut rng = rand::rng();
    while kills < 3 {
        let mut p = SpillwayProc::spawn(&toml);
        let at = received.len() + rng.random_range(1_000..4_000);
        wait_until(
            "progress before the next kill",
            Duration::from_secs(120),
            || received.len() >= at,
        )
        .await;
        p.kill9();
        kills += 1;
        let c = assert_commits_cover_only_finished(
            &broker.bootstrap(),
            &group,
            &topic,
            PARTITIONS,
            &received,
        );
        println!(
            "kill {kills}: {} received ({} distinct), committed {}",
            received.len(),
            distinct(&received),
            c.values().sum::<i64>()
        );
    }
    let mut p = SpillwayProc::spawn(&toml);
    wait_until(
        "every event processed after the crashes",
        Duration::from_secs(240),
        || distinct(&received) as u64 >= EVENTS,
    )
    .await;
    p.terminate();
    let ids: HashSet<String> = received.ids().into_iter().collect();
    for part in 0..PARTITIONS {
        let c = committed(&broker.bootstrap(), &group, &topic, PARTITIONS);
        let end = c.get(&part).copied().unwrap_or(0);
        for o in 0..end {
            assert!(
                ids.contains(&format!("{topic}/{part}/{o}")),
                "lost {part}/{o}"
            );
        }
    }
    assert_eq!(ids.len() as u64, EVENTS, "nothing lost");
    let c = assert_commits_cover_only_finished(
        &broker.bootstrap(),
        &group,
        &topic,
        PARTITIONS,
        &received,
    );
    assert_eq!(
        c.values().sum::<i64>() as u64,
        EVENTS,
        "final commit at the end"
    );
    println!(
        "crash: {EVENTS} events, {kills} SIGKILLs, 0 lost, {} redelivered duplicates (at-least-once)",
        duplicates(&received)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_when_an_instance_joins_and_leaves_loses_nothing() {
    const EVENTS: u64 = 12_000;
    let broker = Broker::start_exclusive();
    let (topic, dlq, group) = setup(&broker, "rebalance", EVENTS, 400).await;
    // Slow enough (about 1,300 events/s) that B joins and leaves while work remains.
    let (sink, received) = recording_sink_with(Duration::from_millis(25)).await;
    let toml = webhook_config(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        sink,
        "[processor]\nmax_in_flight = 32\ncommit_interval_ms = 200\nrebalance_timeout_ms = 5000",
    );
    let mut a = SpillwayProc::spawn(&toml);
    wait_until("A makes progress", Duration::from_secs(60), || {
        received.len() >= 1_500
    })
    .await;
    let mut b = SpillwayProc::spawn(&toml);
    wait_assigned(&b, "B").await;
    let joined_at = received.len();
    assert_commits_cover_only_finished(&broker.bootstrap(), &group, &topic, PARTITIONS, &received);
    wait_until("both make progress", Duration::from_secs(60), || {
        received.len() >= joined_at + 2_000
    })
    .await;
    b.terminate();
    assert_commits_cover_only_finished(&broker.bootstrap(), &group, &topic, PARTITIONS, &received);
    a.wait_until("A finishes everything", Duration::from_secs(60), || {
        distinct(&received) as u64 >= EVENTS
    })
    .await;
    a.terminate();
    let c = assert_commits_cover_only_finished(
        &broker.bootstrap(),
        &group,
        &topic,
        PARTITIONS,
        &received,
    );
    assert_eq!(c.values().sum::<i64>() as u64, EVENTS);
    assert_eq!(distinct(&received) as u64, EVENTS, "nothing lost");
    println!(
        "rebalance: {EVENTS} events, join at {joined_at}, 0 lost, {} redelivered",
        duplicates(&received)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_run_resumes_without_restarting_the_processor() {
    const EVENTS: u64 = 6_000;
    let mut broker = Broker::start_own();
    let (topic, dlq, group) = setup(&broker, "brokerrestart", EVENTS, 200).await;
    let (sink, received) = recording_sink_with(Duration::from_millis(5)).await;
    let toml = webhook_config(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        sink,
        "[processor]\nmax_in_flight = 64\ncommit_interval_ms = 200",
    );
    let mut p = SpillwayProc::spawn(&toml);
    wait_until(
        "progress before the broker dies",
        Duration::from_secs(60),
        || received.len() >= 1_000,
    )
    .await;
    let before = committed(&broker.bootstrap(), &group, &topic, PARTITIONS);
    blocking(|| broker.kill());
    tokio::time::sleep(Duration::from_secs(2)).await; // the broker stays down a while
    blocking(|| broker.restart());
    let after = committed(&broker.bootstrap(), &group, &topic, PARTITIONS);
    println!(
        "broker restart: committed before the kill {}, after the restart {}",
        before.values().sum::<i64>(),
        after.values().sum::<i64>()
    );
    wait_until(
        "every event processed after the broker restart",
        Duration::from_secs(240),
        || distinct(&received) as u64 >= EVENTS,
    )
    .await;
    assert!(
        p.wait_exit_nonblocking().is_none(),
        "processor kept running"
    );
    wait_until(
        "commits caught up after the restart",
        Duration::from_secs(60),
        || {
            committed(&broker.bootstrap(), &group, &topic, PARTITIONS)
                .values()
                .sum::<i64>() as u64
                == EVENTS
        },
    )
    .await;
    assert_commits_cover_only_finished(&broker.bootstrap(), &group, &topic, PARTITIONS, &received);
    p.terminate();
    println!(
        "broker restart: {EVENTS} events, 0 lost, {} redelivered",
        duplicates(&received)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_pauses_partitions_and_bounds_memory() {
    const EVENTS: u64 = 100_000;
    // The bound this test asserts: librdkafka's prefetch (16 MiB by default here), the
    // look-ahead buffers (max_buffered_total records of ~100 B), in-flight work, and the
    // runtime. Measured around 40-60 MiB; 160 MiB leaves room without hiding a leak of the
    // whole backlog (100,000 records held would add far more, with their per-record state).
    const RSS_BOUND_KIB: u64 = 160 * 1024;
    let broker = Broker::start_exclusive();
    let (topic, dlq, group) = setup(&broker, "backpressure", EVENTS, 10_000).await;
    let (sink, received) = recording_sink_with(Duration::from_millis(50)).await;
    let toml = webhook_config(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        sink,
        "[processor]\nmax_in_flight = 64\nmax_buffered_per_partition = 500\nmax_buffered_total = 2000",
    );
    let p = SpillwayProc::spawn(&toml);
    let mut max_rss = 0;
    let mut max_paused = 0.0f64;
    let mut max_buffered = 0.0f64;
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        max_rss = max_rss.max(p.rss_kib());
        if let Some(m) = p.try_scrape().await {
            max_paused =
                max_paused.max(metric_value(&m, "spillway_paused_partitions").unwrap_or(0.0));
            max_buffered =
                max_buffered.max(metric_value(&m, "spillway_buffered_records").unwrap_or(0.0));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "backpressure: {EVENTS} backlog, {} processed in 20 s, max RSS {} KiB (bound {RSS_BOUND_KIB}), \
         max paused partitions {max_paused}, max buffered {max_buffered}",
        received.len(),
        max_rss
    );
    assert!(received.len() > 1_000, "processing went on while paused");
    assert!(
        max_paused >= 1.0,
        "partitions were paused when buffers filled"
    );
    assert!(
        max_buffered <= 2_000.0 + 4_096.0,
        "buffered records stay near max_buffered_total: {max_buffered}"
    );
    assert!(
        max_rss > 0 && max_rss < RSS_BOUND_KIB,
        "RSS {max_rss} KiB over {RSS_BOUND_KIB} KiB"
    );
    p.signal("TERM");
}

/// Partitions assigned to `p` now (0 while it is not serving metrics).
async fn assigned(p: &SpillwayProc) -> f64 {
    p.try_scrape()
        .await
        .and_then(|m| metric_value(&m, "spillway_assigned_partitions"))
        .unwrap_or(0.0)
}

/// Rebalance callbacks `p` has seen (assign and revoke).
async fn rebalances(p: &SpillwayProc) -> f64 {
    p.try_scrape()
        .await
        .map(|m| metric_sum(&m, "spillway_rebalances_total"))
        .unwrap_or(0.0)
}

async fn wait_assigned(p: &SpillwayProc, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while assigned(p).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "{what}: no partitions within 60 s; log:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (key, seq) pairs in the order of their first effect: a redelivered repeat is not an
/// order violation, a first effect out of order is.
fn first_effects(received: &Received) -> Vec<(String, u64)> {
    let mut seen = HashSet::new();
    received
        .seqs()
        .into_iter()
        .filter(|e| seen.insert(e.clone()))
        .collect()
}

/// A rolling restart of a three-member group on Apache Kafka's group coordinator, as a
/// Kubernetes rollout does it: each member in turn gets SIGTERM (drain, commit, leave) and a
/// replacement joins before the next one goes. Nothing is lost, per-key order of first
/// effects holds, and no committed offset passes unfinished work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_three_members_loses_nothing_and_keeps_key_order() {
    const EVENTS: u64 = 15_000;
    let broker = Broker::start_exclusive();
    let (topic, dlq, group) = setup(&broker, "rolling", EVENTS, 300).await;
    // About 480 events/s for the group: the roll happens while most of the work remains.
    let (sink, received) = recording_sink_with(Duration::from_millis(50)).await;
    let toml = webhook_config(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        sink,
        "[processor]\nmax_in_flight = 8\ncommit_interval_ms = 200\nrebalance_timeout_ms = 5000",
    );
    let mut members: Vec<SpillwayProc> = (0..3).map(|_| SpillwayProc::spawn(&toml)).collect();
    for (i, m) in members.iter().enumerate() {
        wait_assigned(m, &format!("member {i}")).await;
    }
    for (i, member) in members.iter_mut().enumerate() {
        let before = received.len();
        wait_until(
            "progress before the restart",
            Duration::from_secs(60),
            || received.len() >= before + 500,
        )
        .await;
        member.terminate();
        *member = SpillwayProc::spawn(&toml);
        wait_assigned(member, &format!("replacement {i}")).await;
        assert_commits_cover_only_finished(
            &broker.bootstrap(),
            &group,
            &topic,
            PARTITIONS,
            &received,
        );
    }
    let rolled_at = distinct(&received);
    assert!(
        (rolled_at as u64) < EVENTS,
        "the roll should happen under load, but every event was done by then"
    );
    members[0]
        .wait_until(
            "the group finishes everything",
            Duration::from_secs(120),
            || distinct(&received) as u64 >= EVENTS,
        )
        .await;
    for m in &mut members {
        m.terminate();
    }
    let c = assert_commits_cover_only_finished(
        &broker.bootstrap(),
        &group,
        &topic,
        PARTITIONS,
        &received,
    );
    assert_eq!(
        c.values().sum::<i64>() as u64,
        EVENTS,
        "every offset committed"
    );
    assert_eq!(distinct(&received) as u64, EVENTS, "nothing lost");
    let first = first_effects(&received);
    assert_eq!(first.len() as u64, EVENTS);
    assert_eq!(order_violations(first), 0, "per-key order of first effects");
    println!(
        "rolling restart of 3 members: {EVENTS} events, rolled by {rolled_at}, 0 lost, {} redelivered",
        duplicates(&received)
    );
}

/// Static membership (`group_instance_id`): a member killed with SIGKILL, or stopped with
/// SIGTERM, and restarted within the session timeout rejoins as itself and gets its
/// partitions back, and the other member sees no rebalance at all (no revoke, no assign).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_restarted_after_sigkill_gets_its_partitions_back_without_a_rebalance() {
    const EVENTS: u64 = 6_000;
    let broker = Broker::start_exclusive();
    let (topic, dlq, group) = setup(&broker, "static", EVENTS, 300).await;
    let (sink, received) = recording_sink_with(Duration::from_millis(25)).await;
    // The broker's group.min.session.timeout.ms is 6 s; 20 s leaves room for the restart.
    let toml = |id: &str| {
        webhook_config(
            &broker.bootstrap(),
            &group,
            &topic,
            &dlq,
            sink,
            "[processor]\nmax_in_flight = 16\ncommit_interval_ms = 200",
        )
        .replace(
            "session_timeout_ms = 6000",
            &format!("session_timeout_ms = 20000\ngroup_instance_id = \"{id}\""),
        )
    };
    let mut a = SpillwayProc::spawn(&toml("member-a"));
    let b = SpillwayProc::spawn(&toml("member-b"));
    wait_assigned(&a, "member a").await;
    wait_assigned(&b, "member b").await;
    let settled = received.len();
    wait_until("progress", Duration::from_secs(60), || {
        received.len() >= settled + 500
    })
    .await;
    let (b_rebalances, b_assigned) = (rebalances(&b).await, assigned(&b).await);
    let a_assigned = assigned(&a).await;

    a.kill9();
    let killed = Instant::now();
    let mut a = SpillwayProc::spawn(&toml("member-a"));
    wait_assigned(&a, "member a after its restart").await;
    let back = killed.elapsed();
    assert_eq!(assigned(&a).await, a_assigned, "a got its partitions back");
    assert_eq!(
        (rebalances(&b).await, assigned(&b).await),
        (b_rebalances, b_assigned),
        "b saw no rebalance"
    );
    // A graceful restart too: a static member does not leave the group on SIGTERM.
    a.terminate();
    let mut a = SpillwayProc::spawn(&toml("member-a"));
    wait_assigned(&a, "member a after its graceful restart").await;
    assert_eq!(assigned(&a).await, a_assigned, "a got its partitions back");
    assert_eq!(
        (rebalances(&b).await, assigned(&b).await),
        (b_rebalances, b_assigned),
        "b saw no rebalance after a's graceful restart"
    );
    a.wait_until(
        "the group finishes everything",
        Duration::from_secs(120),
        || distinct(&received) as u64 >= EVENTS,
    )
    .await;
    let mut b = b;
    a.terminate();
    b.terminate();
    assert_eq!(distinct(&received) as u64, EVENTS, "nothing lost");
    println!(
        "static membership: partitions back {:.1} s after the SIGKILL, the other member saw no rebalance",
        back.as_secs_f64()
    );
}

/// Two live instances with the same `group_instance_id` (a misconfiguration): the group
/// fences the older one, whose consumer can never fetch again. It stops with an error (so
/// an orchestrator restarts it and the duplicate is visible) instead of idling with green
/// probes, and the newer one takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_fenced_by_a_duplicate_instance_id_exits_with_an_error() {
    let broker = Broker::start_exclusive();
    const EVENTS: u64 = 2_000;
    // About 160 events/s: the second instance has most of the work left to take over.
    let (topic, dlq, group) = setup(&broker, "fenced", EVENTS, 50).await;
    let (sink, received) = recording_sink_with(Duration::from_millis(50)).await;
    let toml = webhook_config(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        sink,
        "[processor]\nmax_in_flight = 8",
    )
    .replace(
        "session_timeout_ms = 6000",
        "session_timeout_ms = 20000\ngroup_instance_id = \"same-id\"",
    );
    let mut first = SpillwayProc::spawn(&toml);
    wait_assigned(&first, "the first instance").await;
    let second = SpillwayProc::spawn(&toml);
    let status = blocking(|| first.wait_exit(Duration::from_secs(60)));
    assert!(
        !status.success(),
        "a fenced instance exits with an error: {status}"
    );
    assert!(
        first.log_text().contains("fatal consumer error"),
        "{}",
        first.log_text()
    );
    wait_assigned(&second, "the second instance").await;
    second
        .wait_until(
            "the second instance finishes",
            Duration::from_secs(120),
            || distinct(&received) as u64 >= EVENTS,
        )
        .await;
    assert!(
        second.events_finished().await > 0.0,
        "the second instance took the work over"
    );
    let mut second = second;
    second.terminate();
}

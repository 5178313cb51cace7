//! Spike isolation: while one source's backlog drains at the provider's rate, another source's
//! fresh events share the in-flight slots and the account's admission by weight, instead of
//! waiting behind the whole backlog.

use super::*;

/// A comment of `source` (`ce_source`), keyed by its id.
fn sourced(source: &str, id: &str, text: &str) -> Rec {
    cloud_event(id, source, "com.example.comment", text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_from_one_source_does_not_hold_back_another_sources_fresh_events() {
    let (broker, topic, dlq, group) = setup(4).await;
    // The account admits 40 requests a second, so the spike's 400 events take 10 s to drain.
    // 200 of them wait in the account's admission, the others in the scheduler's ready queue:
    // a steady event must be dealt a fair turn at both.
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (sink, posts) = recording_sink().await;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        "",
        &format!(
            "{}\n[processor]\nmax_in_flight = 200\n[processor.fairness]\nby = \"source\"\n",
            provider(
                "primary",
                "openai",
                &sim,
                "requests_per_minute = 2400\nburst_ms = 100"
            )
        ),
    );
    const SPIKE: usize = 400;
    let spike = (0..SPIKE).map(|i| {
        sourced(
            "/webhooks/campaign",
            &format!("c-{i}"),
            &format!("spike {i}"),
        )
    });
    produce_all(&broker.bootstrap(), &topic, spike).await;
    let stop = CancellationToken::new();
    let (_addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until("the spike is draining", Duration::from_secs(60), || {
        posts.len() >= 20
    })
    .await;
    // The steady source's events land in the same partitions, behind the spike's backlog.
    let steady =
        (0..10).map(|i| sourced("/webhooks/blog", &format!("b-{i}"), &format!("steady {i}")));
    produce_all(&broker.bootstrap(), &topic, steady).await;
    let produced_at = posts.len();
    wait_until("every event is posted", Duration::from_secs(120), || {
        posts.len() >= SPIKE + 10
    })
    .await;
    let order = posts.texts();
    assert_eq!(order.len(), SPIKE + 10, "each event posted once");
    let last_steady = order
        .iter()
        .rposition(|t| t.starts_with("steady"))
        .expect("steady events posted");
    // Each steady event waits for at most one turn of the spike's in the slots and in
    // admission (plus what was already being answered); first come, first served at either
    // would post them after at least 200 more of the spike.
    assert!(
        last_steady < produced_at + 100,
        "the last steady event was posted at {last_steady}, {} posts after they were produced; \
         order: {:?}",
        last_steady - produced_at,
        &order[produced_at..(last_steady + 1).min(order.len())]
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_source_on_its_own_topic_keeps_flowing_while_a_spike_fills_the_total_look_ahead() {
    let (broker, spiky, dlq, group) = setup(2).await;
    let quiet = unique("quiet");
    create_topic(&broker.bootstrap(), &quiet, 1).await;
    // 5 requests a second; the look-ahead holds 40 records in all, 30 per partition: the
    // spike's 300 fill it, and its partitions pause on the total.
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (sink, posts) = recording_sink().await;
    let toml = pipeline_toml(
        &broker,
        (&spiky, &dlq, &group),
        sink,
        "",
        &format!(
            "{}\n[processor]\nmax_in_flight = 4\nmax_buffered_per_partition = 30\n\
             max_buffered_total = 40\n",
            provider(
                "primary",
                "openai",
                &sim,
                "requests_per_minute = 300\nburst_ms = 200"
            )
        ),
    )
    .replace(
        &format!("topics = [\"{spiky}\"]"),
        &format!("topics = [\"{spiky}\", \"{quiet}\"]"),
    );
    const SPIKE: usize = 300;
    let spike = (0..SPIKE).map(|i| {
        sourced(
            "/webhooks/campaign",
            &format!("c-{i}"),
            &format!("spike {i}"),
        )
    });
    produce_all(&broker.bootstrap(), &spiky, spike).await;
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until_async(
        "the spike fills the look-ahead",
        Duration::from_secs(60),
        || async {
            let m = metrics(addr).await;
            metric_sum(&m, "spillway_buffered_records") >= 36.0 && posts.len() >= 10
        },
    )
    .await;
    // One quiet event at a time, each after the one before was posted: every one must find its
    // partition flowing, not paused behind the spike's full total.
    let mut waits = Vec::new();
    for i in 0..5 {
        let before = posts.len();
        let text = format!("quiet {i}");
        produce_all(
            &broker.bootstrap(),
            &quiet,
            [sourced("/webhooks/blog", &format!("b-{i}"), &text)],
        )
        .await;
        wait_until("the quiet event is posted", Duration::from_secs(60), || {
            posts.texts().contains(&text)
        })
        .await;
        waits.push(posts.len() - before);
        let m = metrics(addr).await;
        let buffered = metric_sum(&m, "spillway_buffered_records");
        // Twice the total, plus what the poll thread had handed over before the pauses took
        // effect (its channel holds 256 records), plus the one record that found it full.
        assert!(
            buffered <= 80.0 + 256.0 + 1.0,
            "the look-ahead stays within twice its total: {buffered}"
        );
    }
    // Each quiet event waits for what was in flight and a turn or two of the spike's; paused
    // behind the total, it would wait until the spike's 40 drained to 20.
    assert!(
        waits.iter().all(|w| *w <= 12),
        "spike posts while each quiet event waited: {waits:?}"
    );
    assert!(posts.len() < SPIKE, "the spike was still draining");
    stop.cancel();
    task.await.unwrap().unwrap();
}

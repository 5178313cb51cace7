//! Fallback providers, the TPM reservation, SIGTERM while every provider is down.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_provider_is_used_while_the_primary_is_down() {
    let (broker, topic, dlq, group) = setup(2).await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..20).map(|i| text_rec(&format!("k{i}"), &format!("event {i}"))),
    )
    .await;
    let primary = Sim::start(|c| c.faults = "500=1.0".into()).await;
    let backup = Sim::start(|_| {}).await;
    let (sink, received) = recording_sink().await;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        r#"fallback = [{ provider = "backup", model = "mock-large" }]"#,
        &format!(
            "{}{}[llm.breaker]\nfailure_threshold = 3\nopen_ms = 60000\n",
            provider("primary", "openai", &primary, ""),
            provider("backup", "anthropic", &backup, "")
        ),
    );
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until(
        "every event completes through the fallback",
        Duration::from_secs(60),
        || received.len() >= 20,
    )
    .await;
    let bodies = received.bodies.lock().unwrap().clone();
    for b in &bodies {
        assert_eq!(b["outputs"]["classify"]["provider"], "backup");
        assert_eq!(b["outputs"]["classify"]["model"], "mock-large");
        let text = b["data"]["text"].as_str().unwrap();
        assert_eq!(label_of(b), label_for(&format!("Comment: {text}")));
    }
    // The first wave ran concurrently, so every event may have tried the primary before
    // its breaker opened. A second wave arrives while it is open: none of it may reach the
    // primary, and all of it goes straight to the backup.
    let m = metrics(addr).await;
    assert_eq!(
        metric_value(&m, "spillway_llm_breaker_state{provider=\"primary\"}"),
        Some(2.0)
    );
    let before = primary.stats().await.received;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (20..40).map(|i| text_rec(&format!("k{i}"), &format!("event {i}"))),
    )
    .await;
    wait_until(
        "the second wave completes through the fallback",
        Duration::from_secs(60),
        || received.len() >= 40,
    )
    .await;
    assert_eq!(
        primary.stats().await.received,
        before,
        "no request reached the primary while its breaker was open"
    );
    let m = metrics(addr).await;
    assert_eq!(
        metric_value(&m, "spillway_llm_fallbacks_total{model=\"mock-large\"}"),
        Some(40.0)
    );
    assert_eq!(
        metric_value(&m, "spillway_paused_partitions"),
        Some(0.0),
        "intake keeps flowing while a fallback is available"
    );
    assert_eq!(metric_sum(&m, "spillway_dlq_records_total"), 0.0);
    assert_eq!(backup.stats().await.completed, 40);
    assert_eq!(duplicates(&received), 0);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tpm_reservation_is_settled_against_actual_usage() {
    let (broker, topic, dlq, group) = setup(2).await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..60).map(|i| text_rec(&format!("k{i}"), &format!("event {i}"))),
    )
    .await;
    // 60,000 output tokens per minute with a one-second bucket: 1,000 tokens. Each request
    // reserves max_tokens = 500 and uses 20. Kept reserved, that is 2 requests per second and
    // 30 s for 60 events; settled against usage, the bucket is back to ~1,000 after each
    // answer and the run takes a few seconds.
    let sim = Sim::start(|c| {
        c.output_tpm = 60_000;
        c.burst_ms = 1_000;
        c.output_tokens = 20;
        c.latency_ms = 50;
    })
    .await;
    let (sink, received) = recording_sink().await;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        "",
        &provider(
            "primary",
            "anthropic",
            &sim,
            "output_tokens_per_minute = 60000",
        ),
    )
    .replace("max_tokens = 64", "max_tokens = 500");
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until_async("the first answer", Duration::from_secs(60), || {
        let s = &sim;
        async move { s.stats().await.completed > 0 }
    })
    .await;
    let started = Instant::now();
    wait_until("every event completes", Duration::from_secs(60), || {
        received.len() >= 60
    })
    .await;
    let took = started.elapsed();
    println!("60 events in {took:?} under a 1,000-token output bucket");
    let s = sim.stats().await;
    assert_eq!(s.output_tokens, 60 * 20, "usage as the provider counted it");
    assert_eq!(
        s.rate_limited, 0,
        "refunds never made Spillway overrun the provider"
    );
    // Without settlement the same run needs 29.5 s at least; the margin is tenfold.
    assert!(
        took < Duration::from_secs(15),
        "unused output was not refunded: {took:?}"
    );
    let m = metrics(addr).await;
    assert_eq!(
        metric_value(
            &m,
            "spillway_llm_tokens_total{kind=\"output\",model=\"mock-small\"}"
        ),
        Some(1_200.0)
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_every_provider_is_down_exits_promptly_and_loses_nothing() {
    let (broker, topic, dlq, group) = setup(2).await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..10).map(|i| text_rec(&format!("k{i}"), &format!("event {i}"))),
    )
    .await;
    let sim = Sim::start(|c| c.faults = "500=1.0".into()).await;
    let (sink, received) = recording_sink().await;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        "",
        &format!(
            "{}[llm.breaker]\nfailure_threshold = 3\nopen_ms = 60000\n[processor]\nshutdown_timeout_ms = 20000\ncommit_interval_ms = 100\n",
            provider("primary", "openai", &sim, "")
        ),
    );
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until_async(
        "the breaker opens and intake pauses",
        Duration::from_secs(60),
        || async move {
            let m = metrics(addr).await;
            metric_value(&m, "spillway_llm_breaker_state{provider=\"primary\"}") == Some(2.0)
                && metric_value(&m, "spillway_paused_partitions") == Some(2.0)
        },
    )
    .await;
    // Every event is waiting for the provider. SIGTERM must not sit out the 20 s drain
    // deadline for work that cannot progress, and must not commit it either.
    let started = Instant::now();
    stop.cancel();
    task.await.unwrap().unwrap();
    let took = started.elapsed();
    println!("shutdown with the breaker open took {took:?}");
    assert!(took < Duration::from_secs(10), "shutdown waited {took:?}");
    let c = committed(&broker.bootstrap(), &group, &topic, 2);
    assert!(
        c.values().all(|o| *o == 0),
        "nothing finished, so nothing may be committed: {c:?}"
    );
    // The provider recovers; the next instance of the group delivers every event once.
    sim.set_faults("").await;
    let stop = CancellationToken::new();
    let (_addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until(
        "every event is delivered after the restart",
        Duration::from_secs(60),
        || received.len() >= 10,
    )
    .await;
    assert_eq!(duplicates(&received), 0);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_takes_over_while_the_primary_is_under_a_retry_after_hold() {
    let (broker, topic, dlq, group) = setup(1).await;
    // One key: the events go one after another.
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..10).map(|i| text_rec("one-key", &format!("event {i}"))),
    )
    .await;
    let primary = Sim::start(|c| {
        c.script = "429".into();
        c.retry_after_ms = 30_000;
    })
    .await;
    let backup = Sim::start(|_| {}).await;
    let (sink, received) = recording_sink().await;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        r#"fallback = [{ provider = "backup", model = "mock-large" }]"#,
        &format!(
            "{}{}",
            provider("primary", "openai", &primary, ""),
            provider("backup", "openai", &backup, "")
        ),
    );
    let stop = CancellationToken::new();
    let (_addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until("every event completes", Duration::from_secs(25), || {
        received.len() >= 10
    })
    .await;
    // The first event's 429 held the primary for 30 s; it and every later event went to the
    // backup at once instead of waiting out the hold.
    assert_eq!(primary.stats().await.received, 1);
    assert_eq!(backup.stats().await.completed, 10);
    stop.cancel();
    task.await.unwrap().unwrap();
}

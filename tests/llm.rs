//! The LLM stage against the provider simulator and a real broker: admission, Retry-After,
//! the breaker pausing intake, quota, hangs, deterministic failures, repairs, fallbacks, and
//! per-event cost.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage, Timestamp};
use serde_json::json;
use spillway::codec::{header_str, Event};
use spillway::config::Config;
use spillway::processor::gate::Gate;
use spillway::step::{Action, Attempt, EventContext};
use spillway::telemetry::Metrics;
use spillway_mock_llm::label_for;
use tokio_util::sync::CancellationToken;

const SCHEMA: &str = r#"{ type = "object", required = ["label"], properties = { label = { enum = ["positive", "negative", "neutral"] } } }"#;

/// An LLM step (`classify`, JSON output checked against [`SCHEMA`]) followed by the webhook
/// sink; `providers` and `more` add provider tables, fallbacks, breaker and processor settings.
fn pipeline_toml(
    broker: &Broker,
    names: (&str, &str, &str),
    sink: SocketAddr,
    step_extra: &str,
    more: &str,
) -> String {
    let (topic, dlq, group) = names;
    config_toml(
        &broker.bootstrap(),
        group,
        topic,
        dlq,
        &format!(
            r#"
[[steps]]
type = "llm"
name = "classify"
provider = "primary"
model = "mock-small"
system = "You classify blog comments. Answer with JSON only."
user = "Comment: {{{{ data.text }}}}"
max_tokens = 64
output = {{ format = "json", schema = {SCHEMA}, repair_attempts = 2 }}
{step_extra}

[[steps]]
type = "webhook"
url = "http://{sink}/events"
timeout_ms = 10000

[llm.prices.mock-small]
input_usd_per_mtok = 0.15
output_usd_per_mtok = 0.6

{more}
"#
        ),
    )
}

fn provider(name: &str, api: &str, sim: &Sim, extra: &str) -> String {
    format!(
        "[llm.providers.{name}]\napi = \"{api}\"\nbase_url = \"{}\"\napi_key = \"test-key\"\n{extra}\n",
        sim.base
    )
}

async fn setup(partitions: i32) -> (Broker, String, String, String) {
    let broker = Broker::start();
    let (topic, dlq, group) = (unique("llm"), unique("llm-dlq"), unique("g"));
    create_topic(&broker.bootstrap(), &topic, partitions).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;
    (broker, topic, dlq, group)
}

fn label_of(body: &serde_json::Value) -> &str {
    body["outputs"]["classify"]["json"]["label"]
        .as_str()
        .unwrap_or("<none>")
}

async fn metrics(addr: SocketAddr) -> String {
    scrape(addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_from_a_topic_through_the_llm_to_the_http_sink_with_results_and_cost() {
    let (broker, topic, dlq, group) = setup(3).await;
    let texts: Vec<String> = (0..120)
        .map(|i| format!("comment number {i}: what a read"))
        .collect();
    produce_all(
        &broker.bootstrap(),
        &topic,
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| text_rec(&format!("k{}", i % 20), t)),
    )
    .await;
    // The account allows 3,000 requests per minute; Spillway is told the same and must never
    // draw a 429.
    let sim = Sim::start(|c| {
        c.rpm = 3_000;
        c.latency_ms = 20;
    })
    .await;
    let (sink, received) = recording_sink().await;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        "",
        &provider("primary", "openai", &sim, "requests_per_minute = 3000"),
    );
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until(
        "every event reaches the sink",
        Duration::from_secs(60),
        || received.len() >= 120,
    )
    .await;

    let bodies = received.bodies.lock().unwrap().clone();
    assert_eq!(duplicates(&received), 0);
    let by_text: std::collections::HashMap<&str, &serde_json::Value> = bodies
        .iter()
        .map(|b| (b["data"]["text"].as_str().unwrap(), b))
        .collect();
    assert_eq!(by_text.len(), 120, "every event arrived once");
    for text in &texts {
        let body = by_text[text.as_str()];
        assert_eq!(
            label_of(body),
            label_for(&format!("Comment: {text}")),
            "the simulator's answer for {text:?} reached the sink"
        );
        let out = &body["outputs"]["classify"];
        assert_eq!(out["provider"], "primary");
        assert!(out["usage"]["input_tokens"].as_u64().unwrap() > 0);
    }
    let s = sim.stats().await;
    assert_eq!(
        s.rate_limited, 0,
        "admission kept under the account's limit"
    );
    assert_eq!(s.completed, 120, "one call per event");

    let m = metrics(addr).await;
    println!(
        "e2e: 120 events, sim input {} output {} tokens",
        s.input_tokens, s.output_tokens
    );
    assert_eq!(
        metric_value(&m, "spillway_event_llm_tokens_count"),
        Some(120.0)
    );
    assert_eq!(
        metric_value(&m, "spillway_event_llm_tokens_sum"),
        Some((s.input_tokens + s.output_tokens) as f64)
    );
    assert_eq!(
        metric_value(
            &m,
            "spillway_llm_tokens_total{kind=\"input\",model=\"mock-small\"}"
        ),
        Some(s.input_tokens as f64)
    );
    let cost = metric_value(&m, "spillway_event_llm_cost_usd_sum").unwrap();
    let expected = (s.input_tokens as f64 * 0.15 + s.output_tokens as f64 * 0.6) / 1e6;
    assert!(
        (cost - expected).abs() < 1e-9,
        "per-event cost {cost} = price table applied to actual usage {expected}"
    );
    assert_eq!(
        metric_value(&m, "spillway_event_llm_cost_usd_count"),
        Some(120.0)
    );
    assert!(metric_value(&m, "spillway_llm_request_duration_seconds_count").is_some());
    assert_eq!(metric_sum(&m, "spillway_dlq_records_total"), 0.0);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_no_request_is_sent_before_the_deadline() {
    let (broker, topic, dlq, group) = setup(1).await;
    // Two keys, five events each: two requests are in flight at a time, one per key.
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..10).map(|i| text_rec(["a", "b"][i % 2], &format!("hello {i}"))),
    )
    .await;
    // The first two requests (the first event of each key) are refused with retry-after 1 s.
    let sim = Sim::start(|c| {
        c.script = "429,429".into();
        c.retry_after_ms = 1_000;
        c.latency_ms = 20;
    })
    .await;
    let (sink, received) = recording_sink().await;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        "",
        &provider("primary", "openai", &sim, ""),
    );
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until(
        "every event reaches the sink",
        Duration::from_secs(60),
        || received.len() >= 10,
    )
    .await;
    let s = sim.stats().await;
    assert_eq!(s.rate_limited, 2);
    let mut times = s.request_times_ms.clone();
    times.sort_unstable();
    assert_eq!(
        times.len(),
        12,
        "ten events, two of them sent again: {times:?}"
    );
    // Nothing else could be sent before the refused events were answered, and they went
    // again only after the deadline: every later request came at least 1 s after the first.
    assert!(
        times[2] >= times[0] + 1_000,
        "a request came {} ms after the first 429: {times:?}",
        times[2] - times[0]
    );
    let m = metrics(addr).await;
    assert_eq!(metric_sum(&m, "spillway_llm_rate_limited_total"), 2.0);
    assert_eq!(
        metric_sum(&m, "spillway_step_retries_total"),
        0.0,
        "a rate limit defers; it does not use up attempts"
    );
    assert!(metric_sum(&m, "spillway_step_deferrals_total") >= 2.0);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_burst_opens_the_breaker_pauses_the_partitions_and_every_event_completes_after() {
    let (broker, topic, dlq, group) = setup(3).await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..30).map(|i| text_rec(&format!("k{i}"), &format!("event {i}"))),
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
            "{}[llm.breaker]\nfailure_threshold = 5\nopen_ms = 1500\n[processor.retry]\nmax_attempts = 3\ninitial_backoff_ms = 20\nmax_backoff_ms = 100\n",
            provider("primary", "openai", &sim, "")
        ),
    );
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until_async(
        "the breaker opens and pauses all 3 partitions",
        Duration::from_secs(60),
        || async move {
            let m = metrics(addr).await;
            metric_value(&m, "spillway_llm_breaker_state{provider=\"primary\"}") == Some(2.0)
                && metric_value(&m, "spillway_paused_partitions") == Some(3.0)
        },
    )
    .await;
    // The outage lasts several open periods (each ends with one failed probe). Events wait:
    // none is failed, none is dead-lettered, even though max_attempts is 3.
    let outage_end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < outage_end {
        let m = metrics(addr).await;
        assert_eq!(
            metric_sum(&m, "spillway_dlq_records_total"),
            0.0,
            "nothing dead-lettered"
        );
        assert_eq!(received.len(), 0);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let during = sim.stats().await.received;
    sim.set_faults("").await;
    wait_until(
        "every event completes after the breaker closes",
        Duration::from_secs(60),
        || received.len() >= 30,
    )
    .await;
    let m = metrics(addr).await;
    assert_eq!(
        metric_value(&m, "spillway_llm_breaker_state{provider=\"primary\"}"),
        Some(0.0)
    );
    assert!(
        metric_value(
            &m,
            "spillway_llm_breaker_transitions_total{provider=\"primary\",state=\"half_open\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        metric_value(
            &m,
            "spillway_llm_breaker_transitions_total{provider=\"primary\",state=\"closed\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(metric_value(&m, "spillway_paused_partitions"), Some(0.0));
    assert_eq!(metric_sum(&m, "spillway_dlq_records_total"), 0.0);
    assert_eq!(duplicates(&received), 0);
    assert!(
        read_topic(&broker.bootstrap(), &dlq, 1, Duration::from_secs(2)).is_empty(),
        "the DLQ topic stayed empty"
    );
    println!("5xx burst: {during} requests reached the failing provider during the outage");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_quota_opens_the_breaker_alerts_and_does_not_loop() {
    let (broker, topic, dlq, group) = setup(1).await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..8).map(|i| text_rec(&format!("k{i}"), &format!("event {i}"))),
    )
    .await;
    let sim = Sim::start(|c| c.faults = "quota=1.0".into()).await;
    let (sink, received) = recording_sink().await;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        "",
        &format!(
            "{}[llm.breaker]\nopen_ms = 1000\n[processor]\nmax_in_flight = 4\n",
            provider("primary", "openai", &sim, "")
        ),
    );
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until_async(
        "the quota alert fires",
        Duration::from_secs(60),
        || async move {
            let m = metrics(addr).await;
            metric_value(
                &m,
                "spillway_llm_alerts_total{provider=\"primary\",reason=\"insufficient_quota\"}",
            )
            .is_some()
                && metric_value(&m, "spillway_paused_partitions") == Some(1.0)
        },
    )
    .await;
    // Over 3 s of a 1 s open period, at most one probe per period may reach the provider.
    let before = sim.stats().await.received;
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = sim.stats().await.received - before;
    let periods = window.elapsed().as_secs_f64().ceil() as u64;
    println!("quota: {sent} requests in {:?}", window.elapsed());
    assert!(
        sent <= periods + 1,
        "{sent} requests in {periods} open periods: a loop"
    );
    assert_eq!(received.len(), 0);
    let m = metrics(addr).await;
    assert_eq!(metric_sum(&m, "spillway_dlq_records_total"), 0.0);
    // A human tops the account up: the next probe succeeds and everything completes.
    sim.set_faults("").await;
    wait_until(
        "every event completes after the quota returns",
        Duration::from_secs(60),
        || received.len() >= 8,
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_llm_failures_go_to_the_dlq_with_their_reason() {
    let (broker, topic, dlq, group) = setup(1).await;
    let mut recs: Vec<Rec> = (0..6)
        .map(|i| text_rec(&format!("k{i}"), &format!("fine {i}")))
        .collect();
    // ~750 prompt tokens + 64 max_tokens against a 400-token context window.
    recs.push(text_rec("big", &"x".repeat(3_000)));
    // The simulator answers this conversation with prose, never JSON.
    recs.push(text_rec("bad", "sim-fault:invalid please"));
    produce_all(&broker.bootstrap(), &topic, recs).await;
    let sim = Sim::start(|c| c.context_tokens = 400).await;
    let (sink, received) = recording_sink().await;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        "",
        &provider("primary", "openai", &sim, ""),
    );
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    let dead = read_topic(&broker.bootstrap(), &dlq, 2, Duration::from_secs(60));
    wait_until(
        "the good events reach the sink",
        Duration::from_secs(60),
        || received.len() >= 6,
    )
    .await;
    let mut reasons: Vec<(String, String, String)> = dead
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(m.key().unwrap()).to_string(),
                header_str(m, "dlq.reason").unwrap().to_string(),
                header_str(m, "dlq.attempts").unwrap().to_string(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            ("bad".into(), "llm_invalid_output".into(), "1".into()),
            ("big".into(), "llm_context_overflow".into(), "1".into()),
        ],
        "deterministic failures are dead-lettered at once, with their reason"
    );
    let m = metrics(addr).await;
    assert_eq!(
        metric_sum(&m, "spillway_llm_repairs_total"),
        2.0,
        "two repair requests before giving up on the invalid output"
    );
    assert_eq!(metric_sum(&m, "spillway_step_retries_total"), 0.0);
    assert_eq!(received.len(), 6);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_provider_alerts_and_the_fallback_answers_while_its_key_goes_nowhere() {
    let (broker, topic, dlq, group) = setup(1).await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..5).map(|i| text_rec(&format!("k{i}"), &format!("event {i}"))),
    )
    .await;
    let (redirector, _origin, target_seen) = redirect_to_elsewhere(301).await;
    let backup = Sim::start(|_| {}).await;
    let (sink, received) = recording_sink().await;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        r#"fallback = [{ provider = "backup", model = "mock-large" }]"#,
        &format!(
            "[llm.providers.primary]\napi = \"openai\"\nbase_url = \"http://{redirector}\"\n\
             api_key = \"sk-primary-secret\"\n{}",
            provider("backup", "anthropic", &backup, "")
        ),
    );
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until(
        "every event completes through the fallback",
        Duration::from_secs(60),
        || received.len() >= 5,
    )
    .await;
    for b in received.bodies.lock().unwrap().iter() {
        assert_eq!(b["outputs"]["classify"]["provider"], "backup");
    }
    let m = metrics(addr).await;
    assert!(
        metric_sum(
            &m,
            "spillway_llm_alerts_total{provider=\"primary\",reason=\"redirect\"}"
        ) >= 1.0,
        "the redirect raised an alert"
    );
    assert_eq!(
        metric_value(&m, "spillway_llm_breaker_state{provider=\"primary\"}"),
        Some(2.0),
        "the primary's breaker is open"
    );
    assert_eq!(
        records_in(&broker.bootstrap(), &dlq, 1),
        0,
        "nothing dead-lettered"
    );
    assert!(
        target_seen.lock().unwrap().is_empty(),
        "the redirect's target got {:?}",
        target_seen.lock().unwrap()
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

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

/// The configured LLM step alone, for tests that drive it directly.
fn llm_step(sim: &Sim, provider_extra: &str) -> Arc<dyn spillway::step::Step> {
    let toml = format!(
        r#"
[kafka]
brokers = "127.0.0.1:1"
group_id = "g"
topics = ["t"]
[dlq]
topic = "t.dlq"
[[steps]]
type = "llm"
name = "classify"
provider = "primary"
model = "mock-small"
user = "Comment: {{{{ data.text }}}}. Answer with JSON."
max_tokens = 64
output = {{ format = "json", schema = {SCHEMA}, repair_attempts = 2 }}
{}
"#,
        provider("primary", "openai", sim, provider_extra)
    );
    let config = Config::from_toml(&toml).expect("valid");
    let steps = spillway::pipeline::build(&config, &Metrics::new(), &Gate::new()).expect("builds");
    steps[0].clone()
}

fn context(text: &str) -> EventContext {
    EventContext {
        record: Arc::new(OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            Some(OwnedHeaders::new()),
        )),
        event: Event {
            id: "e".into(),
            source: "test".into(),
            event_type: "comment".into(),
            time: None,
            data: json!({ "text": text }),
        },
        dedup_key: "test|1".into(),
        outputs: serde_json::Map::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_request_hits_the_timeout_and_leaks_no_task() {
    let sim = Sim::start(|c| c.script = "ok,hang,ok".into()).await;
    let step = llm_step(&sim, "timeout_ms = 300");
    let runtime = tokio::runtime::Handle::current().metrics();
    // A first call warms the connection pool, so the baseline counts its connection task.
    step.run(&context("warm"), Attempt::first())
        .await
        .expect("first call answers");
    let baseline = runtime.num_alive_tasks();
    let started = Instant::now();
    let err = step
        .run(&context("hang"), Attempt::first())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code, "llm_timeout");
    assert!(
        matches!(err.action, Action::Retry { .. }),
        "a timeout is transient"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "the attempt timeout fired after {took:?}"
    );
    // The client dropped the connection: the simulator's handler ends, and no task of either
    // side is left behind.
    let s = &sim;
    wait_until_async(
        "the hung request is gone on the server",
        Duration::from_secs(10),
        || async move {
            s.stats().await.in_progress <= 1 // this /stats request itself
        },
    )
    .await;
    wait_until(
        "no task outlives the timed-out call",
        Duration::from_secs(10),
        || runtime.num_alive_tasks() <= baseline,
    )
    .await;
    let ctx = context("after");
    step.run(&ctx, Attempt::first())
        .await
        .expect("the next call answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_output_is_repaired_with_the_validation_error_fed_back() {
    let sim = Sim::start(|c| c.script = "invalid".into()).await;
    let step = llm_step(&sim, "");
    let ctx = context("lovely");
    let output = step
        .run(&ctx, Attempt::first())
        .await
        .expect("repaired on the second request");
    let out = output.value.as_ref().expect("the step's result");
    assert_eq!(out["repairs"], 1);
    assert_eq!(
        out["json"]["label"],
        label_for("Comment: lovely. Answer with JSON.")
    );
    assert_eq!(output.spend.calls, 2, "both calls are paid for and counted");
    assert_eq!(sim.stats().await.completed, 2);
    // With every answer invalid, the step gives up after two repairs, deterministically.
    let ctx = context("sim-fault:invalid");
    let err = step.run(&ctx, Attempt::first()).await.unwrap_err();
    assert_eq!(err.code, "llm_invalid_output");
    assert_eq!(err.action, Action::DeadLetter);
    assert!(
        !err.message.contains("label"),
        "no model output in the DLQ message"
    );
    assert_eq!(sim.stats().await.completed, 5, "one call and two repairs");
}

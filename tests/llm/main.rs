//! The LLM stage against the provider simulator and a real broker: admission, Retry-After,
//! the breaker pausing intake, quota, hangs, deterministic failures, repairs, fallbacks, and
//! per-event cost.

mod budget;
#[path = "../common/mod.rs"]
mod common;
mod examples;
mod failover;
mod fairness;
mod pipelines;
mod routing;
mod step;
mod trace;

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

/// A CloudEvents record keyed by its id: id, source and type in `ce_*` headers,
/// `{"text": ..}` as data.
fn cloud_event(id: &str, source: &str, event_type: &str, text: &str) -> Rec {
    let mut rec = text_rec(id, text);
    rec.headers = vec![
        ("ce_specversion".into(), "1.0".into()),
        ("ce_id".into(), id.into()),
        ("ce_source".into(), source.into()),
        ("ce_type".into(), event_type.into()),
    ];
    rec
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

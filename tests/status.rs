//! `spillway status` against a running pipeline: its figures are compared with the broker's
//! own offsets and the processor's own metrics.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 3;

fn status_json(config: &std::path::Path, metrics: std::net::SocketAddr) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["status", "--json", "--config"])
        .arg(config)
        .arg("--metrics-url")
        .arg(format!("http://{metrics}/metrics"))
        .output()
        .expect("run spillway status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status prints JSON")
}

fn watermarks(bootstrap: &str, topic: &str, partition: i32) -> (i64, i64) {
    blocking(|| {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("wm"))
            .create()
            .unwrap();
        c.fetch_watermarks(topic, partition, Duration::from_secs(10))
            .unwrap()
    })
}

/// Checks every partition's figures against the broker's committed offsets and watermarks.
fn assert_matches_broker(status: &serde_json::Value, bootstrap: &str, group: &str, topic: &str) {
    let committed = committed(bootstrap, group, topic, PARTITIONS);
    let parts = status["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), PARTITIONS as usize);
    let mut total = 0;
    for p in parts {
        let n = p["partition"].as_i64().unwrap() as i32;
        let (low, high) = watermarks(bootstrap, topic, n);
        assert_eq!(p["high"].as_i64(), Some(high), "partition {n} end");
        // Nothing committed and a commit at the log start mean the same position.
        let position = |c: Option<i64>| c.unwrap_or(low).max(low);
        assert_eq!(
            position(p["committed"].as_i64()),
            position(committed.get(&n).copied()),
            "partition {n} committed"
        );
        let lag = high - position(committed.get(&n).copied());
        assert_eq!(p["lag"].as_i64(), Some(lag.max(0)), "partition {n} lag");
        total += lag.max(0);
    }
    assert_eq!(status["total_lag"].as_i64(), Some(total));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_lag_dlq_and_in_flight_work_as_the_broker_and_processor_see_them() {
    let broker = Broker::start();
    let (topic, dlq, group) = (unique("status"), unique("status-dlq"), unique("g"));
    create_topic(&broker.bootstrap(), &topic, PARTITIONS).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..30).map(|i| Rec::seq(&format!("k{}", i % 6), i / 6)),
    )
    .await;
    let before_dlq = spillway::telemetry::now_ms() as i64;
    produce_all(
        &broker.bootstrap(),
        &dlq,
        (0..3).map(|i| Rec::seq("poison", i)),
    )
    .await;
    let after_dlq = spillway::telemetry::now_ms() as i64;

    // Every record is held in its step until released: four run, the rest wait.
    let hold = Arc::new(AtomicBool::new(true));
    let (mut step, _seen) = ScriptedStep::new(0);
    let h = hold.clone();
    step.hold = Some(Arc::new(move |_| h.load(Ordering::Relaxed)));
    let toml = config_toml(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        "[processor]\nmax_in_flight = 4\ncommit_interval_ms = 200",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spillway.toml");
    std::fs::write(&file, &toml).unwrap();
    let stop = CancellationToken::new();
    let (metrics, task) = start_processor(&toml, vec![Arc::new(step)], stop.clone()).await;
    wait_until_async("four events in flight", Duration::from_secs(60), || async move {
        metric_value(&scrape(metrics).await, "spillway_inflight_events") == Some(4.0)
    })
    .await;

    let status = tokio::task::block_in_place(|| status_json(&file, metrics));
    assert_matches_broker(&status, &broker.bootstrap(), &group, &topic);
    assert_eq!(
        status["total_lag"].as_i64(),
        Some(30),
        "nothing finished yet"
    );
    assert_eq!(status["dlq"]["records"].as_i64(), Some(3));
    let pipelines = status["pipelines"].as_array().expect("pipelines");
    assert_eq!(pipelines.len(), 1, "top-level steps are one pipeline");
    assert_eq!(pipelines[0]["name"], "default");
    assert_eq!(pipelines[0]["lag"].as_i64(), Some(30));
    let oldest = status["dlq"]["oldest_ms"]
        .as_i64()
        .expect("oldest DLQ record");
    assert!(
        (before_dlq..=after_dlq).contains(&oldest),
        "{before_dlq} <= {oldest} <= {after_dlq}"
    );
    assert!(status["dlq"]["oldest_age_secs"].as_f64().unwrap() >= 0.0);
    let scraped = scrape(metrics).await;
    assert_eq!(status["processor"]["in_flight"].as_f64(), Some(4.0));
    assert_eq!(
        status["processor"]["paused_partitions"].as_f64(),
        metric_value(&scraped, "spillway_paused_partitions")
    );

    // Released: everything finishes and is committed, and the lag goes to zero.
    hold.store(false, Ordering::Relaxed);
    let (b, g, t) = (broker.bootstrap(), group.clone(), topic.clone());
    wait_until("all 30 committed", Duration::from_secs(60), || {
        committed(&b, &g, &t, PARTITIONS).values().sum::<i64>() == 30
    })
    .await;
    let status = tokio::task::block_in_place(|| status_json(&file, metrics));
    assert_matches_broker(&status, &broker.bootstrap(), &group, &topic);
    assert_eq!(status["total_lag"].as_i64(), Some(0));
    assert_eq!(status["processor"]["in_flight"].as_f64(), Some(0.0));
    assert_eq!(status["pipelines"][0]["lag"].as_i64(), Some(0));
    assert_eq!(
        status["pipelines"][0]["events"]["succeeded"].as_f64(),
        Some(30.0)
    );

    // And the table a human reads says the same.
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["status", "--config"])
        .arg(&file)
        .arg("--metrics-url")
        .arg(format!("http://{metrics}/metrics"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("total lag 0"), "{text}");
    assert!(text.contains(&format!("dlq {dlq}: 3 records")), "{text}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

//! `spillway dlq list|show|replay` against a real pipeline: a sink that rejects events sends
//! them to the DLQ; the tools find them, replay them once each (resuming after an
//! interruption), and the loop guard stops a record that keeps failing.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rdkafka::message::{Headers, Message};
use tokio_util::sync::CancellationToken;

/// A webhook receiver that answers 400 while `reject` is set, else 200, recording accepted
/// event ids.
async fn switchable_sink(reject: Arc<AtomicBool>) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use axum::routing::post;
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let a = accepted.clone();
    let app = axum::Router::new().route(
        "/events",
        post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let (a, reject) = (a.clone(), reject.clone());
            async move {
                if reject.load(Ordering::Relaxed) {
                    return axum::http::StatusCode::BAD_REQUEST;
                }
                a.lock()
                    .unwrap()
                    .push(body["id"].as_str().unwrap_or_default().to_string());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, accepted)
}

fn event(key: &str, id: &str) -> Rec {
    Rec {
        key: Some(key.to_string()),
        value: format!(r#"{{"key":"{key}","text":"{id}"}}"#).into_bytes(),
        headers: vec![
            ("ce_id".into(), id.into()),
            ("ce_source".into(), "/test".into()),
            ("ce_type".into(), "com.example.comment".into()),
            ("ce_specversion".into(), "1.0".into()),
        ],
    }
}

/// Runs `spillway dlq <args>` (the config inserted after the subcommand); returns stdout.
fn run_dlq(config: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .arg("dlq")
        .arg(args[0])
        .arg("--config")
        .arg(config)
        .args(&args[1..])
        .output()
        .expect("run spillway dlq");
    assert!(
        out.status.success(),
        "dlq {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `spillway dlq <args>`'s stdout lines, each a JSON value.
fn dlq(config: &std::path::Path, args: &[&str]) -> Vec<serde_json::Value> {
    run_dlq(config, args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// `spillway dlq <args>`'s stdout as one JSON document.
fn dlq_one(config: &std::path::Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&run_dlq(config, args)).expect("JSON")
}

async fn wait_dlq(bootstrap: &str, dlq: &str, count: usize) -> Vec<rdkafka::message::OwnedMessage> {
    let (b, d) = (bootstrap.to_string(), dlq.to_string());
    wait_until("records in the DLQ", Duration::from_secs(60), || {
        read_topic(&b, &d, count, Duration::from_secs(2)).len() >= count
    })
    .await;
    read_topic(bootstrap, dlq, count + 10, Duration::from_secs(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_tools_list_show_and_replay_once_each_resuming_and_honouring_the_loop_guard() {
    let broker = Broker::start();
    let (topic, dlq_topic, group) = (unique("dlqt"), unique("dlqt-dlq"), unique("g"));
    create_topic(&broker.bootstrap(), &topic, 2).await;
    create_topic(&broker.bootstrap(), &dlq_topic, 1).await;
    let reject = Arc::new(AtomicBool::new(true));
    let (sink, accepted) = switchable_sink(reject.clone()).await;
    let toml = webhook_config(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq_topic,
        sink,
        "[processor]\ncommit_interval_ms = 200",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spillway.toml");
    std::fs::write(&file, &toml).unwrap();
    let config = spillway::config::Config::from_toml(&toml).unwrap();
    let stop = CancellationToken::new();
    let p = spillway::pipeline::start(config, stop.clone())
        .await
        .unwrap();
    let task = tokio::spawn(p.run());

    // The sink rejects everything: ten events land in the DLQ.
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..10).map(|i| event(&format!("k{}", i % 3), &format!("evt-{i}"))),
    )
    .await;
    wait_dlq(&broker.bootstrap(), &dlq_topic, 10).await;

    let all = tokio::task::block_in_place(|| dlq(&file, &["list"]));
    assert_eq!(all.len(), 10);
    assert!(
        all.iter().all(|r| r["reason"] == "webhook_rejected"),
        "{all:?}"
    );
    assert!(all.iter().all(|r| r["replay_count"] == 0));
    let k1 = tokio::task::block_in_place(|| dlq(&file, &["list", "--key", "k1"]));
    assert_eq!(k1.len(), 3, "evt-1, evt-4, evt-7 have key k1");
    let none = tokio::task::block_in_place(|| dlq(&file, &["list", "--reason", "invalid_json"]));
    assert!(none.is_empty());
    let future = tokio::task::block_in_place(|| dlq(&file, &["list", "--since=-1h"]));
    assert!(future.is_empty(), "nothing was dead-lettered in the future");
    let recent = tokio::task::block_in_place(|| dlq(&file, &["list", "--since", "10m"]));
    assert_eq!(recent.len(), 10);
    let first = &all[0];
    let shown = tokio::task::block_in_place(|| {
        dlq_one(
            &file,
            &[
                "show",
                "--partition",
                &first["partition"].to_string(),
                "--offset",
                &first["offset"].to_string(),
            ],
        )
    });
    assert_eq!(shown["key"], first["key"]);
    assert!(shown["value"]["text"].as_str().unwrap().starts_with("evt-"));
    assert!(shown["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h[0] == "__connect.errors.topic" && h[1] == topic.as_str()));

    // A dry run changes nothing.
    let before = records_in(&broker.bootstrap(), &topic, 2);
    let dry = tokio::task::block_in_place(|| dlq(&file, &["replay", "--dry-run"]));
    assert_eq!(dry.last().unwrap()["replayed"], 10);
    assert_eq!(dry.last().unwrap()["dry_run"], true);
    assert_eq!(records_in(&broker.bootstrap(), &topic, 2), before);

    // The sink is fixed. A replay is interrupted after four records, then resumed: each of
    // the ten goes back exactly once, and the pipeline delivers it.
    reject.store(false, Ordering::Relaxed);
    let part =
        tokio::task::block_in_place(|| dlq(&file, &["replay", "--limit", "4", "--rate", "50"]));
    assert_eq!(part.last().unwrap()["replayed"], 4);
    let rest = tokio::task::block_in_place(|| dlq(&file, &["replay", "--rate", "50"]));
    assert_eq!(rest.last().unwrap()["replayed"], 6);
    let again = tokio::task::block_in_place(|| dlq(&file, &["replay"]));
    assert_eq!(
        again.last().unwrap()["replayed"],
        0,
        "nothing left to replay"
    );
    let a = accepted.clone();
    wait_until(
        "the replayed events are delivered",
        Duration::from_secs(60),
        || a.lock().unwrap().len() >= 10,
    )
    .await;
    let mut ids = accepted.lock().unwrap().clone();
    ids.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("evt-{i}")).collect();
    expected.sort();
    assert_eq!(ids, expected, "each replayed once");
    let replayed = read_topic(&broker.bootstrap(), &topic, 20, Duration::from_secs(10));
    let counts: Vec<String> = replayed
        .iter()
        .filter_map(|m| {
            m.headers()?
                .iter()
                .find(|h| h.key == "dlq.replay_count")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
        .collect();
    assert_eq!(counts, vec!["1".to_string(); 10]);

    // A record that keeps failing comes back with its replay count, and the loop guard stops
    // it: it is not sent again.
    reject.store(true, Ordering::Relaxed);
    produce_all(&broker.bootstrap(), &topic, [event("k9", "evt-poison")]).await;
    wait_dlq(&broker.bootstrap(), &dlq_topic, 11).await;
    let once = tokio::task::block_in_place(|| dlq(&file, &["replay", "--max-replays", "1"]));
    assert_eq!(once.last().unwrap()["replayed"], 1);
    wait_dlq(&broker.bootstrap(), &dlq_topic, 12).await;
    let poison = tokio::task::block_in_place(|| dlq(&file, &["list", "--key", "k9"]));
    assert_eq!(poison.len(), 2);
    assert_eq!(poison[1]["replay_count"], 1);
    let before = records_in(&broker.bootstrap(), &topic, 2);
    let guarded = tokio::task::block_in_place(|| dlq(&file, &["replay", "--max-replays", "1"]));
    let summary = guarded.last().unwrap();
    assert_eq!(summary["replayed"], 0);
    assert_eq!(summary["refused_by_loop_guard"], 1);
    assert_eq!(records_in(&broker.bootstrap(), &topic, 2), before);

    stop.cancel();
    task.await.unwrap().unwrap();
}

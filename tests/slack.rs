//! The Slack sink against a local server speaking Slack's Web API (`chat.postMessage`,
//! `conversations.history`): a response lost after Slack accepted the post, a 429 with
//! `Retry-After`, and `channel_not_found`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::{Headers, Message};
use serde_json::{json, Value as Json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "xoxb-test-token";

#[derive(Default)]
struct Slack {
    /// Messages in channels: (channel, text, dedup key, ts).
    messages: Mutex<Vec<(String, String, String, String)>>,
    /// Every chat.postMessage call, with its arrival time.
    posts: Mutex<Vec<Instant>>,
    history_calls: AtomicU32,
    /// The next N accepted posts get no answer in time (the client times out).
    lose_responses: AtomicU32,
    /// The next N posts are answered 429 with Retry-After: 1.
    rate_limit: AtomicU32,
}

async fn slack_server() -> (SocketAddr, Arc<Slack>) {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    let state = Arc::new(Slack::default());
    fn authed(h: &HeaderMap) -> bool {
        h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
    }
    async fn post_message(
        State(s): State<Arc<Slack>>,
        headers: HeaderMap,
        axum::Json(body): axum::Json<Json>,
    ) -> axum::response::Response {
        s.posts.lock().unwrap().push(Instant::now());
        if !authed(&headers) {
            return axum::Json(json!({"ok": false, "error": "invalid_auth"})).into_response();
        }
        if s.rate_limit
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                axum::Json(json!({"ok": false, "error": "ratelimited"})),
            )
                .into_response();
        }
        let channel = body["channel"].as_str().unwrap_or_default().to_string();
        if channel == "C_MISSING" {
            return axum::Json(json!({"ok": false, "error": "channel_not_found"})).into_response();
        }
        let key = body["metadata"]["event_payload"]["dedup_key"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let ts = {
            let mut m = s.messages.lock().unwrap();
            let ts = format!("1700000000.{:06}", m.len() + 1);
            m.push((
                channel.clone(),
                body["text"].as_str().unwrap_or_default().to_string(),
                key,
                ts.clone(),
            ));
            ts
        };
        if s.lose_responses
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            // Accepted, but the answer never arrives in time.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        axum::Json(json!({"ok": true, "channel": channel, "ts": ts})).into_response()
    }
    async fn history(
        State(s): State<Arc<Slack>>,
        headers: HeaderMap,
        uri: axum::http::Uri,
    ) -> axum::Json<Json> {
        let q: std::collections::HashMap<String, String> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s.history_calls.fetch_add(1, Ordering::SeqCst);
        if !authed(&headers) {
            return axum::Json(json!({"ok": false, "error": "invalid_auth"}));
        }
        let with_metadata = q.get("include_all_metadata").map(String::as_str) == Some("true");
        let channel = q.get("channel").cloned().unwrap_or_default();
        let messages: Vec<Json> = s
            .messages
            .lock()
            .unwrap()
            .iter()
            .rev()
            .filter(|m| m.0 == channel)
            .map(|(_, text, key, ts)| {
                let mut m = json!({"type": "message", "text": text, "ts": ts});
                if with_metadata {
                    m["metadata"] =
                        json!({"event_type": "spillway_event", "event_payload": {"dedup_key": key}});
                }
                m
            })
            .collect();
        axum::Json(json!({"ok": true, "messages": messages, "has_more": false}))
    }
    let app = axum::Router::new()
        .route("/api/chat.postMessage", post(post_message))
        .route("/api/conversations.history", get(history))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, state)
}

fn event(key: &str, id: &str) -> Rec {
    Rec {
        key: Some(key.to_string()),
        value: format!(r#"{{"key":"{key}","text":"comment {id}"}}"#).into_bytes(),
        headers: vec![
            ("ce_id".into(), id.into()),
            ("ce_source".into(), "/test".into()),
            ("ce_type".into(), "com.example.comment".into()),
            ("ce_specversion".into(), "1.0".into()),
        ],
    }
}

struct Pipeline {
    broker: Broker,
    topic: String,
    dlq: String,
    metrics: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), spillway::processor::ProcessorError>>,
}

async fn pipeline(slack: SocketAddr, channel: &str) -> Pipeline {
    let broker = Broker::start();
    let (topic, dlq, group, journal) = (
        unique("slack"),
        unique("slack-dlq"),
        unique("g"),
        unique("slack-journal"),
    );
    create_topic(&broker.bootstrap(), &topic, 1).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;
    create_topic(&broker.bootstrap(), &journal, 1).await;
    let state = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("state")
        .join(&journal);
    let state = state.display();
    let toml = config_toml(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        &format!(
            r#"
[processor.retry]
max_attempts = 5
initial_backoff_ms = 50
max_backoff_ms = 200

[journal]
topic = "{journal}"
state_dir = "{state}"

[[steps]]
type = "slack"
name = "notify"
token = "{TOKEN}"
channel = "{channel}"
api_url = "http://{slack}/api"
text = "New comment: {{{{ data.text }}}}"
pacing_ms = 200
timeout_ms = 1000
"#
        ),
    );
    let config = spillway::config::Config::from_toml(&toml).expect("valid config");
    let stop = CancellationToken::new();
    let p = spillway::pipeline::start(config, stop.clone())
        .await
        .expect("processor starts");
    let metrics = p.metrics_addr();
    let task = tokio::spawn(p.run());
    Pipeline {
        broker,
        topic,
        dlq,
        metrics,
        stop,
        task,
    }
}

async fn finished(p: &Pipeline, count: f64) {
    let m = p.metrics;
    wait_until_async("events finished", Duration::from_secs(60), || async move {
        metric_sum(&scrape(m).await, "spillway_events_total") >= count
    })
    .await;
}

impl Pipeline {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_response_after_slack_accepted_the_post_is_reconciled_not_posted_twice() {
    let (addr, slack) = slack_server().await;
    slack.lose_responses.store(1, Ordering::SeqCst);
    let p = pipeline(addr, "C1").await;
    produce_all(
        &p.broker.bootstrap(),
        &p.topic,
        (0..3).map(|i| event("k", &format!("evt-{i}"))),
    )
    .await;
    finished(&p, 3.0).await;
    let messages = slack.messages.lock().unwrap().clone();
    let mut keys: Vec<&str> = messages.iter().map(|m| m.2.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["/test|evt-0", "/test|evt-1", "/test|evt-2"],
        "each event posted once"
    );
    assert_eq!(messages[0].1, "New comment: comment evt-0");
    assert_eq!(
        slack.posts.lock().unwrap().len(),
        3,
        "the timed-out post was found in the history, not sent again"
    );
    assert!(slack.history_calls.load(Ordering::SeqCst) >= 1);
    // Posts to one channel are paced.
    let posts = slack.posts.lock().unwrap().clone();
    for w in posts.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(190),
            "posts {:?} apart",
            w[1] - w[0]
        );
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_honoured_and_the_message_posted_once() {
    let (addr, slack) = slack_server().await;
    slack.rate_limit.store(1, Ordering::SeqCst);
    let p = pipeline(addr, "C1").await;
    produce_all(&p.broker.bootstrap(), &p.topic, [event("k", "evt-rl")]).await;
    finished(&p, 1.0).await;
    let posts = slack.posts.lock().unwrap().clone();
    assert_eq!(posts.len(), 2, "one 429, then the post");
    assert!(
        posts[1] - posts[0] >= Duration::from_millis(990),
        "retried {:?} after a Retry-After of 1 s",
        posts[1] - posts[0]
    );
    assert_eq!(slack.messages.lock().unwrap().len(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_not_found_goes_to_the_dlq_without_retries() {
    let (addr, slack) = slack_server().await;
    let p = pipeline(addr, "C_MISSING").await;
    produce_all(&p.broker.bootstrap(), &p.topic, [event("k", "evt-lost")]).await;
    finished(&p, 1.0).await;
    let dead = read_topic(&p.broker.bootstrap(), &p.dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    let reason = dead[0]
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "dlq.reason"))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned());
    assert_eq!(reason.as_deref(), Some("slack_channel"));
    assert_eq!(slack.posts.lock().unwrap().len(), 1, "not retried");
    p.stop().await;
}

/// A Slack bot step that posted, then crashed before its result was journaled, runs again to
/// reconcile even if its condition is now false: it is never recorded as skipped after it may
/// have acted, and it does not post twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_may_have_happened_is_reconciled_even_when_its_condition_turned_false() {
    let (addr, slack) = slack_server().await;
    let broker = Broker::start_exclusive();
    let (topic, dlq, group, journal) = (
        unique("slack-when"),
        unique("slack-when-dlq"),
        unique("g"),
        unique("slack-when-journal"),
    );
    for t in [&topic, &dlq, &journal] {
        create_topic(&broker.bootstrap(), t, 1).await;
    }
    let state = tempfile::tempdir().unwrap();
    let config = |when: &str| {
        config_toml(
            &broker.bootstrap(),
            &group,
            &topic,
            &dlq,
            &format!(
                r#"
[processor]
commit_interval_ms = 60000

[journal]
topic = "{journal}"
state_dir = "{state}"

[[steps]]
type = "slack"
name = "notify"
when = "{when}"
token = "{TOKEN}"
channel = "C9"
api_url = "http://{addr}/api"
text = "New comment: {{{{ data.text }}}}"
pacing_ms = 0
timeout_ms = 1000
"#,
                state = state.path().display()
            ),
        )
    };
    produce_all(&broker.bootstrap(), &topic, [event("k", "evt-0")]).await;
    // The post is made, then the process dies before the step's result is journaled.
    crash_at(&config("true"), "after_step:notify:1");
    assert_eq!(slack.posts.lock().unwrap().len(), 1);
    let mut p = SpillwayProc::spawn(&config("false"));
    p.wait_finished(1, "redelivered").await;
    let metrics = p.try_scrape().await.unwrap_or_default();
    p.terminate();
    assert_eq!(
        metric_sum(&metrics, "spillway_step_skips_total"),
        0.0,
        "a step that may have acted is not recorded as skipped"
    );
    assert!(
        slack.history_calls.load(Ordering::SeqCst) >= 1,
        "it looked its post up in the channel"
    );
    assert_eq!(
        slack.posts.lock().unwrap().len(),
        1,
        "and did not post again"
    );
}

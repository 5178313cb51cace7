//! Misbehaving peers and hostile input on the processor's side, against Apache Kafka: every
//! one ends in a clear, bounded outcome (a dead letter with its own reason), nothing already
//! accepted is lost, and no credential leaves for a host that was not configured.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage, Timestamp};
use spillway::codec::{header_str, Event};
use spillway::config::{Config, StepConfig};
use spillway::step::{Action, Attempt, EventContext, Step};
use tokio_util::sync::CancellationToken;

fn context(id: &str) -> EventContext {
    let record = OwnedMessage::new(
        Some(b"{}".to_vec()),
        Some(b"k".to_vec()),
        "t".into(),
        Timestamp::NotAvailable,
        0,
        0,
        Some(OwnedHeaders::new()),
    );
    EventContext {
        record: Arc::new(record),
        event: std::sync::Arc::new(Event {
            id: id.into(),
            source: "/webhooks/blog".into(),
            event_type: "comment".into(),
            time: None,
            data: serde_json::json!({"text": "hello"}).into(),
        }),
        dedup_key: id.into(),
        outputs: Default::default(),
        share: Default::default(),
        pipeline: "default".into(),
    }
}

/// The shared broker, with a one-partition input topic and DLQ named after `prefix`, and a
/// group.
async fn setup(prefix: &str) -> (Broker, String, String, String) {
    let broker = Broker::start();
    let (topic, dlq, group) = (
        unique(prefix),
        unique(&format!("{prefix}-dlq")),
        unique("g"),
    );
    create_topic(&broker.bootstrap(), &topic, 1).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;
    (broker, topic, dlq, group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_webhook_dead_letters_the_event_and_its_credential_goes_nowhere_else() {
    let (broker, topic, dlq, group) = setup("redir").await;
    let (redirector, elsewhere, target_seen) = redirect_to_elsewhere(302).await;
    let toml = config_toml(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        &format!(
            "[[steps]]\ntype = \"webhook\"\nurl = \"http://{redirector}/events\"\n\
             headers = {{ authorization = \"Bearer sink-secret\" }}\n"
        ),
    );
    produce_all(&broker.bootstrap(), &topic, [Rec::seq("a", 0)]).await;
    let stop = CancellationToken::new();
    let (_addr, task) = start_configured(&toml, stop.clone()).await;
    let dead = read_topic(&broker.bootstrap(), &dlq, 1, Duration::from_secs(60));
    assert_eq!(dead.len(), 1, "the event is dead-lettered, not lost");
    assert_eq!(header_str(&dead[0], "dlq.reason"), Some("webhook_redirect"));
    assert_eq!(
        header_str(&dead[0], "dlq.attempts"),
        Some("1"),
        "not retried"
    );
    let message = header_str(&dead[0], "__connect.errors.exception.message").unwrap();
    assert!(
        message.contains("302") && message.contains(&elsewhere) && !message.contains(TOKEN),
        "{message}"
    );
    wait_until(
        "the commit passes the dead-lettered event",
        Duration::from_secs(30),
        || committed(&broker.bootstrap(), &group, &topic, 1).get(&0) == Some(&1),
    )
    .await;
    assert!(
        target_seen.lock().unwrap().is_empty(),
        "the redirect's target got a request: {:?}",
        target_seen.lock().unwrap()
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_slack_or_llm_endpoint_is_a_deterministic_error_and_no_key_leaves() {
    for status in [301u16, 303, 307] {
        let (redirector, elsewhere, target_seen) = redirect_to_elsewhere(status).await;
        let toml = config_toml(
            "127.0.0.1:9",
            "g",
            "t",
            "d",
            &format!(
                "[llm.providers.p]\napi = \"anthropic\"\nbase_url = \"http://{redirector}\"\n\
                 api_key = \"sk-ant-secret\"\n\
                 [[steps]]\ntype = \"slack\"\nwebhook_url = \"http://{redirector}/hook\"\n\
                 text = \"{{{{ data.text }}}}\"\npacing_ms = 0\n"
            ),
        );
        let config = Config::from_toml(&toml).unwrap();
        let StepConfig::Slack(slack) = &config.steps[0].step else {
            unreachable!()
        };
        let sink = spillway::sink::slack::SlackSink::new(slack).unwrap();
        let ctx = context("blog:1");
        let err = sink.run(&ctx, Attempt::first()).await.unwrap_err();
        assert_eq!(err.action, Action::DeadLetter, "slack {status}");
        assert_eq!(err.code, "slack_redirect");
        assert!(
            err.message.contains(&elsewhere) && !err.message.contains(TOKEN),
            "{}",
            err.message
        );

        let provider =
            spillway::llm::client::Provider::new("p", &config.llm.providers["p"]).unwrap();
        let messages = [spillway::llm::client::Message {
            role: spillway::llm::client::Role::User,
            content: "hello".into(),
        }];
        let (result, _) = provider
            .complete(&spillway::llm::client::ChatRequest {
                model: "m",
                system: None,
                messages: &messages,
                max_tokens: 10,
                temperature: None,
                json: false,
            })
            .await;
        let err = result.unwrap_err();
        assert_eq!(err.code(), "llm_redirect", "llm {status}: {err}");
        // The account's configuration is wrong, not the event: like an auth failure.
        assert_eq!(err.class(), spillway::llm::client::ErrorClass::Fatal);
        assert!(err.to_string().contains(&elsewhere), "{err}");
        assert!(
            target_seen.lock().unwrap().is_empty(),
            "{status}: the redirect's target got {:?}",
            target_seen.lock().unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_id_that_cannot_be_a_header_is_dead_lettered_at_once_and_its_key_moves_on() {
    let (broker, topic, dlq, group) = setup("badid").await;
    let (sink, received) = recording_sink().await;
    let mut bad = Rec::seq("a", 0);
    bad.headers = vec![("ce_id".into(), "evt\r\n1".into())];
    produce_all(&broker.bootstrap(), &topic, [bad, Rec::seq("a", 1)]).await;
    // Retries would take minutes: a transient classification shows up as a missing DLQ record.
    let toml = webhook_config(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        sink,
        "[processor.retry]\nmax_attempts = 20\ninitial_backoff_ms = 10000\nmax_backoff_ms = 10000\n",
    );
    let stop = CancellationToken::new();
    let (_addr, task) = start_configured(&toml, stop.clone()).await;
    let dead = read_topic(&broker.bootstrap(), &dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    assert_eq!(header_str(&dead[0], "dlq.reason"), Some("invalid_event_id"));
    assert_eq!(header_str(&dead[0], "dlq.attempts"), Some("1"));
    assert_eq!(dead[0].offset(), 0);
    wait_until(
        "the key's next event is delivered",
        Duration::from_secs(30),
        || received.len() == 1,
    )
    .await;
    assert_eq!(received.seqs(), [("a".to_string(), 1)]);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_outside_a_step_dead_letters_the_record_and_its_key_and_partition_move_on() {
    let (broker, topic, dlq, group) = setup("panic").await;
    let (sink, received) = recording_sink().await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..3).map(|seq| Rec::seq("a", seq)),
    )
    .await;
    let toml = webhook_config(&broker.bootstrap(), &group, &topic, &dlq, sink, "");
    // The record task panics before the first event's webhook step: outside the step's own
    // guard, as a bug in Spillway would.
    let proc =
        SpillwayProc::spawn_with_env(&toml, &[("SPILLWAY_FAULT", "before_step:webhook:1:panic")]);
    wait_until(
        "the key's later events are delivered",
        Duration::from_secs(60),
        || received.len() == 2,
    )
    .await;
    assert_eq!(
        received.seqs(),
        [("a".to_string(), 1), ("a".to_string(), 2)],
        "in order, after the panicked one"
    );
    let dead = read_topic(&broker.bootstrap(), &dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    assert_eq!(header_str(&dead[0], "dlq.reason"), Some("task_panicked"));
    assert_eq!(dead[0].offset(), 0);
    let message = header_str(&dead[0], "__connect.errors.exception.message").unwrap();
    assert!(
        message.contains("fault point before_step:webhook"),
        "{message}"
    );
    wait_until(
        "the commit passes every record",
        Duration::from_secs(30),
        || committed(&broker.bootstrap(), &group, &topic, 1).get(&0) == Some(&3),
    )
    .await;
    drop(proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_every_record_stops_the_processor_instead_of_dead_lettering_the_backlog() {
    let (broker, topic, dlq, group) = setup("panics").await;
    let (sink, received) = recording_sink().await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..40).map(|i| Rec::seq(&format!("k{i}"), i)),
    )
    .await;
    let toml = webhook_config(&broker.bootstrap(), &group, &topic, &dlq, sink, "");
    let mut proc =
        SpillwayProc::spawn_with_env(&toml, &[("SPILLWAY_FAULT", "before_step:webhook:0:panic")]);
    let status = blocking(|| proc.wait_exit(Duration::from_secs(60)));
    assert!(!status.success(), "exits non-zero: {status}");
    let max = spillway::processor::worker::MAX_CONSECUTIVE_PANICS as i64;
    assert!(
        proc.log_text()
            .contains("records in a row panicked outside a step"),
        "says why it stopped"
    );
    // At most the first MAX - 1 panics dead-lettered their records (the stop may abort some
    // of those writes); the one that reached the bound, and every later one, stay unfinished
    // for redelivery, and the commit passes none of them.
    let dead = records_in(&broker.bootstrap(), &dlq, 1);
    assert!(dead < max, "{dead} dead letters: not the whole backlog");
    let committed = committed(&broker.bootstrap(), &group, &topic, 1)
        .get(&0)
        .copied()
        .unwrap_or(0);
    assert!(
        committed <= dead,
        "committed {committed} with {dead} records finished"
    );
    assert_eq!(received.len(), 0);
}

//! The LLM step alone: a hung request's timeout, repairs of invalid output.

use super::*;

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
    let pipelines =
        spillway::pipeline::build(&config, &Metrics::new(), &Gate::new()).expect("builds");
    pipelines[0].steps[0].clone()
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
        event: std::sync::Arc::new(Event {
            id: "e".into(),
            source: "test".into(),
            event_type: "comment".into(),
            time: None,
            data: json!({ "text": text }).into(),
        }),
        dedup_key: "test|1".into(),
        outputs: Default::default(),
        share: Default::default(),
        pipeline: "default".into(),
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

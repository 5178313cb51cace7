//! `spillway trace` against a processor's real topics: a routed event, a dead-lettered one and
//! a duplicate each show their own story.

use super::routing::routed_toml;
use super::*;

/// A CloudEvents comment: id and source in `ce_*` headers.
fn comment(id: &str, text: &str) -> Rec {
    let mut rec = text_rec(id, text);
    rec.headers = vec![
        ("ce_specversion".into(), "1.0".into()),
        ("ce_id".into(), id.into()),
        ("ce_source".into(), "/blog".into()),
        ("ce_type".into(), "com.example.comment".into()),
    ];
    rec
}

/// `spillway trace <id> --json` on `config`.
fn trace(config: &std::path::Path, id: &str) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["trace", id, "--json", "--config"])
        .arg(config)
        .env_remove("SPILLWAY_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trace {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("trace --json prints JSON")
}

fn step<'a>(story: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    story["runs"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("step {name} in {story}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_tells_the_story_of_a_routed_a_dead_lettered_and_a_duplicated_event() {
    let sim = Sim::start(|c| c.latency_ms = 1).await;
    let (broker, topic, dlq, group) = setup(2).await;
    let (results, journal) = (unique("results"), unique("journal"));
    // One comment of each label: negative ones go to the result topic, positive ones to the
    // webhook, neutral ones match no route and are dead-lettered.
    let find = |label: &str| {
        (0..200)
            .map(|i| format!("{label}-ish comment {i}"))
            .find(|t| label_for(&format!("Comment: {t}")) == label)
            .unwrap()
    };
    let (negative, positive, neutral) = (find("negative"), find("positive"), find("neutral"));
    let (sink, posted) = recording_sink().await;
    let steps = format!(
        r#"
[[steps]]
type = "route"
value = "{{{{ outputs.classify.json.label }}}}"
cases = ["negative", "positive"]

[[steps]]
type = "kafka"
name = "to_results"
route = "negative"
topic = "{results}"
format = "json"

[[steps]]
type = "webhook"
name = "to_webhook"
route = "positive"
url = "http://{sink}/events"

[journal]
topic = "{journal}"

[llm.prices.mock-small]
input_usd_per_mtok = 1.0
output_usd_per_mtok = 2.0
"#
    );
    let toml = routed_toml(&broker, (&topic, &dlq, &group), &sim, &steps).replace(
        "session_timeout_ms",
        "create_topics_partitions = 2\nsession_timeout_ms",
    );
    let state = tempfile::tempdir().unwrap();
    let toml = with_state_dir(&toml, state.path());
    let file = state.path().join("spillway.toml");
    std::fs::write(&file, &toml).unwrap();
    produce_all(
        &broker.bootstrap(),
        &topic,
        [
            comment("c-neg", &negative),
            comment("c-pos", &positive),
            comment("c-neu", &neutral),
            comment("c-pos", &positive), // upstream sent it twice
        ],
    )
    .await;
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until_async(
        "all four records finish",
        Duration::from_secs(60),
        || async { metric_sum(&metrics(addr).await, "spillway_events_total") >= 4.0 },
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(posted.len(), 1, "the duplicate posted once");

    let routed = tokio::task::block_in_place(|| trace(&file, "c-neg"));
    assert_eq!(routed["keys"], json!(["/blog|c-neg"]));
    assert_eq!(routed["deliveries"].as_array().unwrap().len(), 1);
    assert_eq!(routed["deliveries"][0]["pipeline"], "default");
    assert_eq!(routed["runs"].as_array().unwrap().len(), 1);
    assert_eq!(routed["runs"][0]["done"], true);
    let classify = step(&routed, "classify");
    assert_eq!(classify["status"], "done");
    assert_eq!(classify["llm"]["answer"]["label"], "negative");
    assert_eq!(classify["llm"]["model"], "mock-small");
    let tokens = classify["llm"]["input_tokens"].as_u64().unwrap()
        + classify["llm"]["output_tokens"].as_u64().unwrap();
    assert!(tokens > 0, "{classify}");
    assert_eq!(routed["runs"][0]["tokens"].as_u64(), Some(tokens));
    assert!(routed["runs"][0]["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(step(&routed, "route")["route"], "negative");
    assert_eq!(step(&routed, "to_results")["status"], "done");
    assert_eq!(step(&routed, "to_webhook")["status"], "skipped");
    assert_eq!(routed["results"].as_array().unwrap().len(), 1);
    assert_eq!(routed["results"][0]["topic"], results.as_str());
    assert_eq!(routed["dead_letters"], json!([]));
    let verdict = routed["verdict"].as_str().unwrap();
    assert!(verdict.contains("routed to negative"), "{verdict}");

    let dead = tokio::task::block_in_place(|| trace(&file, "/blog|c-neu"));
    assert_eq!(dead["dead_letters"].as_array().unwrap().len(), 1);
    assert_eq!(dead["dead_letters"][0]["reason"], "route_unmatched");
    assert_eq!(dead["dead_letters"][0]["stage"], "step.route");
    assert_eq!(dead["runs"][0]["done"], false);
    assert_eq!(step(&dead, "classify")["llm"]["answer"]["label"], "neutral");
    assert_eq!(step(&dead, "route")["status"], "not_run");
    assert_eq!(dead["results"], json!([]));
    let verdict = dead["verdict"].as_str().unwrap();
    assert!(
        verdict.contains("dead-lettered: route_unmatched"),
        "{verdict}"
    );

    let duplicate = tokio::task::block_in_place(|| trace(&file, "c-pos"));
    assert_eq!(duplicate["deliveries"].as_array().unwrap().len(), 2);
    assert_eq!(duplicate["runs"].as_array().unwrap().len(), 1, "one run");
    assert_eq!(duplicate["runs"][0]["done"], true);
    assert_eq!(step(&duplicate, "route")["route"], "positive");
    assert_eq!(step(&duplicate, "to_webhook")["status"], "done");
    assert_eq!(step(&duplicate, "to_results")["status"], "skipped");
    assert_eq!(duplicate["results"], json!([]));
    let verdict = duplicate["verdict"].as_str().unwrap();
    assert!(
        verdict.contains("delivered 2 times") && verdict.contains("1 duplicate skipped"),
        "{verdict}"
    );

    let unknown = tokio::task::block_in_place(|| trace(&file, "never-sent"));
    assert!(unknown["verdict"]
        .as_str()
        .unwrap()
        .starts_with("not found"));
    // The text a person reads carries the same story.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["trace", "c-neg", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("route") && text.contains("-> negative"),
        "{text}"
    );
    assert!(text.contains(&format!("result {results}/")), "{text}");
}

//! Routing on the LLM's answer, in process against the simulator: a route step sends each label
//! to its destination and an unmatched one to the default or the DLQ; a templated result topic
//! refuses a topic outside its allow-list.

use super::*;

/// The classify step, then `steps`.
pub(super) fn routed_toml(
    broker: &Broker,
    names: (&str, &str, &str),
    sim: &Sim,
    steps: &str,
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
output = {{ format = "json", schema = {SCHEMA} }}

{steps}

{provider}
"#,
            provider = provider("primary", "openai", sim, ""),
        ),
    )
}

/// 60 comments and the label the simulator gives each.
fn comments() -> Vec<(String, &'static str)> {
    (0..60)
        .map(|i| {
            let text = format!("routed comment {i}");
            let label = label_for(&format!("Comment: {text}"));
            (text, label)
        })
        .collect()
}

pub(super) fn texts_of(received: &Received) -> std::collections::BTreeSet<String> {
    received
        .bodies
        .lock()
        .unwrap()
        .iter()
        .map(|b| b["data"]["text"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_sends_each_label_to_its_destination_and_an_unmatched_one_to_the_default_or_the_dlq(
) {
    let events = comments();
    let of = |label: &str| -> std::collections::BTreeSet<String> {
        events
            .iter()
            .filter(|(_, l)| *l == label)
            .map(|(t, _)| t.clone())
            .collect()
    };
    assert!(
        ["negative", "positive", "neutral"]
            .iter()
            .all(|l| !of(l).is_empty()),
        "the comments cover every label"
    );
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    for default in [None, Some("other")] {
        let (broker, topic, dlq, group) = setup(2).await;
        produce_all(
            &broker.bootstrap(),
            &topic,
            events
                .iter()
                .enumerate()
                .map(|(i, (t, _))| text_rec(&format!("k{i}"), t)),
        )
        .await;
        let (negative, to_negative) = recording_sink().await;
        let (positive, to_positive) = recording_sink().await;
        let (other, to_other) = recording_sink().await;
        let mut steps = format!(
            "[[steps]]\ntype = \"route\"\nvalue = '{{{{ outputs.classify.json.label }}}}'\n\
             cases = [\"negative\", \"positive\"]\n{}\n",
            default.map_or(String::new(), |d| format!("default = \"{d}\"")),
        );
        let mut sinks = vec![("negative", negative), ("positive", positive)];
        if let Some(d) = default {
            sinks.push((d, other));
        }
        for (route, addr) in &sinks {
            steps += &format!(
                "[[steps]]\ntype = \"webhook\"\nname = \"to_{route}\"\nroute = \"{route}\"\n\
                 url = \"http://{addr}/events\"\n\n"
            );
        }
        let toml = routed_toml(&broker, (&topic, &dlq, &group), &sim, &steps);
        let stop = CancellationToken::new();
        let (_, task) = start_configured(&toml, stop.clone()).await;
        let neutral = of("neutral");
        let dead = if default.is_none() {
            read_topic(
                &broker.bootstrap(),
                &dlq,
                neutral.len(),
                Duration::from_secs(60),
            )
        } else {
            Vec::new()
        };
        let expected_posts = events.len() - dead.len();
        wait_until(
            "every routed event is posted",
            Duration::from_secs(60),
            || to_negative.len() + to_positive.len() + to_other.len() >= expected_posts,
        )
        .await;
        assert_eq!(texts_of(&to_negative), of("negative"), "{default:?}");
        assert_eq!(texts_of(&to_positive), of("positive"), "{default:?}");
        match default {
            Some(_) => assert_eq!(texts_of(&to_other), neutral, "the default route"),
            None => {
                assert_eq!(to_other.len(), 0);
                assert_eq!(
                    dead.len(),
                    neutral.len(),
                    "every unmatched event dead-lettered"
                );
                for m in &dead {
                    assert_eq!(header_str(m, "dlq.reason"), Some("route_unmatched"));
                    assert_eq!(header_str(m, "__connect.errors.stage"), Some("step.route"));
                }
            }
        }
        stop.cancel();
        task.await.unwrap().unwrap();
        // The processor has stopped: every post it made is in, late repeats included.
        assert_eq!(
            to_negative.len() + to_positive.len() + to_other.len(),
            expected_posts,
            "{default:?}: no event posted twice or to two routes"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_templated_topic_writes_each_label_to_its_topic_and_refuses_one_outside_the_allow_list() {
    let events = comments();
    let (broker, topic, dlq, group) = setup(2).await;
    let prefix = unique("tickets");
    let allowed = [format!("{prefix}.negative"), format!("{prefix}.positive")];
    for t in &allowed {
        create_topic(&broker.bootstrap(), t, 1).await;
    }
    produce_all(
        &broker.bootstrap(),
        &topic,
        events
            .iter()
            .enumerate()
            .map(|(i, (t, _))| text_rec(&format!("k{i}"), t)),
    )
    .await;
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let steps = format!(
        "[[steps]]\ntype = \"kafka\"\nname = \"result\"\nformat = \"json\"\ntransactional = false\n\
         topic = '{prefix}.{{{{ outputs.classify.json.label }}}}'\n\
         topics = [\"{}\", \"{}\"]\n",
        allowed[0], allowed[1]
    );
    let toml = routed_toml(&broker, (&topic, &dlq, &group), &sim, &steps);
    let stop = CancellationToken::new();
    let (_, task) = start_configured(&toml, stop.clone()).await;
    let count = |label: &str| events.iter().filter(|(_, l)| *l == label).count();
    let dead = read_topic(
        &broker.bootstrap(),
        &dlq,
        count("neutral"),
        Duration::from_secs(60),
    );
    assert_eq!(dead.len(), count("neutral"));
    for m in &dead {
        assert_eq!(header_str(m, "dlq.reason"), Some("kafka_topic_not_allowed"));
    }
    for (label, t) in [("negative", &allowed[0]), ("positive", &allowed[1])] {
        let records = read_topic(
            &broker.bootstrap(),
            t,
            count(label),
            Duration::from_secs(60),
        );
        assert_eq!(records.len(), count(label), "{t}");
        for r in &records {
            let body: serde_json::Value = serde_json::from_slice(r.payload().unwrap()).unwrap();
            assert_eq!(label_of(&body), label, "{t} holds only {label} results");
        }
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    // Stopped: nothing more can arrive, and nothing extra did (the sink is not transactional,
    // so the log end is the record count).
    for (label, t) in [("negative", &allowed[0]), ("positive", &allowed[1])] {
        assert_eq!(
            records_in(&broker.bootstrap(), t, 1),
            count(label) as i64,
            "{t}: one result per {label} event"
        );
    }
}

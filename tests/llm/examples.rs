//! The worked examples in `config/examples/` pass `processor --check`, and each runs end to end
//! against the simulator and a real broker: every event lands where its LLM answer sends it.

use super::*;

const EXAMPLES: [&str; 3] = ["ticket-routing", "moderation", "lead-scoring"];

fn example(name: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/config/examples/{name}.toml")).unwrap()
}

#[test]
fn every_example_and_the_main_config_pass_processor_check() {
    let mut paths: Vec<String> = EXAMPLES
        .iter()
        .map(|n| format!("{ROOT}/config/examples/{n}.toml"))
        .collect();
    paths.push(format!("{ROOT}/config/example.toml"));
    // Several pipelines in one processor (run end to end by `pipelines.rs`).
    paths.push(format!("{ROOT}/config/examples/support-desk.toml"));
    for path in paths {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
            .args(["processor", "--config", &path, "--check"])
            .env_remove("SPILLWAY_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
    }
}

/// An example on the test broker and simulator: its own topics prefixed with `prefix`, the
/// webhook receiver at `sink`, its state in a directory of its own.
fn localised(name: &str, broker: &Broker, sim: &Sim, sink: SocketAddr, prefix: &str) -> String {
    let text = example(name)
        .replace("127.0.0.1:9092", &broker.bootstrap())
        .replace("http://127.0.0.1:8089", &sim.base)
        .replace("http://127.0.0.1:8090", &format!("http://{sink}"))
        .replace("127.0.0.1:9464", "127.0.0.1:0");
    // Every topic and group name of the example, prefixed, so reruns on one broker never meet.
    let mut out = text;
    for stem in [
        "tickets.",
        "comments.",
        "leads.",
        "ticket-routing",
        "moderation",
        "lead-scoring",
    ] {
        out = out
            .replace(&format!("\"{stem}"), &format!("\"{prefix}{stem}"))
            .replace(&format!("'{stem}"), &format!("'{prefix}{stem}"));
    }
    // Its journal state in a directory of the test's own (start_configured adds one).
    out.lines()
        .filter(|l| !l.starts_with("state_dir"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `n` texts and the label the simulator gives each under the example's prompt.
fn texts(prompt: &str, n: usize) -> Vec<(String, &'static str)> {
    (0..n)
        .map(|i| {
            let text = format!("example text {i}");
            let label = label_for(&format!("{prompt}{text}"));
            (text, label)
        })
        .collect()
}

fn results(broker: &Broker, topic: &str, count: usize) -> Vec<serde_json::Value> {
    read_topic(&broker.bootstrap(), topic, count, Duration::from_secs(60))
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect()
}

fn text_of(v: &serde_json::Value) -> String {
    v["event"]["data"]["text"]
        .as_str()
        .or(v["data"]["text"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_example_sends_every_event_where_its_llm_answer_says() {
    let broker = Broker::start();
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    for name in EXAMPLES {
        let prefix = format!("{}-", unique("ex"));
        let (sink, received) = recording_sink().await;
        let toml = localised(name, &broker, &sim, sink, &prefix);
        let config = Config::from_toml(&toml).unwrap_or_else(|e| panic!("{name}: {e}"));
        let input = config.kafka.topics[0].clone();
        let (prompt, n) = match name {
            "ticket-routing" => ("Ticket: ", 30),
            "moderation" => ("Comment to moderate: ", 30),
            _ => ("Lead: ", 30),
        };
        let events = texts(prompt, n);
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
            "{name}: the texts cover every label"
        );
        let stop = CancellationToken::new();
        let (_, task) = start_configured(&toml, stop.clone()).await;
        produce_all(
            &broker.bootstrap(),
            &input,
            events
                .iter()
                .enumerate()
                .map(|(i, (t, _))| text_rec(&format!("k{i}"), t)),
        )
        .await;
        let set = |values: Vec<serde_json::Value>| -> std::collections::BTreeSet<String> {
            values.iter().map(text_of).collect()
        };
        let p = |t: &str| format!("{prefix}{t}");
        match name {
            "ticket-routing" => {
                for (label, topic) in [
                    ("negative", "tickets.escalations"),
                    ("positive", "tickets.feedback"),
                    ("neutral", "tickets.general"),
                ] {
                    let got = set(results(&broker, &p(topic), of(label).len()));
                    assert_eq!(got, of(label), "{name}: {topic}");
                }
            }
            "moderation" => {
                let held = set(results(&broker, &p("comments.held"), of("negative").len()));
                assert_eq!(held, of("negative"), "{name}: held for review");
                let published: std::collections::BTreeSet<String> =
                    of("positive").union(&of("neutral")).cloned().collect();
                wait_until("published", Duration::from_secs(60), || {
                    received.len() >= published.len()
                })
                .await;
                let posted: std::collections::BTreeSet<String> = received
                    .bodies
                    .lock()
                    .unwrap()
                    .iter()
                    .map(text_of)
                    .collect();
                assert_eq!(posted, published, "{name}: published, never a flagged one");
            }
            _ => {
                let scored = set(results(&broker, &p("leads.scored"), n));
                assert_eq!(scored.len(), n, "{name}: every lead scored");
                wait_until("hot leads alerted", Duration::from_secs(60), || {
                    received.len() >= of("positive").len()
                })
                .await;
                let alerted: std::collections::BTreeSet<String> = received
                    .bodies
                    .lock()
                    .unwrap()
                    .iter()
                    .map(text_of)
                    .collect();
                assert_eq!(
                    alerted,
                    of("positive"),
                    "{name}: only leads scoring 80 and up"
                );
            }
        }
        stop.cancel();
        task.await.unwrap().unwrap();
        // Stopped: every post it made is in, late ones included.
        let expected_posts = match name {
            "moderation" => of("positive").len() + of("neutral").len(),
            "lead-scoring" => of("positive").len(),
            _ => 0,
        };
        assert_eq!(received.len(), expected_posts, "{name}: posts");
        assert_eq!(duplicates(&received), 0, "{name}: nothing posted twice");
    }
}

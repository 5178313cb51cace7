//! Several pipelines in one processor, against the simulator: each takes its own events and
//! keeps its own steps, journal entries and TTLs, while an LLM account they share keeps one
//! admission; an event no pipeline takes is dead-lettered or skipped, as configured.

use super::*;

/// A pipeline `name` taking `topics`/`types`: classify with account `primary`, then post to
/// `sink`; `journal` is its `[pipelines.journal]` table, if any.
fn pipeline(name: &str, takes: &str, journal: &str, sink: SocketAddr) -> String {
    format!(
        r#"
[[pipelines]]
name = "{name}"
{takes}
{journal}

[[pipelines.steps]]
type = "llm"
name = "classify"
provider = "primary"
model = "mock-small"
user = "{name}: {{{{ data.text }}}}. Answer with JSON."
max_tokens = 64
output = {{ format = "json", schema = {SCHEMA} }}

[[pipelines.steps]]
type = "webhook"
name = "post"
url = "http://{sink}/events"
"#
    )
}

fn texts(received: &Received) -> Vec<String> {
    let mut texts = received.texts();
    texts.sort();
    texts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipelines_in_one_processor_keep_their_own_steps_and_ttls_and_share_one_accounts_admission(
) {
    let (broker, comments, dlq, group) = setup(2).await;
    let tickets = unique("tickets");
    create_topic(&broker.bootstrap(), &tickets, 2).await;
    let journal = unique("journal");
    // The account admits 10 requests a second; the provider takes 11. One admission for both
    // pipelines never meets a 429; one per pipeline would send 20 a second.
    let sim = Sim::start(|c| {
        c.rpm = 660;
        c.burst_ms = 1_000;
        c.latency_ms = 5;
    })
    .await;
    let (to_comments, comment_posts) = recording_sink().await;
    let (to_tickets, ticket_posts) = recording_sink().await;
    let toml = config_toml(
        &broker.bootstrap(),
        &group,
        &comments,
        &dlq,
        &format!(
            "[journal]\ntopic = \"{journal}\"\nttl_secs = 3600\n{}{}{}",
            pipeline(
                "comments",
                &format!("topics = [\"{comments}\"]"),
                "[pipelines.journal]\nttl_secs = 2",
                to_comments
            ),
            pipeline(
                "tickets",
                &format!("topics = [\"{tickets}\"]"),
                "",
                to_tickets
            ),
            provider(
                "primary",
                "openai",
                &sim,
                "requests_per_minute = 600\nburst_ms = 1000"
            ),
        ),
    )
    .replace(
        &format!("topics = [\"{comments}\"]\nsession"),
        &format!("topics = [\"{comments}\", \"{tickets}\"]\ncreate_topics_partitions = 2\nsession"),
    );
    // Both topics carry events with the same ids and source, so the same dedup keys.
    let batch = |range: std::ops::Range<usize>, kind: &str| -> Vec<Rec> {
        range
            .map(|i| {
                cloud_event(
                    &format!("evt-{i}"),
                    "/app",
                    &format!("com.example.{kind}"),
                    &format!("{kind} {i}"),
                )
            })
            .collect()
    };
    produce_all(&broker.bootstrap(), &comments, batch(0..30, "comment")).await;
    produce_all(&broker.bootstrap(), &tickets, batch(0..30, "ticket")).await;
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until(
        "both pipelines post every event",
        Duration::from_secs(60),
        || comment_posts.len() >= 30 && ticket_posts.len() >= 30,
    )
    .await;
    let expected = |kind: &str, n: usize| -> Vec<String> {
        let mut t: Vec<String> = (0..n).map(|i| format!("{kind} {i}")).collect();
        t.sort();
        t
    };
    assert_eq!(texts(&comment_posts), expected("comment", 30));
    assert_eq!(texts(&ticket_posts), expected("ticket", 30));
    for (posts, name) in [(&comment_posts, "comments"), (&ticket_posts, "tickets")] {
        for body in posts.bodies.lock().unwrap().iter() {
            assert!(
                body["outputs"]["classify"]["json"]["label"].is_string(),
                "{name}: its own classify step ran: {body}"
            );
        }
    }
    let s = sim.stats().await;
    assert_eq!(s.completed, 60, "one call per event per pipeline");
    assert_eq!(
        s.rate_limited, 0,
        "the pipelines share the account's admission: it never exceeded the provider's rate"
    );

    // The comments' entries expire after 2 s, the tickets' after an hour: a second copy of
    // each event after the sweep runs again in `comments` and is a duplicate in `tickets`.
    wait_until_async(
        "the comments' entries expire",
        Duration::from_secs(30),
        || async {
            metric_sum(
                &metrics(addr).await,
                "spillway_journal_expired_entries_total",
            ) >= 30.0
        },
    )
    .await;
    produce_all(&broker.bootstrap(), &comments, batch(0..5, "comment")).await;
    produce_all(&broker.bootstrap(), &tickets, batch(0..5, "ticket")).await;
    wait_until_async(
        "the copies finish in both pipelines",
        Duration::from_secs(60),
        || async {
            let m = metrics(addr).await;
            metric_sum(&m, "spillway_duplicates_total{pipeline=\"tickets\"") >= 5.0
                && comment_posts.len() >= 35
        },
    )
    .await;
    // `spillway status` gives each pipeline's figures.
    let config = Config::from_toml(&toml).unwrap();
    let url = format!("http://{addr}/metrics");
    let status = tokio::task::block_in_place(|| {
        spillway::cli::status::gather(&config, Some(&url)).expect("status")
    });
    let figures: Vec<(String, Vec<String>, f64, f64)> = (status.pipelines.iter())
        .map(|p| {
            let e = p.events.clone().expect("figures from /metrics");
            (p.name.clone(), p.topics.clone(), e.succeeded, e.duplicates)
        })
        .collect();
    assert_eq!(
        figures,
        [
            ("comments".to_string(), vec![comments.clone()], 35.0, 0.0),
            ("tickets".to_string(), vec![tickets.clone()], 30.0, 5.0),
        ]
    );
    // Each pipeline's effects carry its own key, so a receiver both post to would keep both.
    let keys = |r: &Received| r.idempotency_keys.lock().unwrap().clone();
    let (comment_keys, ticket_keys) = (keys(&comment_posts), keys(&ticket_posts));
    assert!(
        comment_keys
            .iter()
            .all(|k| k.starts_with("comments//app|evt-"))
            && ticket_keys
                .iter()
                .all(|k| k.starts_with("tickets//app|evt-")),
        "{comment_keys:?} {ticket_keys:?}"
    );
    // And `spillway trace` tells one event's two runs apart.
    let story = tokio::task::block_in_place(|| {
        spillway::cli::trace::trace(&config, "evt-7").expect("trace")
    });
    assert_eq!(story.keys, ["comments//app|evt-7", "tickets//app|evt-7"]);
    let runs: Vec<(&str, bool)> = (story.runs.iter())
        .map(|r| (r.pipeline.as_str(), r.done))
        .collect();
    assert_eq!(runs, [("comments", true), ("tickets", true)]);
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(
        comment_posts.len(),
        35,
        "expired comments ran again, once each"
    );
    assert_eq!(
        ticket_posts.len(),
        30,
        "the tickets' copies were duplicates"
    );
    assert_eq!(sim.stats().await.completed, 65);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_no_pipeline_takes_is_dead_lettered_or_skipped_as_configured() {
    for unmatched in ["dead_letter", "skip"] {
        let (broker, topic, dlq, group) = setup(1).await;
        let sim = Sim::start(|c| c.latency_ms = 1).await;
        let (sink, posts) = recording_sink().await;
        let toml = config_toml(
            &broker.bootstrap(),
            &group,
            &topic,
            &dlq,
            &format!(
                "[processor]\nunmatched = \"{unmatched}\"\n{}{}",
                pipeline("comments", "types = [\"com.example.comment\"]", "", sink),
                provider("primary", "openai", &sim, ""),
            ),
        );
        let recs: Vec<Rec> = (0..20)
            .map(|i| {
                let kind = if i % 4 == 0 { "presence" } else { "comment" };
                cloud_event(
                    &format!("e{i}"),
                    "/app",
                    &format!("com.example.{kind}"),
                    &format!("{i}"),
                )
            })
            .collect();
        produce_all(&broker.bootstrap(), &topic, recs).await;
        let stop = CancellationToken::new();
        let (addr, task) = start_configured(&toml, stop.clone()).await;
        wait_until(
            "the group commits past every record",
            Duration::from_secs(60),
            || committed(&broker.bootstrap(), &group, &topic, 1).get(&0) == Some(&20),
        )
        .await;
        let m = metrics(addr).await;
        stop.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(posts.len(), 15, "{unmatched}: every comment posted once");
        assert_eq!(
            metric_sum(&m, "spillway_unmatched_events_total"),
            5.0,
            "{unmatched}: each presence event counted"
        );
        let dead = read_to_eof(&broker.bootstrap(), &dlq, 1, "read_committed");
        match unmatched {
            "dead_letter" => {
                assert_eq!(dead.len(), 5);
                for m in &dead {
                    assert_eq!(header_str(m, "dlq.reason"), Some("no_pipeline"));
                    assert_eq!(header_str(m, "ce_type"), Some("com.example.presence"));
                }
            }
            _ => assert_eq!(dead.len(), 0, "skipped, not dead-lettered"),
        }
        assert_eq!(
            metric_sum(
                &m,
                "spillway_events_total{outcome=\"skipped\",pipeline=\"none\""
            ),
            if unmatched == "skip" { 5.0 } else { 0.0 }
        );
    }
}

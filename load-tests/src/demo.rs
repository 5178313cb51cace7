//! `demo`: the two ends of the README's local walk-through.
//!
//! * `demo sink --addr 127.0.0.1:8090`: a webhook receiver that accepts `POST /events`,
//!   counts events and distinct ids, and prints the counts once a second.
//! * `demo produce --brokers .. --topic .. --count N --keys K`: N JSON events with per-key
//!   sequence numbers and CloudEvents headers.
//! * `demo send --url http://127.0.0.1:8088/webhooks/blog --secret whsec_.. --count N`:
//!   N blog-comment webhooks signed with Standard Webhooks, sent the way a well-behaved
//!   sender does (retrying 429 and 503 after `Retry-After`), then every tenth one again to
//!   show that replays are answered 2xx without producing a second record.
//! * `demo results --brokers .. --topic ..`: reads a result topic to its end as a
//!   `read_committed` consumer (what the transactional Kafka sink promises its readers) and
//!   prints how many results and distinct dedup keys it holds.
//! * `demo summary ..`: the run's verdict in a few lines: events sent and finished, where the
//!   routes sent them (the receiver's posts by label, the result topic's committed records),
//!   dead letters, lost and duplicated events, and the provider's view (calls, 429s, tokens).
//!   Exits 1 if any event was lost, duplicated or delivered to two destinations.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Receive webhook POSTs and count them.
    Sink {
        #[arg(long, default_value = "127.0.0.1:8090")]
        addr: String,
    },
    /// Produce demo events.
    Produce {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 1000)]
        count: u64,
        #[arg(long, default_value_t = 100)]
        keys: u64,
    },
    /// Send signed Standard Webhooks deliveries to an ingress source.
    Send {
        #[arg(long)]
        url: String,
        /// The source's secret, `whsec_<base64>`.
        #[arg(long)]
        secret: String,
        #[arg(long, default_value_t = 200)]
        count: u64,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Count a result topic's committed records and distinct keys.
    Results {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
    },
    /// Print the run's verdict: sent, finished, routed where, lost, duplicated.
    Summary {
        /// Events sent (webhooks plus produced events).
        #[arg(long)]
        expected: u64,
        #[arg(long)]
        brokers: String,
        /// The result topic.
        #[arg(long)]
        results: String,
        /// The DLQ topic.
        #[arg(long)]
        dlq: String,
        /// The processor's /metrics URL.
        #[arg(long)]
        metrics: String,
        /// The simulator's base URL.
        #[arg(long)]
        simulator: String,
        /// The receiver's base URL (`demo sink`).
        #[arg(long)]
        receiver: String,
    },
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Cmd::Sink { addr } => sink(&addr).await,
        Cmd::Produce {
            brokers,
            topic,
            count,
            keys,
        } => produce(&brokers, &topic, count, keys).await,
        Cmd::Send {
            url,
            secret,
            count,
            concurrency,
        } => send(&url, &secret, count, concurrency).await,
        Cmd::Results { brokers, topic } => results(&brokers, &topic),
        Cmd::Summary {
            expected,
            brokers,
            results,
            dlq,
            metrics,
            simulator,
            receiver,
        } => {
            let s = Sources {
                brokers,
                results,
                dlq,
                metrics,
                simulator,
                receiver,
            };
            if !summary(expected, &s).await {
                std::process::exit(1);
            }
        }
    }
}

/// Where `demo summary` reads the run's figures.
struct Sources {
    brokers: String,
    results: String,
    dlq: String,
    metrics: String,
    simulator: String,
    receiver: String,
}

/// Sum of a metric's series whose labels include `label` (`name="value"`), or all of them.
fn metric(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.split([' ', '{']).next() == Some(name))
        .filter(|l| label.is_none_or(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0 // An empty sum is -0.0.
}

/// Prints the verdict; false if an event was lost, duplicated or sent to two destinations.
async fn summary(expected: u64, s: &Sources) -> bool {
    let get = |url: String| async move {
        reqwest::get(&url)
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("{url}: {e}"))
    };
    let m = get(s.metrics.clone()).await.text().await.expect("metrics");
    let stats: serde_json::Value = get(format!("{}/stats", s.simulator))
        .await
        .json()
        .await
        .expect("simulator stats");
    let received: serde_json::Value = get(format!("{}/counts", s.receiver))
        .await
        .json()
        .await
        .expect("receiver counts");
    let (brokers, topics) = (s.brokers.clone(), [s.results.clone(), s.dlq.clone()]);
    let [results, dead] =
        tokio::task::spawn_blocking(move || topics.map(|t| read_keys(&brokers, &t)))
            .await
            .expect("reader");
    // Ids: the receiver sees the event id, a result record is keyed `<source>|<id>`.
    let posted: Vec<String> = (received["ids"].as_array().into_iter().flatten())
        .filter_map(|i| i.as_str().map(str::to_string))
        .collect();
    let result_ids: Vec<String> = (results.keys.iter())
        .map(|k| {
            let k = String::from_utf8_lossy(k);
            k.split_once('|')
                .map_or(k.to_string(), |(_, id)| id.to_string())
        })
        .collect();
    let distinct = |ids: &[String]| ids.iter().collect::<HashSet<_>>().len();
    let (posts, webhook_ids) = (received["posts"].as_u64().unwrap_or(0), distinct(&posted));
    let result_keys = distinct(&result_ids);
    let both = (posted.iter().collect::<HashSet<_>>())
        .intersection(&result_ids.iter().collect::<HashSet<_>>())
        .count();
    let reached = webhook_ids + result_keys - both + dead.records as usize;
    let lost = (expected as usize).saturating_sub(reached);
    let duplicated = (posts as usize - webhook_ids) + (results.records as usize - result_keys);
    let outcome = |o: &str| {
        metric(
            &m,
            "spillway_events_total",
            Some(&format!("outcome=\"{o}\"")),
        )
    };
    println!("sent       {expected} events");
    println!(
        "finished   {} succeeded, {} dead-lettered, {} skipped ({} duplicates)",
        outcome("succeeded"),
        outcome("dead_lettered"),
        outcome("skipped"),
        metric(&m, "spillway_duplicates_total", None)
    );
    println!(
        "routed     negative -> webhook receiver: {posts} posts, {webhook_ids} distinct events, labels {}",
        received["labels"]
    );
    println!(
        "           other    -> {}: {} committed results, {result_keys} distinct events",
        s.results, results.records
    );
    println!("dlq        {}: {} records", s.dlq, dead.records);
    println!(
        "provider   {} calls, {} answered 429, {} input / {} output tokens",
        stats["received"], stats["rate_limited"], stats["input_tokens"], stats["output_tokens"]
    );
    println!(
        "verdict    lost {lost}, duplicated {duplicated}, at two destinations {both}{}",
        if results.reached_end && dead.reached_end {
            ""
        } else {
            " (a topic's end was not reached within 60 s)"
        }
    );
    lost == 0 && duplicated == 0 && both == 0
}

/// What `read_keys` found in a topic.
struct Read {
    records: u64,
    keys: Vec<Vec<u8>>,
    reached_end: bool,
}

/// Reads every partition of `topic` to its end with `isolation.level=read_committed`.
fn results(brokers: &str, topic: &str) {
    let read = read_keys(brokers, topic);
    let keys: HashSet<&Vec<u8>> = read.keys.iter().collect();
    println!(
        "{} committed results in {topic} (read_committed), {} distinct dedup keys{}",
        read.records,
        keys.len(),
        if read.reached_end {
            ""
        } else {
            "; the end was not reached within 60 s"
        }
    );
}

/// Every record's key in `topic`, read to the end of each partition (60 s at most).
fn read_keys(brokers: &str, topic: &str) -> Read {
    use rdkafka::Message;
    let (mut records, mut keys) = (0u64, Vec::new());
    let reached_end =
        spillway_load_tests::read_committed_to_end(brokers, topic, Duration::from_secs(60), |m| {
            records += 1;
            keys.push(m.key().map(<[u8]>::to_vec).unwrap_or_default());
        });
    Read {
        records,
        keys,
        reached_end,
    }
}

#[derive(Default)]
struct Counts {
    posts: u64,
    ids: HashSet<String>,
    labels: std::collections::BTreeMap<String, u64>,
}

async fn sink(addr: &str) {
    use axum::routing::post;
    let counts = Arc::new(Mutex::new(Counts::default()));
    let c = counts.clone();
    let shown = counts.clone();
    let app = axum::Router::new()
        .route(
            "/counts",
            axum::routing::get(move || {
                let c = shown.clone();
                async move {
                    {
                        let c = c.lock().unwrap();
                        axum::Json(serde_json::json!({
                            "posts": c.posts,
                            "ids": c.ids,
                            "labels": c.labels,
                        }))
                    }
                }
            }),
        )
        .route(
            "/events",
            post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let c = c.clone();
                async move {
                    let mut c = c.lock().unwrap();
                    c.posts += 1;
                    if let Some(id) = body["id"].as_str() {
                        c.ids.insert(id.to_string());
                    }
                    // The LLM step's classification, when the pipeline has one.
                    if let Some(label) = body["outputs"]["classify"]["json"]["label"].as_str() {
                        *c.labels.entry(label.to_string()).or_default() += 1;
                    }
                    "ok"
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind sink");
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let c = c.lock().unwrap();
            println!(
                "{} posts, {} distinct event ids, labels {:?}",
                c.posts,
                c.ids.len(),
                c.labels
            );
        }
    });
    axum::serve(listener, app).await.expect("serve");
}

async fn produce(brokers: &str, topic: &str, count: u64, keys: u64) {
    spillway_load_tests::produce_events(
        brokers,
        topic,
        &spillway_load_tests::Events {
            count,
            keys,
            key_prefix: "customer-",
            id_prefix: "demo:",
            source: "/demo",
            text_prefix: "demo comment ",
        },
    )
    .await;
    println!("produced {count} events to {topic}");
}

/// One signed delivery, retried like a real sender would: after `Retry-After` on 429 and
/// 503, a bounded number of times. Returns the final status.
async fn deliver(
    client: &reqwest::Client,
    url: &str,
    secret: &spillway::ingress::auth::Secret,
    i: u64,
) -> u16 {
    let id = format!("msg_demo_{i}");
    let body = format!(
        r#"{{"post":"/blog/post-{}","author":"reader-{}","text":"demo comment {i}"}}"#,
        i % 20,
        i % 97
    );
    spillway_load_tests::deliver_signed(client, url, secret, &id, &body).await
}

async fn send(url: &str, secret: &str, count: u64, concurrency: usize) {
    use spillway::ingress::auth::{Scheme, Secret};
    let secret = Arc::new(Secret::new(&Scheme::StandardWebhooks, secret).expect("secret"));
    let client = reqwest::Client::new();
    let statuses = Arc::new(Mutex::new(std::collections::BTreeMap::<u16, u64>::new()));
    let started = std::time::Instant::now();
    // First every delivery once, then every tenth again: the ingress's replay cache answers
    // those 2xx and produces nothing.
    let order: Vec<u64> = (0..count).chain((0..count).step_by(10)).collect();
    let queue = Arc::new(Mutex::new(order.into_iter()));
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (client, secret, url) = (client.clone(), secret.clone(), url.to_string());
            let (queue, statuses) = (queue.clone(), statuses.clone());
            tokio::spawn(async move {
                loop {
                    let next = queue.lock().unwrap().next();
                    let Some(i) = next else { return };
                    let status = deliver(&client, &url, &secret, i).await;
                    *statuses.lock().unwrap().entry(status).or_default() += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("sender task");
    }
    println!(
        "sent {count} signed webhooks and {} replays in {:.1} s; statuses {:?}",
        count.div_ceil(10),
        started.elapsed().as_secs_f64(),
        statuses.lock().unwrap()
    );
}

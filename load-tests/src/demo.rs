//! `demo`: the two ends of the README's local walk-through.
//!
//! * `demo sink --addr 127.0.0.1:8090`: a webhook receiver that accepts `POST /events`,
//!   counts events and distinct ids, and prints the counts once a second.
//! * `demo produce --brokers .. --topic .. --count N --keys K`: N JSON events with per-key
//!   sequence numbers and CloudEvents headers.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

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
    let app = axum::Router::new().route(
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
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    for i in 0..count {
        let key = format!("customer-{}", i % keys);
        let value = format!(
            r#"{{"key":"{key}","seq":{},"text":"demo comment {i}"}}"#,
            i / keys
        );
        let id = format!("demo:{i}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "ce_source",
                value: Some("/demo"),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("com.example.comment"),
            })
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            });
        let f = p
            .send_result(
                FutureRecord::to(topic)
                    .key(&key)
                    .payload(&value)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .expect("enqueue");
        pending.push(f);
    }
    for f in pending {
        f.await.expect("future").expect("delivered");
    }
    p.flush(Timeout::After(Duration::from_secs(30)))
        .expect("flush");
    println!("produced {count} events to {topic}");
}

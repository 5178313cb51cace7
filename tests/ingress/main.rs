//! The ingress service against Apache Kafka or rdkafka's MockCluster,
//! and a real Confluent-compatible schema registry (rivven-schema): one test per ingress
//! scenario of `../shared/conventions.md`, each named after the behaviour it proves.

#[path = "../common/mod.rs"]
mod common;
mod lifecycle;
mod limits;
mod outages;
mod signatures;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use hmac::{KeyInit, Mac};
use rdkafka::message::Message;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use spillway::codec::header_str;
use spillway::ingress::config::IngressConfig;
use spillway::ingress::{Ingress, IngressError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const WHSEC_NEW: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WHSEC_OLD: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const GITHUB_SECRET: &str = "gh-test-secret";
const STRIPE_SECRET: &str = "whsec_stripe_test_secret";
const SLACK_SECRET: &str = "slack-signing-secret";
const SHOP_SECRET: &str = "shop-secret";

// ---------------------------------------------------------------------------------------
// Signing, as each sender does it.

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn headers(pairs: &[(&str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn sw_key(secret: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap()
}

/// Standard Webhooks headers for `body`, signed with `secret` at `ts`.
fn standard(id: &str, ts: i64, body: &[u8], secret: &str) -> HeaderMap {
    let ts = ts.to_string();
    let sig = mac(
        &sw_key(secret),
        &[id.as_bytes(), b".", ts.as_bytes(), b".", body],
    );
    headers(&[
        ("webhook-id", id.into()),
        ("webhook-timestamp", ts),
        ("webhook-signature", format!("v1,{}", b64(&sig))),
    ])
}

fn github(delivery: &str, body: &[u8]) -> HeaderMap {
    let sig = hex::encode(mac(GITHUB_SECRET.as_bytes(), &[body]));
    headers(&[
        ("x-github-delivery", delivery.into()),
        ("x-github-event", "issue_comment".into()),
        ("x-hub-signature-256", format!("sha256={sig}")),
    ])
}

fn stripe(ts: i64, body: &[u8]) -> HeaderMap {
    let t = ts.to_string();
    let sig = hex::encode(mac(STRIPE_SECRET.as_bytes(), &[t.as_bytes(), b".", body]));
    headers(&[("stripe-signature", format!("t={t},v1={sig}"))])
}

fn slack(ts: i64, body: &[u8]) -> HeaderMap {
    let t = ts.to_string();
    let sig = hex::encode(mac(
        SLACK_SECRET.as_bytes(),
        &[b"v0:", t.as_bytes(), b":", body],
    ));
    headers(&[
        ("x-slack-request-timestamp", t),
        ("x-slack-signature", format!("v0={sig}")),
    ])
}

fn shop(delivery: &str, body: &[u8]) -> HeaderMap {
    let sig = hex::encode(mac(SHOP_SECRET.as_bytes(), &[body]));
    headers(&[
        ("x-shop-delivery", delivery.into()),
        ("x-shop-topic", "orders/create".into()),
        ("x-shop-signature", format!("sha256={sig}")),
    ])
}

fn comment(id: &str) -> Vec<u8> {
    serde_json::to_vec(
        &serde_json::json!({"id": id, "post": "hello-world", "text": format!("comment {id}")}),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// The service under test.

fn sources_toml(topic: &str, other_topic: &str, extra: &str) -> String {
    format!(
        r#"
[sources.blog]
scheme = "standard-webhooks"
secrets = ["{WHSEC_NEW}", "{WHSEC_OLD}"]
max_body_bytes = 65536
event_type = "com.example.blog.comment"
subject = {{ json = "/post" }}
topic = "{topic}"
{extra}

[sources.github]
scheme = "github"
secrets = ["{GITHUB_SECRET}"]
rate = "5/min"
event_type = {{ header = "x-github-event" }}
topic = "{other_topic}"

[sources.stripe]
scheme = "stripe"
secrets = ["{STRIPE_SECRET}"]
event_type = {{ json = "/type" }}
topic = "{topic}"

[sources.slack]
scheme = "slack"
secrets = ["{SLACK_SECRET}"]
event_type = {{ json = "/event/type" }}
topic = "{topic}"

[sources.shop]
scheme = "hmac"
signature_header = "X-Shop-Signature"
signature_prefix = "sha256="
secrets = ["{SHOP_SECRET}"]
delivery_id = {{ header = "X-Shop-Delivery" }}
event_type = {{ header = "X-Shop-Topic" }}
topic = "{topic}"
"#
    )
}

struct Setup {
    bootstrap: String,
    registry: String,
    topic: String,
    other_topic: String,
}

fn ingress_toml(s: &Setup, server: &str, kafka: &str, blog_extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{server}

[kafka]
brokers = "{bootstrap}"
message_timeout_ms = 3000
{kafka}

[registry]
url = "{registry}"
timeout_ms = 1000

[telemetry]
metrics_addr = "127.0.0.1:0"
{sources}
"#,
        bootstrap = s.bootstrap,
        registry = s.registry,
        sources = sources_toml(&s.topic, &s.other_topic, blog_extra),
    )
}

struct Running {
    addr: SocketAddr,
    metrics: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), IngressError>>,
}

impl Running {
    fn url(&self, source: &str) -> String {
        format!("http://{}/webhooks/{source}", self.addr)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn start(toml: &str) -> Running {
    let config = IngressConfig::from_toml(toml).expect("test config is valid");
    let stop = CancellationToken::new();
    let ingress = Ingress::start(config, stop.clone())
        .await
        .expect("ingress starts");
    let (addr, metrics) = (ingress.addr(), ingress.metrics_addr());
    let task = tokio::spawn(ingress.run());
    wait_for_readiness(metrics, true, "ingress is ready", Duration::from_secs(30)).await;
    Running {
        addr,
        metrics,
        stop,
        task,
    }
}

/// Waits until `/readyz` on `metrics` answers 2xx (`ready`) or 503 (not ready).
async fn wait_for_readiness(metrics: SocketAddr, ready: bool, what: &str, timeout: Duration) {
    let url = format!("http://{metrics}/readyz");
    wait_until_async(what, timeout, || {
        let url = url.clone();
        async move {
            reqwest::get(&url).await.is_ok_and(|r| {
                if ready {
                    r.status().is_success()
                } else {
                    r.status().as_u16() == 503
                }
            })
        }
    })
    .await;
}

/// Waits until the series `series` on `metrics` reads `value`.
async fn wait_for_metric(metrics: SocketAddr, series: &str, value: f64, what: &str) {
    wait_until_async(what, Duration::from_secs(10), || async move {
        metric_value(&scrape(metrics).await, series) == Some(value)
    })
    .await;
}

/// The shared Apache Kafka broker, a registry and two topics.
async fn kafka_setup(partitions: i32) -> (Broker, Registry, Setup) {
    let broker = Broker::start();
    let registry = Registry::start();
    let (topic, other_topic) = (unique("webhooks"), unique("webhooks-gh"));
    create_topic(&broker.bootstrap(), &topic, partitions).await;
    create_topic(&broker.bootstrap(), &other_topic, 1).await;
    let setup = Setup {
        bootstrap: broker.bootstrap(),
        registry: registry.url(),
        topic,
        other_topic,
    };
    (broker, registry, setup)
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    h: HeaderMap,
    body: Vec<u8>,
) -> (u16, serde_json::Value, Option<String>) {
    let r = client
        .post(url)
        .headers(h)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let json = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, json, retry_after)
}

/// The identity of an event whose sender does not sign its delivery id.
fn signed_id(source: &str, body: &[u8]) -> String {
    use sha2::Digest;
    format!(
        "{source}:sha256:{}",
        hex::encode(sha2::Sha256::digest(body))
    )
}

fn ids(records: &[rdkafka::message::OwnedMessage]) -> Vec<String> {
    records
        .iter()
        .map(|m| header_str(m, "ce_id").unwrap_or_default().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------

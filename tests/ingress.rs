//! The ingress service against a real Kafka-protocol broker (tansu) or rdkafka's MockCluster,
//! and a real Confluent-compatible schema registry (rivven-schema): one test per ingress
//! scenario of `../shared/conventions.md`, each named after the behaviour it proves.

mod common;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scheme_is_accepted_with_a_valid_signature_and_lands_in_kafka_confluent_framed() {
    let (_broker, _registry, s) = kafka_setup(3).await;
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let client = reqwest::Client::new();
    let t = now();

    let blog = comment("c1");
    let stripe_body = br#"{"id":"evt_1","type":"charge.succeeded","created":1}"#.to_vec();
    let slack_body = br#"{"event_id":"Ev01","event":{"type":"message","text":"hi"}}"#.to_vec();
    let shop_body = br#"{"order":42}"#.to_vec();
    let gh_body = br#"{"action":"created","comment":{"body":"nice"}}"#.to_vec();
    // GitHub and this generic HMAC source take their ids from unsigned headers: the identity
    // is the signed body's digest instead.
    let shop_id = signed_id("shop", &shop_body);
    let cases = [
        (
            "blog",
            standard("msg_1", t, &blog, WHSEC_NEW),
            blog.clone(),
            "blog:msg_1",
        ),
        (
            "stripe",
            stripe(t, &stripe_body),
            stripe_body.clone(),
            "stripe:evt_1",
        ),
        (
            "slack",
            slack(t, &slack_body),
            slack_body.clone(),
            "slack:Ev01",
        ),
        (
            "shop",
            shop("d-1", &shop_body),
            shop_body.clone(),
            shop_id.as_str(),
        ),
    ];
    for (source, h, body, id) in cases.iter().cloned() {
        let (status, json, _) = post(&client, &ing.url(source), h, body).await;
        assert_eq!(status, 202, "{source}: {json}");
        assert_eq!(json["status"], "accepted");
        assert_eq!(json["id"], id);
    }
    let (status, _, _) = post(
        &client,
        &ing.url("github"),
        github("gh-1", &gh_body),
        gh_body.clone(),
    )
    .await;
    assert_eq!(status, 202);

    // Slack's URL verification handshake is answered with its challenge and produces nothing.
    let challenge = br#"{"type":"url_verification","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","token":"x"}"#.to_vec();
    let (status, json, _) = post(&client, &ing.url("slack"), slack(t, &challenge), challenge).await;
    assert_eq!(status, 200);
    assert_eq!(
        json["challenge"],
        "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    );

    let records = read_topic(&s.bootstrap, &s.topic, 4, Duration::from_secs(30));
    assert_eq!(records.len(), 4);
    assert_eq!(
        records_in(&s.bootstrap, &s.topic, 3),
        4,
        "nothing else was produced"
    );
    // The registry's own id for <topic>-value.
    let latest: serde_json::Value = reqwest::get(format!(
        "{}/subjects/{}-value/versions/latest",
        s.registry, s.topic
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let registry_id = latest["id"].as_u64().expect("schema id") as u32;
    // The record's Avro, read with the registry's own schema text.
    let schema = apache_avro::Schema::parse_str(latest["schema"].as_str().expect("schema text"))
        .expect("the registry's schema parses");
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .expect("a reader of the registry's schema");
    let codec = spillway::codec::Codec::new(&spillway::codec::CodecConfig {
        format: spillway::codec::CodecFormat::Avro,
        schema_registry_url: Some(s.registry.clone()),
        schema_registry_timeout_ms: 2000,
    })
    .unwrap();
    let by_id: HashMap<String, &rdkafka::message::OwnedMessage> =
        ids(&records).into_iter().zip(records.iter()).collect();
    for (source, _, body, id) in &cases {
        let m = by_id.get(*id).unwrap_or_else(|| panic!("{id} is in Kafka"));
        let value = m.payload().unwrap();
        assert_eq!(value[0], 0, "Confluent magic byte");
        assert_eq!(spillway::codec::schema_id(value).unwrap(), registry_id);
        assert_eq!(m.key(), Some(id.as_bytes()), "keyed by the dedup key");
        assert_eq!(
            header_str(m, "ce_source"),
            Some(&*format!("/webhooks/{source}"))
        );
        assert_eq!(header_str(m, "ce_specversion"), Some("1.0"));
        assert_eq!(header_str(m, "content-type"), Some("application/avro"));
        let received: i64 = header_str(m, "spillway.received_ms")
            .unwrap()
            .parse()
            .unwrap();
        assert!((received / 1000 - t).abs() <= 60);
        // No source here names an occurrence time, so `ce_time` is the receipt.
        assert_eq!(
            header_str(m, "ce_time"),
            Some(&*spillway::codec::rfc3339_millis(received))
        );
        use apache_avro::types::Value as Avro;
        let Avro::Record(fields) = reader
            .read_value(&mut &value[5..])
            .expect("Avro of the registry's schema")
        else {
            panic!("a record");
        };
        let f: HashMap<String, Avro> = fields.into_iter().collect();
        let string = |s: &str| Avro::String(s.to_string());
        let some = |v: Avro| Avro::Union(1, Box::new(v));
        assert_eq!(f["specversion"], string("1.0"));
        assert_eq!(f["id"], string(id));
        assert_eq!(f["source"], string(&format!("/webhooks/{source}")));
        assert_eq!(
            Some(&f["type"]),
            header_str(m, "ce_type").map(string).as_ref()
        );
        assert_eq!(
            f["time"],
            some(string(&spillway::codec::rfc3339_millis(received)))
        );
        assert_eq!(f["datacontenttype"], string("application/json"));
        assert_eq!(f["received_at"], some(Avro::TimestampMillis(received)));
        assert_eq!(
            f["data"],
            string(std::str::from_utf8(body).unwrap()),
            "the sender's exact bytes"
        );
        let subject = match header_str(m, "ce_subject") {
            Some(s) => some(string(s)),
            None => Avro::Union(0, Box::new(Avro::Null)),
        };
        assert_eq!(f["subject"], subject);
        let event = codec.decode(m).await.expect("the processor decodes it");
        assert_eq!(event.id, *id);
        assert_eq!(event.source, format!("/webhooks/{source}"));
        let sent: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(event.data, sent, "the sender's JSON, unchanged");
    }
    assert_eq!(
        header_str(by_id["stripe:evt_1"], "ce_type"),
        Some("charge.succeeded")
    );
    assert_eq!(header_str(by_id["slack:Ev01"], "ce_type"), Some("message"));
    assert_eq!(
        header_str(by_id[shop_id.as_str()], "ce_type"),
        Some("orders/create")
    );
    assert_eq!(
        header_str(by_id["blog:msg_1"], "ce_subject"),
        Some("hello-world")
    );
    let gh = read_topic(&s.bootstrap, &s.other_topic, 1, Duration::from_secs(30));
    assert_eq!(ids(&gh), vec![signed_id("github", &gh_body)]);
    assert_eq!(
        header_str(&gh[0], "spillway.delivery_id"),
        Some("gh-1"),
        "the sender's unsigned id is kept for tracing"
    );
    assert_eq!(header_str(&gh[0], "ce_type"), Some("issue_comment"));

    let text = scrape(ing.metrics).await;
    assert_eq!(
        metric_sum(
            &text,
            "spillway_ingress_requests_total{outcome=\"accepted\""
        ),
        5.0
    );
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_truncated_empty_and_missing_signatures_get_401_and_produce_nothing() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let client = reqwest::Client::new();
    let t = now();
    let body = comment("c1");
    let good = standard("msg_1", t, &body, WHSEC_NEW);
    let valid_sig = good["webhook-signature"].to_str().unwrap().to_string();
    let valid_b64 = valid_sig.strip_prefix("v1,").unwrap().to_string();
    let with_sig = |sig: &str| {
        let mut h = good.clone();
        h.insert("webhook-signature", HeaderValue::from_str(sig).unwrap());
        h
    };
    let without = |name: &str| {
        let mut h = good.clone();
        h.remove(name);
        h
    };
    let mut flipped = body.clone();
    flipped[10] ^= 0x01;
    // The sender signed compact JSON; a proxy re-serialized it with spaces.
    let reserialized =
        serde_json::to_vec_pretty(&serde_json::from_slice::<serde_json::Value>(&body).unwrap())
            .unwrap();
    let blog_cases: Vec<(&str, HeaderMap, Vec<u8>)> = vec![
        ("one flipped body byte", good.clone(), flipped),
        ("re-serialized body", good.clone(), reserialized),
        (
            "`v1,` with an empty signature",
            with_sig("v1,"),
            body.clone(),
        ),
        (
            "truncated signature",
            with_sig(&format!("v1,{}", &valid_b64[..20])),
            body.clone(),
        ),
        (
            "unknown version only",
            with_sig(&format!("v2,{valid_b64}")),
            body.clone(),
        ),
        (
            "garbage signature",
            with_sig("v1,!!!not-base64!!!"),
            body.clone(),
        ),
        (
            "missing signature header",
            without("webhook-signature"),
            body.clone(),
        ),
        ("missing id header", without("webhook-id"), body.clone()),
        (
            "missing timestamp header",
            without("webhook-timestamp"),
            body.clone(),
        ),
        (
            "signed with an unknown secret",
            standard(
                "msg_1",
                t,
                &body,
                "whsec_dGhpcyBpcyBub3QgYSBrZXkgd2UgaGF2ZQ==",
            ),
            body.clone(),
        ),
    ];
    let mut rejected = 0;
    for (what, h, b) in blog_cases {
        let (status, json, _) = post(&client, &ing.url("blog"), h, b).await;
        assert_eq!(status, 401, "{what}: {json}");
        assert_eq!(json["error"], "bad_signature", "{what}");
        rejected += 1;
    }
    // The other schemes: flipped byte, empty, truncated, missing.
    let gh_body = br#"{"action":"created"}"#.to_vec();
    let gh = github("gh-1", &gh_body);
    let gh_sig = gh["x-hub-signature-256"].to_str().unwrap().to_string();
    let mut gh_flipped = gh_body.clone();
    gh_flipped[3] ^= 0x20;
    let gh_with = |v: &str| {
        let mut h = gh.clone();
        h.insert("x-hub-signature-256", HeaderValue::from_str(v).unwrap());
        h
    };
    let mut gh_missing = gh.clone();
    gh_missing.remove("x-hub-signature-256");
    let st_body = br#"{"id":"evt_1","type":"x"}"#.to_vec();
    let st = stripe(t, &st_body);
    let st_sig = st["stripe-signature"].to_str().unwrap().to_string();
    let st_v0_only = st_sig.replace("v1=", "v0=");
    let sl_body = br#"{"event_id":"Ev1","event":{"type":"message"}}"#.to_vec();
    let mut sl_flipped = sl_body.clone();
    sl_flipped[2] ^= 0x01;
    let sl_good = slack(t, &sl_body);
    let sl_with = |k: &str, v: &str| {
        let mut h = sl_good.clone();
        h.insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
        h
    };
    let sl_without = |k: &str| {
        let mut h = sl_good.clone();
        h.remove(k);
        h
    };
    let shop_body = br#"{"order":1}"#.to_vec();
    let mut shop_missing = shop("d-1", &shop_body);
    shop_missing.remove("x-shop-signature");
    let other_cases: Vec<(&str, &str, HeaderMap, Vec<u8>)> = vec![
        ("github", "flipped byte", gh.clone(), gh_flipped),
        ("github", "empty", gh_with("sha256="), gh_body.clone()),
        (
            "github",
            "truncated",
            gh_with(&gh_sig[..30]),
            gh_body.clone(),
        ),
        (
            "github",
            "odd-length hex",
            gh_with(&gh_sig[..gh_sig.len() - 1]),
            gh_body.clone(),
        ),
        ("github", "missing header", gh_missing, gh_body.clone()),
        (
            "stripe",
            "v0 only",
            headers(&[("stripe-signature", st_v0_only)]),
            st_body.clone(),
        ),
        (
            "stripe",
            "no signature",
            headers(&[("stripe-signature", format!("t={t}"))]),
            st_body.clone(),
        ),
        (
            "stripe",
            "empty v1",
            headers(&[("stripe-signature", format!("t={t},v1="))]),
            st_body.clone(),
        ),
        ("stripe", "flipped byte", st.clone(), {
            let mut b = st_body.clone();
            b[5] ^= 0x01;
            b
        }),
        (
            "stripe",
            "missing header",
            HeaderMap::new(),
            st_body.clone(),
        ),
        ("slack", "flipped byte", slack(t, &sl_body), sl_flipped),
        (
            "slack",
            "empty v0",
            sl_with("x-slack-signature", "v0="),
            sl_body.clone(),
        ),
        (
            "slack",
            "missing signature",
            sl_without("x-slack-signature"),
            sl_body.clone(),
        ),
        (
            "slack",
            "missing timestamp",
            sl_without("x-slack-request-timestamp"),
            sl_body.clone(),
        ),
        ("shop", "missing header", shop_missing, shop_body.clone()),
    ];
    for (source, what, h, b) in other_cases {
        let (status, json, _) = post(&client, &ing.url(source), h, b).await;
        assert_eq!(status, 401, "{source} {what}: {json}");
        rejected += 1;
    }
    assert_eq!(records_in(&s.bootstrap, &s.topic, 1), 0);
    assert_eq!(records_in(&s.bootstrap, &s.other_topic, 1), 0);
    let text = scrape(ing.metrics).await;
    assert_eq!(
        metric_sum(
            &text,
            "spillway_ingress_requests_total{outcome=\"bad_signature\""
        ),
        rejected as f64
    );
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotation_accepts_either_secret_and_reports_which_one_matched() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let client = reqwest::Client::new();
    let t = now();
    for (id, secret) in [
        ("new-1", WHSEC_NEW),
        ("old-1", WHSEC_OLD),
        ("old-2", WHSEC_OLD),
    ] {
        let body = comment(id);
        let (status, json, _) = post(
            &client,
            &ing.url("blog"),
            standard(id, t, &body, secret),
            body,
        )
        .await;
        assert_eq!(status, 202, "{id}: {json}");
    }
    // A sender that lists both signatures (Standard Webhooks during its own rotation).
    let body = comment("both");
    let mut h = standard("both", t, &body, WHSEC_OLD);
    let new_sig = standard("both", t, &body, WHSEC_NEW)["webhook-signature"]
        .to_str()
        .unwrap()
        .to_string();
    let old_sig = h["webhook-signature"].to_str().unwrap().to_string();
    h.insert(
        "webhook-signature",
        HeaderValue::from_str(&format!("v1,AAAA {new_sig} {old_sig}")).unwrap(),
    );
    let (status, _, _) = post(&client, &ing.url("blog"), h, body).await;
    assert_eq!(status, 202);
    let text = scrape(ing.metrics).await;
    assert_eq!(
        metric_value(
            &text,
            "spillway_ingress_secret_matches_total{secret=\"0\",source=\"blog\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "spillway_ingress_secret_matches_total{secret=\"1\",source=\"blog\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        read_topic(&s.bootstrap, &s.topic, 4, Duration::from_secs(30)).len(),
        4
    );
    ing.stop().await;
}

/// Sleeps to the start of a fresh second, so the test's clock and the server's read the same
/// second while one request is in flight.
async fn at_second_start() -> i64 {
    let frac = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_millis();
    tokio::time::sleep(Duration::from_millis(u64::from(1_020 - frac))).await;
    now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_of_299_s_is_accepted_and_301_s_is_rejected_past_and_future() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let client = reqwest::Client::new();
    for skew in [-299i64, 299, -301, 301] {
        let id = format!("skew{skew}");
        let body = comment(&id);
        let t = at_second_start().await;
        let (status, json, _) = post(
            &client,
            &ing.url("blog"),
            standard(&id, t + skew, &body, WHSEC_NEW),
            body,
        )
        .await;
        if skew.abs() == 299 {
            assert_eq!(status, 202, "skew {skew}: {json}");
        } else {
            assert_eq!(status, 401, "skew {skew}: {json}");
            assert_eq!(json["error"], "stale_timestamp");
        }
        // Stripe and Slack sign their timestamp too.
        let st_body = format!(r#"{{"id":"evt{skew}","type":"x"}}"#).into_bytes();
        let t = at_second_start().await;
        let (st_status, _, _) = post(
            &client,
            &ing.url("stripe"),
            stripe(t + skew, &st_body),
            st_body,
        )
        .await;
        let sl_body = format!(r#"{{"event_id":"Ev{skew}","event":{{"type":"m"}}}}"#).into_bytes();
        let t = at_second_start().await;
        let (sl_status, _, _) = post(
            &client,
            &ing.url("slack"),
            slack(t + skew, &sl_body),
            sl_body,
        )
        .await;
        let expected = if skew.abs() == 299 { 202 } else { 401 };
        assert_eq!((st_status, sl_status), (expected, expected), "skew {skew}");
    }
    assert_eq!(
        records_in(&s.bootstrap, &s.topic, 1),
        6,
        "only the ±299 s requests"
    );
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_delivery_sequentially_or_ten_times_at_once_produces_exactly_one_record() {
    let (_broker, _registry, s) = kafka_setup(3).await;
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let client = reqwest::Client::new();
    let t = now();
    let body = comment("r1");
    let h = standard("replay-1", t, &body, WHSEC_NEW);
    let (first, _, _) = post(&client, &ing.url("blog"), h.clone(), body.clone()).await;
    let (second, json, _) = post(&client, &ing.url("blog"), h.clone(), body.clone()).await;
    assert_eq!((first, second), (202, 200));
    assert_eq!(json["status"], "duplicate");

    // Ten copies at once: all 2xx, one record.
    let body = comment("r2");
    let h = standard("replay-2", t, &body, WHSEC_NEW);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (client, url, h, body) = (client.clone(), ing.url("blog"), h.clone(), body.clone());
        tasks.push(tokio::spawn(
            async move { post(&client, &url, h, body).await.0 },
        ));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 200, 200, 200, 202]);

    // GitHub has no signed timestamp: the delivery id alone catches the replay.
    let gh_body = br#"{"action":"created"}"#.to_vec();
    for expected in [202, 200, 200] {
        let (status, _, _) = post(
            &client,
            &ing.url("github"),
            github("gh-r", &gh_body),
            gh_body.clone(),
        )
        .await;
        assert_eq!(status, expected);
    }

    let records = read_topic(&s.bootstrap, &s.topic, 2, Duration::from_secs(30));
    let mut got = ids(&records);
    got.sort();
    assert_eq!(got, ["blog:replay-1", "blog:replay-2"]);
    assert_eq!(records_in(&s.bootstrap, &s.topic, 3), 2);
    assert_eq!(records_in(&s.bootstrap, &s.other_topic, 1), 1);
    let text = scrape(ing.metrics).await;
    assert_eq!(
        metric_sum(&text, "spillway_ingress_requests_total{outcome=\"replay\""),
        12.0,
        "1 sequential + 9 concurrent blog copies + 2 github copies"
    );
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_delivery_replayed_with_new_unsigned_ids_is_one_event() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let client = reqwest::Client::new();
    // An attacker holds one signed GitHub delivery and one signed shop (generic HMAC)
    // delivery, and replays each with fresh delivery ids, which nobody signs.
    let gh_body = br#"{"action":"created","comment":{"body":"buy now"}}"#.to_vec();
    let shop_body = br#"{"order":7}"#.to_vec();
    for (i, expected) in [(0, 202), (1, 200), (2, 200)] {
        let (status, json, _) = post(
            &client,
            &ing.url("github"),
            github(&format!("replayed-{i}"), &gh_body),
            gh_body.clone(),
        )
        .await;
        assert_eq!(status, expected, "github copy {i}: {json}");
        assert_eq!(json["id"], signed_id("github", &gh_body));
        let (status, json, _) = post(
            &client,
            &ing.url("shop"),
            shop(&format!("replayed-{i}"), &shop_body),
            shop_body.clone(),
        )
        .await;
        assert_eq!(status, expected, "shop copy {i}: {json}");
    }
    // A legitimate redelivery (same body, same id) is still one event; another signed body is
    // another event.
    let (status, _, _) = post(
        &client,
        &ing.url("github"),
        github("replayed-0", &gh_body),
        gh_body.clone(),
    )
    .await;
    assert_eq!(status, 200);
    let other = br#"{"action":"created","comment":{"body":"second"}}"#.to_vec();
    let (status, _, _) = post(
        &client,
        &ing.url("github"),
        github("g-2", &other),
        other.clone(),
    )
    .await;
    assert_eq!(status, 202);

    let gh = read_topic(&s.bootstrap, &s.other_topic, 2, Duration::from_secs(30));
    let mut got = ids(&gh);
    got.sort();
    let mut want = vec![signed_id("github", &gh_body), signed_id("github", &other)];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(records_in(&s.bootstrap, &s.other_topic, 1), 2);
    assert_eq!(records_in(&s.bootstrap, &s.topic, 1), 1, "one shop record");
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_id_with_a_control_character_gets_400_saying_why() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let client = reqwest::Client::new();
    let t = now();
    // Stripe's id is in the signed body, where JSON can carry any character.
    let body = br#"{"id":"evt_1\r\nX-Injected: 1","type":"charge.succeeded"}"#.to_vec();
    let (status, json, _) = post(&client, &ing.url("stripe"), stripe(t, &body), body).await;
    assert_eq!(status, 400, "{json}");
    let message = json["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("delivery id has a control character (U+000D) at byte 5"),
        "{json}"
    );
    assert_eq!(records_in(&s.bootstrap, &s.topic, 1), 0);
    ing.stop().await;
}

/// Reads an HTTP/1.1 response head from a raw connection: the status code.
async fn read_status(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<u16> {
    let mut line = String::new();
    reader.read_line(&mut line).await.ok()?;
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l).await.ok()? == 0 || l == "\r\n" {
            break;
        }
    }
    Some(status)
}

/// Sends `head`, then streams `chunk` `repeat` times (stopping at the first write error),
/// while reading the response. Returns the status and the bytes the server let in.
async fn stream_body(
    addr: SocketAddr,
    head: String,
    chunk: Vec<u8>,
    repeat: usize,
) -> (Option<u16>, usize) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        if w.write_all(head.as_bytes()).await.is_err() {
            return sent;
        }
        for _ in 0..repeat {
            if w.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let mut reader = BufReader::new(r);
    let status = tokio::time::timeout(Duration::from_secs(20), read_status(&mut reader))
        .await
        .ok()
        .flatten();
    let sent = tokio::time::timeout(Duration::from_secs(20), writer)
        .await
        .expect("the server stops reading")
        .unwrap();
    (status, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_chunked_and_lying_content_length_bodies_get_413_without_being_buffered() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let client = reqwest::Client::new();
    let t = now();
    let limit = 65_536usize;

    // At the limit exactly: accepted.
    let mut body = br#"{"id":"edge","text":""#.to_vec();
    body.resize(limit - 2, b'a');
    body.extend_from_slice(br#""}"#);
    assert_eq!(body.len(), limit);
    let (status, json, _) = post(
        &client,
        &ing.url("blog"),
        standard("edge", t, &body, WHSEC_NEW),
        body.clone(),
    )
    .await;
    assert_eq!(status, 202, "{json}");

    // One byte over, honestly declared.
    let mut over = body.clone();
    over.insert(1, b' ');
    let (status, json, _) = post(
        &client,
        &ing.url("blog"),
        standard("over", t, &over, WHSEC_NEW),
        over,
    )
    .await;
    assert_eq!((status, json["error"].as_str()), (413, Some("too_large")));

    // A declared 1 GB that never comes: refused at once, without waiting for a byte.
    let head = "POST /webhooks/blog HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000000000\r\n\r\n"
        .to_string();
    let started = Instant::now();
    let (status, _) = stream_body(ing.addr, head, Vec::new(), 0).await;
    assert_eq!(status, Some(413));
    assert!(started.elapsed() < Duration::from_secs(5));

    // Chunked, 64 MiB offered: 413, and the server stops reading long before the end.
    let chunk = {
        let data = vec![b'a'; 64 * 1024];
        let mut c = format!("{:x}\r\n", data.len()).into_bytes();
        c.extend_from_slice(&data);
        c.extend_from_slice(b"\r\n");
        c
    };
    let head =
        "POST /webhooks/blog HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
    let (status, sent) = stream_body(ing.addr, head, chunk.clone(), 1024).await;
    assert_eq!(status, Some(413));
    assert!(
        sent < 16 << 20,
        "the server read {sent} bytes of a 64 MiB body"
    );

    // A Content-Length that lies small, with a chunked body behind it: the chunked framing
    // wins and the limit still holds.
    let head = "POST /webhooks/blog HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
    let (status, sent) = stream_body(ing.addr, head, chunk, 1024).await;
    assert_eq!(status, Some(413));
    assert!(
        sent < 16 << 20,
        "the server read {sent} bytes of a 64 MiB body"
    );

    // A Content-Length that lies small with 8 MiB behind it: only the declared bytes are the
    // body (which then fails its signature); the rest is never taken as a request.
    let h = standard("short", t, b"{}", WHSEC_NEW);
    let head = format!(
        "POST /webhooks/blog HTTP/1.1\r\nhost: x\r\nwebhook-id: short\r\nwebhook-timestamp: {}\r\nwebhook-signature: {}\r\ncontent-length: 100\r\n\r\n",
        h["webhook-timestamp"].to_str().unwrap(),
        h["webhook-signature"].to_str().unwrap()
    );
    let (status, sent) = stream_body(ing.addr, head, vec![b'{'; 64 * 1024], 1024).await;
    assert_eq!(status, Some(401));
    assert!(sent < 16 << 20, "the server read {sent} bytes");

    assert_eq!(
        records_in(&s.bootstrap, &s.topic, 1),
        1,
        "only the body at the limit"
    );
    let text = scrape(ing.metrics).await;
    assert_eq!(
        metric_sum(
            &text,
            "spillway_ingress_requests_total{outcome=\"too_large\""
        ),
        4.0
    );
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_reaped_while_other_clients_are_served() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let server = "plaintext = true\nheader_read_timeout_ms = 1000\nbody_timeout_ms = 1000";
    let ing = start(&ingress_toml(&s, server, "", "")).await;

    // 40 clients trickle a request head, one byte every 100 ms; 10 send their head and then
    // trickle the body.
    let mut lorises = Vec::new();
    for i in 0..50 {
        let addr = ing.addr;
        lorises.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let slow_body = i % 5 == 0;
            let (head, trickle): (String, &[u8]) = if slow_body {
                (
                    "POST /webhooks/blog HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{"
                        .into(),
                    b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                )
            } else {
                (
                    "POST /webhooks/blog HTTP/1.1\r\n".into(),
                    b"x-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                )
            };
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut status = None;
            for b in trickle.iter().cycle().take(300) {
                if stream.write_all(&[*b]).await.is_err() {
                    break;
                }
                // The server answers (408) or closes: stop.
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        status = std::str::from_utf8(&buf[..n])
                            .ok()
                            .and_then(|t| t.split_whitespace().nth(1))
                            .and_then(|c| c.parse::<u16>().ok());
                        break;
                    }
                    Err(_) => {}
                }
            }
            (slow_body, status, started.elapsed())
        }));
    }

    // Meanwhile, regular clients are served promptly.
    let client = reqwest::Client::new();
    let t = now();
    for i in 0..20 {
        let id = format!("fast-{i}");
        let body = comment(&id);
        let (status, _, _) = post(
            &client,
            &ing.url("blog"),
            standard(&id, t, &body, WHSEC_NEW),
            body,
        )
        .await;
        assert_eq!(status, 202);
    }

    for l in lorises {
        let (slow_body, status, lived) = l.await.unwrap();
        assert!(
            lived < Duration::from_secs(10),
            "a slow client held its connection for {lived:?} (it would trickle for 30 s)"
        );
        if slow_body {
            assert_eq!(status, Some(408), "a slow body gets 408");
        }
    }
    let text = scrape(ing.metrics).await;
    assert!(
        metric_sum(
            &text,
            "spillway_ingress_connections_closed_total{reason=\"header_timeout\""
        ) >= 40.0,
        "{text}"
    );
    // Idle keep-alive connections (the regular client's) are reaped by the same timer.
    wait_until_async("every connection is closed", Duration::from_secs(10), || {
        let m = ing.metrics;
        async move { metric_value(&scrape(m).await, "spillway_ingress_connections") == Some(0.0) }
    })
    .await;
    assert_eq!(records_in(&s.bootstrap, &s.topic, 1), 20);
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_source_gets_429_for_that_source_only() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let client = reqwest::Client::new();
    let t = now();
    // github is limited to 5/min; blog is not limited.
    let mut accepted = Vec::new();
    let mut limited = 0;
    for i in 0..12 {
        let body = format!(r#"{{"n":{i}}}"#).into_bytes();
        let (status, json, retry_after) = post(
            &client,
            &ing.url("github"),
            github(&format!("flood-{i}"), &body),
            body,
        )
        .await;
        match status {
            202 => accepted.push(i),
            429 => {
                limited += 1;
                assert_eq!(json["error"], "rate_limited");
                let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
                assert!((1..=60).contains(&secs), "Retry-After {secs}");
            }
            other => panic!("unexpected {other}: {json}"),
        }
        // The other source is unaffected by github's flood.
        let id = format!("calm-{i}");
        let b = comment(&id);
        let (status, _, _) = post(
            &client,
            &ing.url("blog"),
            standard(&id, t, &b, WHSEC_NEW),
            b,
        )
        .await;
        assert_eq!(status, 202);
    }
    assert_eq!(accepted, [0, 1, 2, 3, 4]);
    assert_eq!(limited, 7);
    // A replay of an accepted delivery is still a 2xx duplicate while the source is limited.
    let body = br#"{"n":0}"#.to_vec();
    let (status, _, _) = post(&client, &ing.url("github"), github("flood-0", &body), body).await;
    assert_eq!(status, 200);
    assert_eq!(records_in(&s.bootstrap, &s.other_topic, 1), 5);
    assert_eq!(records_in(&s.bootstrap, &s.topic, 1), 12);
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_ip_limit_refuses_before_any_signature_work() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(
        &s,
        "plaintext = true\nip_rate = \"3/min\"",
        "",
        "",
    ))
    .await;
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        // Unsigned: the per-IP limit answers before the signature is even looked at.
        let (status, _, retry_after) =
            post(&client, &ing.url("blog"), HeaderMap::new(), b"{}".to_vec()).await;
        statuses.push((status, retry_after.is_some()));
    }
    assert_eq!(
        statuses,
        [
            (401, false),
            (401, false),
            (401, false),
            (429, true),
            (429, true)
        ]
    );
    ing.stop().await;
}

/// A one-broker MockCluster (for outages and injected errors) with the webhook topic in
/// `partitions` partitions, and a real registry.
fn mock_setup(
    partitions: i32,
) -> (
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    Registry,
    Setup,
) {
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let registry = Registry::start();
    let s = Setup {
        bootstrap: mock.bootstrap_servers(),
        registry: registry.url(),
        topic: unique("mock-webhooks"),
        other_topic: unique("mock-gh"),
    };
    mock.create_topic(&s.topic, partitions, 1).unwrap();
    mock.create_topic(&s.other_topic, 1, 1).unwrap();
    (mock, registry, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_gives_503_with_retry_after_and_never_2xx_without_the_record() {
    let (mock, _registry, s) = mock_setup(2);
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let client = reqwest::Client::new();
    let t = now();
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    let send = |id: String| {
        let (client, url) = (client.clone(), ing.url("blog"));
        async move {
            let body = comment(&id);
            let r = post(&client, &url, standard(&id, t, &body, WHSEC_NEW), body).await;
            (id, r)
        }
    };
    for i in 0..5 {
        let (id, (status, json, _)) = send(format!("before-{i}")).await;
        assert_eq!(status, 202, "{json}");
        acknowledged.push(id);
    }

    mock.broker_down(1).unwrap();
    wait_for_readiness(
        ing.metrics,
        false,
        "readiness turns false while Kafka is down",
        Duration::from_secs(30),
    )
    .await;
    let outage: Vec<_> =
        futures_util::future::join_all((0..5).map(|i| send(format!("during-{i}")))).await;
    for (id, (status, json, retry_after)) in outage {
        assert_eq!(status, 503, "{id}: {json}");
        assert_eq!(json["error"], "kafka_unavailable");
        assert_eq!(retry_after.as_deref(), Some("5"));
        refused.push(id);
    }
    // Liveness never depends on Kafka: an outage must not get every pod restarted.
    let live = reqwest::get(format!("http://{}/healthz", ing.metrics))
        .await
        .unwrap();
    assert_eq!(live.status().as_u16(), 200, "liveness during the outage");
    let text = scrape(ing.metrics).await;
    assert_eq!(metric_value(&text, "spillway_ingress_kafka_up"), Some(0.0));
    assert!(
        metric_sum(
            &text,
            "spillway_ingress_requests_total{outcome=\"kafka_unavailable\""
        ) >= 5.0
    );

    mock.broker_up(1).unwrap();
    wait_for_readiness(
        ing.metrics,
        true,
        "readiness returns with Kafka",
        Duration::from_secs(30),
    )
    .await;
    // The senders retry what was refused, honouring Retry-After, and it goes through. (The
    // idempotent producer may need a moment after the outage to re-establish its producer
    // id, so one more 503 is allowed; a 2xx is never given without the record.)
    for id in refused {
        let mut tries = 0;
        loop {
            tries += 1;
            let (_, (status, json, retry_after)) = send(id.clone()).await;
            if status == 202 {
                break;
            }
            assert_eq!(status, 503, "{id}: {json}");
            assert!(retry_after.is_some(), "503 without Retry-After");
            assert!(tries < 10, "{id} still refused after {tries} tries: {json}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        acknowledged.push(id);
    }
    let total = records_in(&s.bootstrap, &s.topic, 2) as usize;
    let records = read_topic(&s.bootstrap, &s.topic, total, Duration::from_secs(30));
    assert_eq!(records.len(), total);
    let in_kafka = ids(&records);
    for id in &acknowledged {
        let id = format!("blog:{id}");
        assert!(in_kafka.contains(&id), "{id} got 202 but is not in Kafka");
    }
    // Nothing that was accepted before the outage was written twice.
    for i in 0..5 {
        let id = format!("blog:before-{i}");
        assert_eq!(in_kafka.iter().filter(|x| **x == id).count(), 1, "{id}");
    }
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_produce_errors_are_retried_inside_the_delivery_timeout_without_duplicates() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (mock, _registry, s) = mock_setup(1);
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    // The next produce requests fail with retriable errors.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ],
    );
    let client = reqwest::Client::new();
    let body = comment("t1");
    let (status, json, _) = post(
        &client,
        &ing.url("blog"),
        standard("t1", now(), &body, WHSEC_NEW),
        body,
    )
    .await;
    assert_eq!(status, 202, "{json}");
    let records = read_topic(&s.bootstrap, &s.topic, 1, Duration::from_secs(30));
    assert_eq!(ids(&records), ["blog:t1"]);
    assert_eq!(
        records_in(&s.bootstrap, &s.topic, 1),
        1,
        "the idempotent producer wrote it once"
    );
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_down_with_a_warm_cache_still_serves_and_with_a_cold_cache_gives_503() {
    let (_broker, registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let client = reqwest::Client::new();
    let t = now();
    let body = comment("warm-1");
    let (status, _, _) = post(
        &client,
        &ing.url("blog"),
        standard("warm-1", t, &body, WHSEC_NEW),
        body,
    )
    .await;
    assert_eq!(status, 202);

    drop(registry);
    // blog's topic has its schema id cached: it keeps being served.
    let body = comment("warm-2");
    let (status, json, _) = post(
        &client,
        &ing.url("blog"),
        standard("warm-2", t, &body, WHSEC_NEW),
        body,
    )
    .await;
    assert_eq!(status, 202, "{json}");
    // github's topic was never produced to: no schema id, so 503 and nothing produced.
    let gh_body = br#"{"action":"created"}"#.to_vec();
    let (status, json, retry_after) = post(
        &client,
        &ing.url("github"),
        github("cold-1", &gh_body),
        gh_body.clone(),
    )
    .await;
    assert_eq!(status, 503, "{json}");
    assert_eq!(json["error"], "registry_unavailable");
    assert!(retry_after.is_some());

    // A registry comes back (on a new address here, so restart the ingress against it): the
    // sender's retry of the refused delivery goes through. Nothing was marked as seen.
    let registry = Registry::start();
    ing.stop().await;
    let s2 = Setup {
        registry: registry.url(),
        ..s
    };
    let ing = start(&ingress_toml(&s2, "plaintext = true", "", "")).await;
    let (status, json, _) = post(
        &client,
        &ing.url("github"),
        github("cold-1", &gh_body),
        gh_body,
    )
    .await;
    assert_eq!(status, 202, "{json}");
    assert_eq!(records_in(&s2.bootstrap, &s2.topic, 1), 2);
    assert_eq!(records_in(&s2.bootstrap, &s2.other_topic, 1), 1);
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_400_that_says_what_is_wrong() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("comment.schema.json");
    std::fs::write(
        &schema,
        r#"{"type":"object","required":["id","text"],"properties":{"text":{"type":"string","maxLength":500}}}"#,
    )
    .unwrap();
    let ing = start(&ingress_toml(
        &s,
        "plaintext = true",
        "",
        &format!("schema = {:?}", schema.display().to_string()),
    ))
    .await;
    let client = reqwest::Client::new();
    let t = now();
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "blog",
            "not JSON",
            b"{\"id\": 1,,}".to_vec(),
            "line 1 column",
        ),
        (
            "blog",
            "schema",
            br#"{"id":"x","text":7}"#.to_vec(),
            "/text",
        ),
        ("blog", "schema", br#"{"id":"x"}"#.to_vec(), "text"),
        (
            "stripe",
            "no delivery id",
            br#"{"type":"charge.succeeded"}"#.to_vec(),
            "delivery id is missing",
        ),
        (
            "stripe",
            "no event type",
            br#"{"id":"evt_9"}"#.to_vec(),
            "event type is missing",
        ),
    ];
    for (source, what, body, says) in cases {
        let h = match source {
            "blog" => standard(&unique("bad"), t, &body, WHSEC_NEW),
            _ => stripe(t, &body),
        };
        let (status, json, _) = post(&client, &ing.url(source), h, body).await;
        assert_eq!(status, 400, "{what}: {json}");
        assert_eq!(json["error"], "invalid");
        let message = json["message"].as_str().unwrap();
        assert!(message.contains(says), "{what}: {message}");
    }
    let (status, json, _) = post(&client, &ing.url("nope"), HeaderMap::new(), b"{}".to_vec()).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (404, Some("unknown_source"))
    );
    let r = client.get(ing.url("blog")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    // A schema-valid body still goes through.
    let body = br#"{"id":"ok","text":"fine"}"#.to_vec();
    let (status, _, _) = post(
        &client,
        &ing.url("blog"),
        standard("ok", t, &body, WHSEC_NEW),
        body,
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(records_in(&s.bootstrap, &s.topic, 1), 1);
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_webhooks_and_cuts_off_a_stalled_handshake() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let fixtures = format!("{ROOT}/tests/fixtures");
    let server = format!(
        "tls = {{ cert_file = \"{fixtures}/tls.crt\", key_file = \"{fixtures}/tls.key\" }}\nheader_read_timeout_ms = 1000"
    );
    let ing = start(&ingress_toml(&s, &server, "", "")).await;
    let cert =
        reqwest::Certificate::from_pem(&std::fs::read(format!("{fixtures}/tls.crt")).unwrap())
            .unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(cert)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/webhooks/blog", ing.addr.port());
    let body = comment("tls-1");
    let (status, json, _) = post(
        &client,
        &url,
        standard("tls-1", now(), &body, WHSEC_NEW),
        body.clone(),
    )
    .await;
    assert_eq!(status, 202, "{json}");
    // Plain HTTP on the TLS port is not served.
    let plain = reqwest::Client::new()
        .post(ing.url("blog"))
        .body(body)
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
    // A client that connects and never starts the handshake is cut off.
    let started = Instant::now();
    let mut stalled = TcpStream::connect(ing.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf))
        .await
        .expect("the server closes the stalled connection");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(started.elapsed() < Duration::from_secs(10));
    let text = scrape(ing.metrics).await;
    assert!(
        metric_sum(
            &text,
            "spillway_ingress_connections_closed_total{reason=\"tls_handshake\""
        ) >= 1.0
    );
    assert_eq!(records_in(&s.bootstrap, &s.topic, 1), 1);
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_turns_readiness_off_and_lets_the_in_flight_request_finish() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(
        &s,
        "plaintext = true\nbody_timeout_ms = 30000",
        "",
        "",
    ))
    .await;
    let body = comment("inflight");
    let h = standard("inflight", now(), &body, WHSEC_NEW);
    let mut head = format!(
        "POST /webhooks/blog HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in &h {
        head.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
    }
    head.push_str("\r\n");
    let stream = TcpStream::connect(ing.addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    w.write_all(head.as_bytes()).await.unwrap();
    w.write_all(&body[..10]).await.unwrap();
    wait_for_metric(
        ing.metrics,
        "spillway_ingress_in_flight_requests",
        1.0,
        "the request is in flight",
    )
    .await;

    ing.stop.cancel();
    wait_for_readiness(
        ing.metrics,
        false,
        "readiness is off during the drain",
        Duration::from_secs(10),
    )
    .await;
    // New connections are no longer served.
    let refused = reqwest::Client::new()
        .post(ing.url("blog"))
        .body("{}")
        .send()
        .await;
    assert!(refused.is_err(), "the listener is closed");
    assert!(
        !ing.task.is_finished(),
        "the in-flight request holds the drain open"
    );

    w.write_all(&body[10..]).await.unwrap();
    let mut reader = BufReader::new(r);
    assert_eq!(read_status(&mut reader).await, Some(202));
    tokio::time::timeout(Duration::from_secs(20), ing.task)
        .await
        .expect("the ingress stops once the request finished")
        .unwrap()
        .unwrap();
    assert_eq!(
        ids(&read_topic(
            &s.bootstrap,
            &s.topic,
            1,
            Duration::from_secs(30)
        )),
        ["blog:inflight"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_every_acknowledged_id_is_in_kafka() {
    let (_broker, _registry, s) = kafka_setup(3).await;
    let (port, metrics_port) = (free_port(), free_port());
    let toml = ingress_toml(&s, "plaintext = true", "", "")
        .replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1)
        .replacen("127.0.0.1:0", &format!("127.0.0.1:{metrics_port}"), 1);
    let mut proc = SpillwayProc::spawn_service(
        "ingress",
        &toml,
        SocketAddr::from(([127, 0, 0, 1], metrics_port)),
    );
    wait_for_readiness(
        SocketAddr::from(([127, 0, 0, 1], metrics_port)),
        true,
        "the ingress binary is ready",
        Duration::from_secs(60),
    )
    .await;

    // 16 senders, each sending distinct signed events back to back until the server is gone.
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = format!("http://127.0.0.1:{port}/webhooks/blog");
    let mut senders = Vec::new();
    for w in 0..16 {
        let (acked, sent, url) = (acked.clone(), sent.clone(), url.clone());
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0.. {
                let id = format!("w{w}-{i}");
                let body = comment(&id);
                let h = standard(&id, now(), &body, WHSEC_NEW);
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match client.post(&url).headers(h).body(body).send().await {
                    Ok(r) if r.status().is_success() => {
                        acked.lock().unwrap().push(format!("blog:{id}"))
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }));
    }
    wait_until("load is flowing", Duration::from_secs(60), || {
        acked.lock().unwrap().len() >= 300
    })
    .await;
    proc.signal("TERM");
    for s in senders {
        tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("senders stop")
            .unwrap();
    }
    let status = blocking(|| proc.wait_exit(Duration::from_secs(30)));
    assert!(status.success(), "exit {status}; log:\n{}", proc.log_text());

    let acked = acked.lock().unwrap().clone();
    let records = read_topic(&s.bootstrap, &s.topic, acked.len(), Duration::from_secs(60));
    let in_kafka: std::collections::HashSet<String> = ids(&records).into_iter().collect();
    let missing: Vec<&String> = acked.iter().filter(|id| !in_kafka.contains(*id)).collect();
    eprintln!(
        "sent {}, acknowledged {}, in Kafka {}, acknowledged but missing {}",
        sent.load(std::sync::atomic::Ordering::Relaxed),
        acked.len(),
        in_kafka.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged but not in Kafka: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_hangs_up_mid_produce_cannot_lose_or_double_its_event() {
    // The produce outlives the request: a copy that arrives later is a duplicate, not a
    // second record, and the first copy's record is in Kafka.
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(&s, "plaintext = true", "", "")).await;
    let body = comment("hangup");
    let h = standard("hangup", now(), &body, WHSEC_NEW);
    let mut head = format!(
        "POST /webhooks/blog HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in &h {
        head.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
    }
    head.push_str("\r\n");
    for _ in 0..5 {
        let mut stream = TcpStream::connect(ing.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body).await.unwrap();
        drop(stream); // hang up without reading the answer
    }
    let client = reqwest::Client::new();
    wait_until_async(
        "the retry is answered as a duplicate",
        Duration::from_secs(30),
        || {
            let (client, url, h, body) = (client.clone(), ing.url("blog"), h.clone(), body.clone());
            async move { post(&client, &url, h, body).await.0 == 200 }
        },
    )
    .await;
    assert_eq!(
        ids(&read_topic(
            &s.bootstrap,
            &s.topic,
            1,
            Duration::from_secs(30)
        )),
        ["blog:hangup"]
    );
    assert_eq!(records_in(&s.bootstrap, &s.topic, 1), 1);
    // The hung-up requests are not left counted as in flight.
    wait_for_metric(
        ing.metrics,
        "spillway_ingress_in_flight_requests",
        0.0,
        "no request is counted in flight",
    )
    .await;
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_memory_budget_get_503_and_the_budget_comes_back() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(
        &s,
        "plaintext = true\nmax_buffered_body_bytes = 600000\nbody_timeout_ms = 30000",
        "",
        "",
    ))
    .await;
    // An unauthenticated client declares 400 kB and stalls after one byte: the declared
    // length is charged to the budget before any of it arrives.
    let mut hog = TcpStream::connect(ing.addr).await.unwrap();
    hog.write_all(b"POST /webhooks/github HTTP/1.1\r\nhost: x\r\ncontent-length: 400000\r\n\r\n{")
        .await
        .unwrap();
    wait_for_metric(
        ing.metrics,
        "spillway_ingress_buffered_body_bytes",
        400_000.0,
        "the hog's body is held",
    )
    .await;

    // A second 400 kB body does not fit: 503 with Retry-After, before a byte of it is kept.
    let head = "POST /webhooks/github HTTP/1.1\r\nhost: x\r\ncontent-length: 400000\r\n\r\n";
    let stream = TcpStream::connect(ing.addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    w.write_all(head.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(r);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).await.unwrap();
    assert!(status_line.contains(" 503 "), "{status_line}");
    let mut retry_after = None;
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l).await.unwrap() == 0 || l == "\r\n" {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("retry-after:") {
            retry_after = Some(v.trim().to_string());
        }
    }
    assert_eq!(retry_after.as_deref(), Some("5"));

    // Small bodies still fit beside the hog.
    let client = reqwest::Client::new();
    let body = comment("small");
    let (status, json, _) = post(
        &client,
        &ing.url("blog"),
        standard("small", now(), &body, WHSEC_NEW),
        body,
    )
    .await;
    assert_eq!(status, 202, "{json}");

    // The hog hangs up: its bytes go back to the budget, and a large signed body fits again.
    drop(hog);
    wait_for_metric(
        ing.metrics,
        "spillway_ingress_buffered_body_bytes",
        0.0,
        "the budget is whole again",
    )
    .await;
    let mut big = br#"{"id":"big","text":""#.to_vec();
    big.resize(450_000, b'a');
    big.extend_from_slice(br#""}"#);
    let (status, json, _) = post(&client, &ing.url("github"), github("gh-big", &big), big).await;
    assert_eq!(status, 202, "{json}");
    let text = scrape(ing.metrics).await;
    assert_eq!(
        metric_sum(
            &text,
            "spillway_ingress_requests_total{outcome=\"overloaded\""
        ),
        1.0
    );
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_kafka_gets_413_and_releases_its_delivery_id() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    // A message.max.bytes resolved at start-up (from a file) is not checked against the body
    // limit, so the producer itself refuses the record: the sender must get a 413, not a 503
    // it would retry for ever.
    let dir = tempfile::tempdir().unwrap();
    let max = dir.path().join("message-max-bytes");
    std::fs::write(&max, "20000").unwrap();
    let kafka = format!(
        "[kafka.properties]\n\"message.max.bytes\" = {{ file = \"{}\" }}",
        max.display()
    );
    let ing = start(
        &ingress_toml(&s, "plaintext = true", "", "")
            .replace("[registry]", &format!("{kafka}\n\n[registry]")),
    )
    .await;
    let client = reqwest::Client::new();
    let mut body = br#"{"id":"large","text":""#.to_vec();
    body.resize(40_000, b'a');
    body.extend_from_slice(br#""}"#);
    let (status, json, retry_after) = post(
        &client,
        &ing.url("blog"),
        standard("large", now(), &body, WHSEC_NEW),
        body,
    )
    .await;
    assert_eq!(
        (status, json["error"].as_str(), retry_after),
        (413, Some("too_large"), None),
        "{json}"
    );
    // The id was not kept: the sender can send that delivery again, smaller.
    let body = comment("large");
    let (status, json, _) = post(
        &client,
        &ing.url("blog"),
        standard("large", now(), &body, WHSEC_NEW),
        body,
    )
    .await;
    assert_eq!(status, 202, "{json}");
    assert_eq!(
        ids(&read_topic(
            &s.bootstrap,
            &s.topic,
            1,
            Duration::from_secs(30)
        )),
        ["blog:large"]
    );
    assert_eq!(records_in(&s.bootstrap, &s.topic, 1), 1);
    ing.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_delay_keeps_serving_with_readiness_off_then_closes_the_listener() {
    let (_broker, _registry, s) = kafka_setup(1).await;
    let ing = start(&ingress_toml(
        &s,
        "plaintext = true\nshutdown_delay_ms = 5000",
        "",
        "",
    ))
    .await;
    let cancelled = Instant::now();
    ing.stop.cancel();
    wait_for_readiness(
        ing.metrics,
        false,
        "readiness is off",
        Duration::from_secs(4),
    )
    .await;
    // A load balancer that has not noticed yet still gets its webhook stored.
    let client = reqwest::Client::new();
    let body = comment("late");
    let (status, json, _) = post(
        &client,
        &ing.url("blog"),
        standard("late", now(), &body, WHSEC_NEW),
        body,
    )
    .await;
    assert_eq!(status, 202, "{json}");
    assert!(
        cancelled.elapsed() < Duration::from_secs(5),
        "the webhook was sent inside the delay"
    );
    tokio::time::timeout(Duration::from_secs(30), ing.task)
        .await
        .expect("the ingress stops after the delay")
        .unwrap()
        .unwrap();
    assert!(cancelled.elapsed() >= Duration::from_secs(5));
    assert_eq!(
        ids(&read_topic(
            &s.bootstrap,
            &s.topic,
            1,
            Duration::from_secs(30)
        )),
        ["blog:late"]
    );
}

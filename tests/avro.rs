//! Confluent-framed Avro through a real Confluent-compatible schema registry (rivven-schema):
//! the envelope in `schemas/event.avsc` decodes into the event; an unknown schema id and a
//! body that does not match its schema go to the DLQ.

mod common;

use std::sync::Arc;
use std::time::Duration;

use apache_avro::types::Value;
use common::*;
use rdkafka::message::Message;
use schema_registry_converter::async_impl::avro::AvroEncoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use spillway::codec::header_str;
use tokio_util::sync::CancellationToken;

fn envelope(id: &str, seq: u64) -> Vec<(&'static str, Value)> {
    vec![
        ("specversion", Value::String("1.0".into())),
        ("id", Value::String(id.into())),
        ("source", Value::String("/webhooks/github".into())),
        ("type", Value::String("com.github.issue_comment".into())),
        (
            "time",
            Value::Union(1, Box::new(Value::String("2026-11-22T10:00:00Z".into()))),
        ),
        ("subject", Value::Union(0, Box::new(Value::Null))),
        ("datacontenttype", Value::String("application/json".into())),
        ("received_at", Value::Union(0, Box::new(Value::Null))),
        (
            "data",
            Value::String(format!(r#"{{"key":"k","seq":{seq}}}"#)),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluent_avro_envelope_decodes_and_bad_frames_go_to_the_dlq() {
    let broker = Broker::start();
    let registry = Registry::start();
    let (topic, dlq, group) = (unique("avro"), unique("avro-dlq"), unique("g"));
    create_topic(&broker.bootstrap(), &topic, 1).await;
    create_topic(&broker.bootstrap(), &dlq, 1).await;

    let schema = std::fs::read_to_string(format!("{ROOT}/schemas/event.avsc")).unwrap();
    let encoder = AvroEncoder::new(SrSettings::new(registry.url()));
    let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
        topic.clone(),
        false,
        SuppliedSchema::new(Some("io.spillway.Event".into()), SchemaType::Avro, schema),
    );
    let good = encoder
        .encode(envelope("github:delivery-1", 1), strategy.clone())
        .await
        .expect("encode through the registry");
    assert_eq!(good[0], 0, "Confluent magic byte");
    let schema_id = u32::from_be_bytes([good[1], good[2], good[3], good[4]]);
    let mut unknown_id = good.clone();
    unknown_id[1..5].copy_from_slice(&(schema_id + 1000).to_be_bytes());
    let mut bad_body = good[..5].to_vec();
    bad_body.extend_from_slice(&[0xff; 3]);
    let second = encoder
        .encode(envelope("github:delivery-2", 2), strategy)
        .await
        .unwrap();
    let rec = |v: &Vec<u8>| Rec {
        key: Some("k".into()),
        value: v.clone(),
        headers: vec![],
    };
    produce_all(
        &broker.bootstrap(),
        &topic,
        [rec(&good), rec(&unknown_id), rec(&bad_body), rec(&second)],
    )
    .await;

    let (step, seen) = ScriptedStep::new(0);
    let toml = config_toml(
        &broker.bootstrap(),
        &group,
        &topic,
        &dlq,
        &format!("[codec]\nschema_registry_url = \"{}\"", registry.url()),
    );
    let stop = CancellationToken::new();
    let (_addr, task) = start_processor(&toml, vec![Arc::new(step)], stop.clone()).await;
    wait_until(
        "both good records processed",
        Duration::from_secs(60),
        || seen.lock().unwrap().len() == 2,
    )
    .await;
    let seqs: Vec<u64> = seen.lock().unwrap().iter().map(|s| s.1).collect();
    assert_eq!(
        seqs,
        vec![1, 2],
        "payload decoded from the envelope, in key order"
    );

    let dead = read_topic(&broker.bootstrap(), &dlq, 2, Duration::from_secs(30));
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| header_str(m, "dlq.reason").unwrap_or_default().to_string())
        .collect();
    assert_eq!(reasons, vec!["unknown_schema_id", "avro_invalid"]);
    assert_eq!(
        dead[0].payload(),
        Some(&unknown_id[..]),
        "value kept byte for byte"
    );
    wait_until(
        "commit passes the poison frames",
        Duration::from_secs(30),
        || committed(&broker.bootstrap(), &group, &topic, 1).get(&0) == Some(&4),
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_envelope_is_confluent_framed_and_survives_a_registry_outage_when_warm() {
    use spillway::codec::{Codec, Envelope, EnvelopeEncoder};
    let registry = Registry::start();
    let url = registry.url();
    let topic = unique("enc");
    let encoder = EnvelopeEncoder::new(&url, Duration::from_secs(2)).unwrap();
    let envelope = Envelope {
        id: "github:72d3162e",
        source: "/webhooks/github",
        event_type: "com.github.issue_comment",
        time: Some("2026-11-22T10:00:00Z"),
        subject: None,
        delivery_id: None,
        received_at_ms: Some(1_763_805_600_000),
        data: r#"{"comment": {"body": "nice post"}}"#,
    };
    let bytes = encoder.encode(&topic, &envelope).await.expect("encodes");
    // Confluent wire format: magic 0, the big-endian schema id the registry gave
    // `<topic>-value`, then Avro binary.
    assert_eq!(bytes[0], 0);
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let latest: serde_json::Value =
        reqwest::get(format!("{url}/subjects/{topic}-value/versions/latest"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(latest["id"].as_u64(), Some(u64::from(id)), "{latest}");
    // The processor's codec reads it back with the registry's schema.
    let codec = Codec::new(&spillway::codec::CodecConfig {
        format: spillway::codec::CodecFormat::Avro,
        schema_registry_url: Some(url.clone()),
        schema_registry_timeout_ms: 2_000,
    })
    .unwrap();
    let record = rdkafka::message::OwnedMessage::new(
        Some(bytes.clone()),
        Some(b"github:72d3162e".to_vec()),
        topic.clone(),
        rdkafka::message::Timestamp::NotAvailable,
        0,
        0,
        None,
    );
    let event = codec.decode(&record).await.expect("decodes");
    assert_eq!(event.id, "github:72d3162e");
    assert_eq!(event.event_type, "com.github.issue_comment");
    assert_eq!(event.time.as_deref(), Some("2026-11-22T10:00:00Z"));
    assert_eq!(event.data["comment"]["body"], "nice post");

    // The registry goes down. A topic encoded before still encodes (the id is cached); one
    // never encoded cannot, and the error is transient (ingress answers 503).
    drop(registry);
    let again = encoder.encode(&topic, &envelope).await.expect("warm cache");
    assert_eq!(again[1..5], bytes[1..5]);
    let err = encoder
        .encode(&unique("cold"), &envelope)
        .await
        .expect_err("cold cache without a registry");
    assert!(err.is_transient(), "{err}");
}

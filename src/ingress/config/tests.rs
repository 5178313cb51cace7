//! Unit tests of the ingress configuration: defaults, bounds, sources and secrets.

use super::*;

const MINIMAL: &str = r#"
    [server]
    listen = "127.0.0.1:8443"
    plaintext = true
    [kafka]
    brokers = "127.0.0.1:9092"
    [registry]
    url = "http://127.0.0.1:8081"
    [sources.github]
    scheme = "github"
    secrets = ["s3cret"]
    event_type = { header = "x-github-event" }
    topic = "events"
"#;

fn with(extra_source: &str) -> Result<IngressConfig, ConfigError> {
    IngressConfig::from_toml(&format!("{MINIMAL}\n{extra_source}"))
}

#[test]
fn example_ingress_config_parses_and_validates() {
    let text = include_str!("../../../config/ingress.toml");
    let cfg = IngressConfig::from_toml(text).expect("config/ingress.toml must stay valid");
    assert!(cfg.sources.len() >= 4);
}

#[test]
fn every_ingress_duration_and_size_is_bounded_and_named() {
    let huge = i64::MAX.to_string();
    let cases = [
        (
            MINIMAL.replacen(
                "plaintext = true",
                &format!("plaintext = true\nbody_timeout_ms = {huge}"),
                1,
            ),
            "server.body_timeout_ms",
        ),
        (
            MINIMAL.replacen(
                "plaintext = true",
                &format!("plaintext = true\nshutdown_delay_ms = {huge}"),
                1,
            ),
            "server.shutdown_delay_ms",
        ),
        (
            MINIMAL.replacen(
                "plaintext = true",
                "plaintext = true\nunavailable_retry_after_secs = 86400000",
                1,
            ),
            "server.unavailable_retry_after_secs",
        ),
        (
            MINIMAL.replacen(
                "brokers = \"127.0.0.1:9092\"",
                &format!("brokers = \"127.0.0.1:9092\"\nlinger_ms = {huge}"),
                1,
            ),
            "kafka.linger_ms",
        ),
        // Cast to signed seconds, a huge tolerance turned negative.
        (
            MINIMAL.replacen(
                "topic = \"events\"",
                &format!("topic = \"events\"\ntolerance_secs = {huge}"),
                1,
            ),
            "sources.github.tolerance_secs",
        ),
        (
            format!("{MINIMAL}\n[replay]\nttl_secs = {huge}\n"),
            "replay.ttl_secs",
        ),
    ];
    for (toml, expected) in cases {
        match IngressConfig::from_toml(&toml) {
            Err(ConfigError::Invalid { key, message }) => {
                assert_eq!(key, expected, "{message}");
                assert!(message.contains("must be between"), "{message}");
            }
            other => panic!("{expected}: expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn minimal_ingress_config_gets_documented_defaults() {
    let cfg = with("").unwrap();
    assert_eq!(cfg.server.header_read_timeout_ms, 5_000);
    assert_eq!(cfg.server.body_timeout_ms, 10_000);
    assert_eq!(cfg.kafka.message_timeout_ms, 5_000);
    assert_eq!(cfg.replay.ttl_secs, 900);
    let gh = &cfg.sources["github"];
    assert_eq!(gh.tolerance_secs, 300);
    assert_eq!(gh.max_body_bytes, 512 * 1024);
    assert_eq!(cfg.server.max_buffered_body_bytes, 64 * 1024 * 1024);
    assert_eq!(cfg.server.shutdown_delay_ms, 0);
    assert_eq!(
        gh.event_type,
        FieldRef::Header {
            header: "x-github-event".into()
        }
    );
}

#[test]
fn plain_http_must_be_asked_for() {
    let err = IngressConfig::from_toml(&MINIMAL.replace("plaintext = true", ""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.tls"), "{err}");
}

#[test]
fn hmac_needs_a_header_and_a_delivery_id() {
    let err = with(
        r#"[sources.shop]
        scheme = "hmac"
        secrets = ["k"]
        event_type = "order"
        topic = "events""#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sources.shop.signature_header"), "{err}");
    let err = with(
        r#"[sources.shop]
        scheme = "hmac"
        signature_header = "x-shop-signature"
        secrets = ["k"]
        event_type = "order"
        topic = "events""#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sources.shop.delivery_id"), "{err}");
}

#[test]
fn hmac_settings_on_another_scheme_are_rejected() {
    let err = with(
        r#"[sources.stripe]
        scheme = "stripe"
        signature_prefix = "v1="
        secrets = ["k"]
        event_type = { json = "/type" }
        topic = "events""#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sources.stripe.signature_prefix"), "{err}");
}

#[test]
fn a_body_limit_that_kafka_could_not_take_is_refused_at_start_up() {
    let source = |limit: usize, props: &str| {
        IngressConfig::from_toml(&format!(
            "{MINIMAL}\n[kafka.properties]\n{props}\n[sources.big]\nscheme = \"github\"\n\
             secrets = [\"k\"]\nevent_type = \"e\"\ntopic = \"t\"\nmax_body_bytes = {limit}"
        ))
    };
    let err = source(1024 * 1024, "").unwrap_err().to_string();
    assert!(
        err.contains("sources.big.max_body_bytes") && err.contains("message.max.bytes"),
        "{err}"
    );
    source(1_000_000 - RECORD_OVERHEAD_BYTES, "").expect("fits the default");
    let err = source(600_000, "\"message.max.bytes\" = 500000")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(500000)"),
        "an integer literal is checked too: {err}"
    );
    source(4 * 1024 * 1024, "\"message.max.bytes\" = \"8000000\"")
        .expect("fits a raised message.max.bytes");
    let err = IngressConfig::from_toml(&MINIMAL.replace(
        "plaintext = true",
        "plaintext = true\nmax_buffered_body_bytes = 1000",
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("server.max_buffered_body_bytes"), "{err}");
}

#[test]
fn managed_producer_properties_and_their_aliases_are_refused() {
    for key in [
        "acks",
        "request.required.acks",
        "delivery.timeout.ms",
        "queue.buffering.max.ms",
    ] {
        let toml = MINIMAL.replace(
            "[registry]",
            &format!("[kafka.properties]\n\"{key}\" = \"1\"\n[registry]"),
        );
        let err = IngressConfig::from_toml(&toml).unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn replay_ttl_must_cover_twice_the_tolerance() {
    let err = with("[replay]\nttl_secs = 500").unwrap_err().to_string();
    assert!(err.contains("replay.ttl_secs"), "{err}");
}

#[test]
fn bad_rates_pointers_and_names_are_named() {
    let err = with(
        r#"[sources.x]
        scheme = "github"
        secrets = ["k"]
        rate = "ten a minute"
        event_type = "e"
        topic = "events""#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sources.x.rate"), "{err}");
    let err = with(
        r#"[sources.x]
        scheme = "stripe"
        secrets = ["k"]
        event_type = { json = "type" }
        topic = "events""#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sources.x.event_type"), "{err}");
    let err = with(
        r#"[sources.Bad]
        scheme = "github"
        secrets = ["k"]
        event_type = "e"
        topic = "events""#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sources.Bad"), "{err}");
}

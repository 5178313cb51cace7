//! Unit tests of the whole processor configuration: loading, the environment, secrets and
//! every section's rules through [`Config::validate`].

use super::*;
use crate::codec::CodecFormat;
use std::time::Duration;

const MINIMAL: &str = r#"
    [kafka]
    brokers = "127.0.0.1:9092"
    group_id = "g"
    topics = ["events"]
    [dlq]
    topic = "events.dlq"
"#;

#[test]
fn example_config_parses_and_validates() {
    let text = include_str!("../../config/example.toml");
    let cfg = Config::from_toml(text).expect("config/example.toml must stay valid");
    assert_eq!(cfg.processor.max_in_flight, 1024);
    assert!(!cfg.steps.is_empty());
    // Its templates and output schema compile too.
    let steps = crate::pipeline::build(
        &cfg,
        &crate::telemetry::Metrics::new(),
        &crate::processor::gate::Gate::new(),
    )
    .expect("example pipeline builds");
    assert_eq!(steps.len(), 1, "one pipeline, `default`");
    assert_eq!(steps[0].steps.len(), cfg.steps.len());
}

fn refused(toml: &str) -> (String, String) {
    match Config::from_toml(toml) {
        Err(ConfigError::Invalid { key, message }) => (key, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn duplicate_step_names_are_refused_naming_both_steps() {
    let two_webhooks = format!(
        "{MINIMAL}
        [[steps]]
        type = \"webhook\"
        url = \"http://127.0.0.1:1/a\"
        [[steps]]
        type = \"webhook\"
        url = \"http://127.0.0.1:1/b\"
        "
    );
    let (key, message) = refused(&two_webhooks);
    assert_eq!(key, "steps[1].name");
    assert!(
        message.contains("`webhook` is also the name of steps[0]"),
        "{message}"
    );
    let two_llms = format!(
        "{MINIMAL}
        [llm.providers.p]
        api = \"openai\"
        base_url = \"http://127.0.0.1:1\"
        [[steps]]
        type = \"llm\"
        name = \"classify\"
        provider = \"p\"
        model = \"m\"
        user = \"a\"
        [[steps]]
        type = \"slack\"
        webhook_url = \"http://127.0.0.1:1/s\"
        text = \"x\"
        [[steps]]
        type = \"llm\"
        name = \"classify\"
        provider = \"p\"
        model = \"m\"
        user = \"b\"
        "
    );
    let (key, message) = refused(&two_llms);
    assert_eq!(key, "steps[2].name");
    assert!(
        message.contains("`classify` is also the name of steps[0]"),
        "{message}"
    );
    let renamed = two_webhooks.replacen(
        "url = \"http://127.0.0.1:1/b\"",
        "url = \"http://127.0.0.1:1/b\"\nname = \"audit\"",
        1,
    );
    Config::from_toml(&renamed).expect("distinct names are fine");
}

#[test]
fn every_duration_and_size_from_outside_is_bounded_and_named() {
    let huge = i64::MAX.to_string();
    let in_kafka = |k: &str, v: &str| {
        MINIMAL.replacen(
            "group_id = \"g\"",
            &format!("group_id = \"g\"\n{k} = {v}"),
            1,
        )
    };
    let section = |t: &str, k: &str, v: &str| format!("{MINIMAL}\n[{t}]\n{k} = {v}\n");
    let cases = [
        (in_kafka("session_timeout_ms", &huge), "kafka.session_timeout_ms"),
        (in_kafka("max_poll_interval_ms", &huge), "kafka.max_poll_interval_ms"),
        (in_kafka("message_timeout_ms", &huge), "kafka.message_timeout_ms"),
        // `rebalance_timeout_ms + 2000` overflowed before it was compared.
        (section("processor", "rebalance_timeout_ms", &huge), "processor.rebalance_timeout_ms"),
        (section("processor", "commit_interval_ms", &huge), "processor.commit_interval_ms"),
        (section("processor", "shutdown_timeout_ms", &huge), "processor.shutdown_timeout_ms"),
        (section("processor", "max_in_flight", "100000000"), "processor.max_in_flight"),
        (section("processor.retry", "max_backoff_ms", &huge), "processor.retry.max_backoff_ms"),
        (section("processor.retry", "max_attempts", "4000000000"), "processor.retry.max_attempts"),
        (section("codec", "schema_registry_timeout_ms", &huge), "codec.schema_registry_timeout_ms"),
        // `Instant + open_ms` panicked in the breaker.
        (section("llm.breaker", "open_ms", &huge), "llm.breaker.open_ms"),
        (section("llm.breaker", "window_ms", &huge), "llm.breaker.window_ms"),
        (section("telemetry", "liveness_timeout_ms", &huge), "telemetry.liveness_timeout_ms"),
        (
            format!("{MINIMAL}\n[llm.providers.p]\napi = \"openai\"\nbase_url = \"http://h\"\ntimeout_ms = {huge}\n"),
            "llm.providers.p.timeout_ms",
        ),
        (
            format!("{MINIMAL}\n[[steps]]\ntype = \"slack\"\nwebhook_url = \"http://h/\"\ntext = \"x\"\npacing_ms = {huge}\n"),
            "steps[0].pacing_ms",
        ),
        (
            format!("{MINIMAL}\n[[steps]]\ntype = \"webhook\"\nurl = \"http://h/\"\ntimeout_ms = {huge}\n"),
            "steps[0].timeout_ms",
        ),
        (
            format!(
                "{MINIMAL}\n[llm.providers.p]\napi = \"openai\"\nbase_url = \"http://h\"\n\
                 requests_per_minute = {huge}\n"
            ),
            "llm.providers.p.requests_per_minute",
        ),
    ];
    for (toml, expected) in cases {
        let (key, message) = refused(&toml);
        assert_eq!(key, expected, "{message}");
        assert!(message.contains("must be between"), "{key}: {message}");
    }
    // A tiny share made a limit's refill interval overflow `Duration`.
    let tiny_share = format!(
        "{MINIMAL}\n[llm.providers.p]\napi = \"openai\"\nbase_url = \"http://h\"\n\
         requests_per_minute = 1\nshare = 1e-300\n"
    );
    assert_eq!(refused(&tiny_share).0, "llm.providers.p.share");
    // The largest accepted duration still leaves every deadline computable.
    let week = section("llm.breaker", "open_ms", &MAX_DURATION_MS.to_string());
    let config = Config::from_toml(&week).unwrap();
    let _ = std::time::Instant::now() + Duration::from_millis(config.llm.breaker.open_ms);
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let cfg = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(cfg.processor.max_in_flight, 1024);
    assert_eq!(cfg.processor.commit_interval_ms, 1000);
    assert_eq!(cfg.kafka.auto_offset_reset, "earliest");
    assert_eq!(cfg.codec.format, CodecFormat::Auto);
}

#[test]
fn unknown_key_is_rejected_with_its_name() {
    let text = format!("{MINIMAL}\n[processor]\nmax_inflight = 3\n");
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("max_inflight"), "{err}");
}

#[test]
fn zero_in_flight_names_the_key() {
    let text = format!("{MINIMAL}\n[processor]\nmax_in_flight = 0\n");
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("processor.max_in_flight"), "{err}");
}

#[test]
fn dlq_topic_equal_to_input_topic_is_rejected() {
    let text = MINIMAL.replace("events.dlq", "events");
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("dlq.topic"), "{err}");
}

#[test]
fn journal_gets_defaults_and_bad_journal_settings_name_their_key() {
    let cfg = Config::from_toml(&format!("{MINIMAL}\n[journal]\ntopic = \"j\"\n")).unwrap();
    let j = cfg.journal.expect("journal section");
    assert_eq!((j.ttl_secs, j.id_field.clone()), (86_400, None));
    // Retention outlasts the longest TTL by the margin.
    assert_eq!(j.retention_ms(), (86_400 + 3_600) * 1000);
    for (extra, key) in [
        ("topic = \"events\"", "journal.topic"),
        ("topic = \"j\"\nttl_secs = 0", "journal.ttl_secs"),
        (
            "topic = \"j\"\nttl_by_type = { \"a\" = 0 }",
            "journal.ttl_secs",
        ),
        ("topic = \"j\"\nid_field = \"order.id\"", "journal.id_field"),
        (
            "topic = \"j\"\nstore_cache_bytes = 1000",
            "journal.store_cache_bytes",
        ),
        (
            "topic = \"j\"\nrestore_stall_ms = 5",
            "journal.restore_stall_ms",
        ),
        ("topic = \"j\"\nstate_dir = \"\"", "journal.state_dir"),
        ("topic = \"j\"\nttl_secs = 999999999999", "journal.ttl_secs"),
    ] {
        let err = Config::from_toml(&format!("{MINIMAL}\n[journal]\n{extra}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{extra}: {err}");
    }
}

#[test]
fn managed_kafka_property_cannot_be_overridden() {
    let text = MINIMAL.replace(
        "[dlq]",
        "[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n[dlq]",
    );
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("enable.auto.commit"), "{err}");
}

#[test]
fn group_settings_map_to_librdkafka_and_bad_ones_name_their_key() {
    let with = |extra: &str| {
        MINIMAL.replace(
            "topics = [\"events\"]",
            &format!("topics = [\"events\"]\n{extra}"),
        )
    };
    let props = |text: &str| {
        let c = Config::from_toml(text).unwrap();
        crate::kafka::consumer_config(&c.kafka, &c.processor).unwrap()
    };
    // Incremental by default; static membership only when asked for.
    let c = props(&with(""));
    assert_eq!(
        c.get("partition.assignment.strategy"),
        Some("cooperative-sticky")
    );
    assert_eq!(c.get("group.protocol"), Some("classic"));
    assert_eq!(c.get("group.instance.id"), None);
    let c = props(&with("group_instance_id = \"pod-1\""));
    assert_eq!(c.get("group.instance.id"), Some("pod-1"));
    // KIP-848: librdkafka refuses session.timeout.ms and an assignor there.
    let c = props(&with("group_protocol = \"consumer\""));
    assert_eq!(c.get("group.protocol"), Some("consumer"));
    assert_eq!(c.get("session.timeout.ms"), None);
    assert_eq!(c.get("partition.assignment.strategy"), None);

    for (extra, key) in [
        (
            "group_protocol = \"consumer\"\npartition_assignment_strategy = \"range\"",
            "kafka.partition_assignment_strategy",
        ),
        (
            "partition_assignment_strategy = \"sticky\"",
            "kafka.partition_assignment_strategy",
        ),
        (
            "partition_assignment_strategy = \"range,cooperative-sticky\"",
            "kafka.partition_assignment_strategy",
        ),
        ("group_instance_id = \" \"", "kafka.group_instance_id"),
        (
            "group_protocol = \"consumer\"\ngroup_instance_id = \"pod-1\"",
            "kafka.group_instance_id",
        ),
        (
            "group_protocol = \"consumer\"\n[kafka.properties]\n\"heartbeat.interval.ms\" = 500",
            "heartbeat.interval.ms",
        ),
        ("group_protocol = \"eager\"", "group_protocol"),
    ] {
        let err = Config::from_toml(&with(extra)).unwrap_err().to_string();
        assert!(err.contains(key), "{extra}: {err}");
    }
    let err = Config::from_toml(&MINIMAL.replace(
        "[dlq]",
        "[kafka.properties]\n\"group.instance.id\" = \"x\"\n[dlq]",
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("group.instance.id"), "{err}");
}

#[test]
fn rebalance_timeout_must_fit_in_max_poll_interval() {
    let text = MINIMAL.replace(
        "topics = [\"events\"]",
        "topics = [\"events\"]\nmax_poll_interval_ms = 5000",
    ) + "\n[processor]\nrebalance_timeout_ms = 6000\n";
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("processor.rebalance_timeout_ms"), "{err}");
}

#[test]
fn secrets_resolve_from_env_and_file_and_never_print() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pw");
    std::fs::write(&path, "s3cret-from-file\n").unwrap();
    // A variable name unique to this test, so parallel tests cannot race on it.
    std::env::set_var("SPILLWAY_TEST_SECRET_RESOLVE", "s3cret-from-env");
    let text = MINIMAL.replace(
        "[dlq]",
        &format!(
            "[kafka.properties]\n\"sasl.username\" = {{ env = \"SPILLWAY_TEST_SECRET_RESOLVE\" }}\n\
             \"sasl.password\" = {{ file = \"{}\" }}\n\"fetch.min.bytes\" = 1\n[dlq]",
            path.display()
        ),
    );
    let cfg = Config::from_toml(&text).unwrap();
    let props = &cfg.kafka.properties;
    assert_eq!(
        props["sasl.username"].resolve("u").unwrap(),
        "s3cret-from-env"
    );
    assert_eq!(
        props["sasl.password"].resolve("p").unwrap(),
        "s3cret-from-file"
    );
    assert_eq!(props["fetch.min.bytes"].resolve("f").unwrap(), "1");
    let debug = format!("{cfg:?}");
    assert!(
        !debug.contains("s3cret"),
        "secrets leaked into Debug: {debug}"
    );
}

#[test]
fn missing_env_secret_names_the_key() {
    let v = PropertyValue::Env {
        env: "SPILLWAY_TEST_DEFINITELY_UNSET".into(),
    };
    let err = v.resolve("kafka.properties.sasl.password").unwrap_err();
    assert!(err.to_string().contains("kafka.properties.sasl.password"));
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type.
fn a_duration_past_what_toml_can_hold_from_the_environment_is_refused_not_overflowed() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("spillway.toml", MINIMAL)?;
        // u64::MAX: `rebalance_timeout_ms + 2000` overflowed (a panic in debug builds).
        jail.set_env(
            "SPILLWAY_PROCESSOR__REBALANCE_TIMEOUT_MS",
            u64::MAX.to_string(),
        );
        match Config::load(Path::new("spillway.toml")) {
            Err(ConfigError::Invalid { key, .. }) => {
                assert_eq!(key, "processor.rebalance_timeout_ms");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        Ok(())
    });
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type.
fn env_overrides_file_values() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("spillway.toml", MINIMAL)?;
        jail.set_env("SPILLWAY_PROCESSOR__MAX_IN_FLIGHT", "4096");
        jail.set_env("SPILLWAY_KAFKA__BROKERS", "other:9092");
        jail.set_env("SPILLWAY_CONFIG", "ignored.toml");
        jail.set_env("SPILLWAY_SOME_TOOL_BIN", "/usr/bin/true");
        let cfg = Config::load(Path::new("spillway.toml")).map_err(|e| e.to_string())?;
        assert_eq!(cfg.processor.max_in_flight, 4096);
        assert_eq!(cfg.kafka.brokers, "other:9092");
        Ok(())
    });
}

#[test]
fn a_step_keeps_refusing_unknown_keys_beside_its_condition_and_route() {
    let step = |extra: &str| {
        format!("{MINIMAL}\n[[steps]]\ntype = \"webhook\"\nurl = \"http://h/\"\n{extra}\n")
    };
    let err = Config::from_toml(&step("when = \"true\"\nbogus = 1")).unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
    let config = Config::from_toml(&step("when = \"data.score > 3\"")).unwrap();
    assert_eq!(config.steps[0].when.as_deref(), Some("data.score > 3"));
    assert_eq!(refused(&step("when = \"data.score >\"")).0, "steps[0].when");
    // A route names a case of a route step before it.
    assert_eq!(refused(&step("route = \"billing\"")).0, "steps[0].route");
    let routed = |case: &str| {
        format!(
            "{MINIMAL}\n[[steps]]\ntype = \"route\"\nvalue = \"{{{{ data.team }}}}\"\n\
             cases = [\"billing\", \"tech\"]\ndefault = \"general\"\n\
             [[steps]]\ntype = \"webhook\"\nurl = \"http://h/\"\nroute = \"{case}\"\n"
        )
    };
    for case in ["billing", "tech", "general"] {
        Config::from_toml(&routed(case)).unwrap_or_else(|e| panic!("{case}: {e}"));
    }
    let (key, message) = refused(&routed("sales"));
    assert_eq!(key, "steps[1].route");
    assert!(message.contains("billing, tech, general"), "{message}");
}

/// `[[pipelines]]` entries, each with one webhook step named `post`.
fn pipelines(entries: &[(&str, &str)]) -> String {
    let mut toml = MINIMAL.replace(
        "topics = [\"events\"]",
        "topics = [\"events\", \"tickets\"]",
    );
    for (name, extra) in entries {
        toml += &format!(
            "[[pipelines]]\nname = \"{name}\"\n{extra}\n[[pipelines.steps]]\ntype = \"webhook\"\n\
             name = \"post\"\nurl = \"http://127.0.0.1:1/{name}\"\n"
        );
    }
    toml
}

#[test]
fn pipelines_parse_with_their_own_topics_types_ttls_and_step_names() {
    let mut toml = pipelines(&[
        (
            "comments",
            "topics = [\"events\"]\ntypes = [\"com.example.comment\"]\n\
             [pipelines.journal]\nttl_secs = 60\nttl_by_type = { \"com.example.edit\" = 5 }",
        ),
        ("tickets", "topics = [\"tickets\"]"),
    ]);
    toml += "[journal]\ntopic = \"j\"\nttl_secs = 3600\n";
    let config = Config::from_toml(&toml).expect("two pipelines, one step name each");
    assert_eq!(config.pipelines.len(), 2);
    assert_eq!(config.pipelines[0].types, ["com.example.comment"]);
    let j = config.journal.as_ref().unwrap();
    assert_eq!((j.min_ttl_secs(), j.max_ttl_secs()), (5, 3600));
    assert_eq!(
        config.processor.unmatched,
        crate::processor::config::Unmatched::DeadLetter
    );
    let built = crate::pipeline::build(
        &config,
        &crate::telemetry::Metrics::new(),
        &crate::processor::gate::Gate::new(),
    )
    .expect("builds");
    let (c, t) = (&built[0], &built[1]);
    assert_eq!((&*c.name, c.key_prefix.as_str()), ("comments", "comments/"));
    assert!(c.takes("events", "com.example.comment"));
    assert!(!c.takes("events", "com.example.other") && !c.takes("tickets", "com.example.comment"));
    assert!(t.takes("tickets", "anything") && !t.takes("events", "anything"));
    // The most specific rule wins, the pipeline's first: its type, the journal's type, its
    // default, the journal's default.
    let secs = Duration::from_secs;
    assert_eq!(c.ttl("com.example.edit", Some(900), 3600), secs(5));
    assert_eq!(c.ttl("com.example.presence", Some(900), 3600), secs(900));
    assert_eq!(c.ttl("com.example.comment", None, 3600), secs(60));
    assert_eq!(t.ttl("com.example.comment", None, 3600), secs(3600));
    // Longer pipeline TTLs stretch the journal topic's retention too.
    let longer = toml.replace("ttl_secs = 60", "ttl_secs = 7200");
    let j = Config::from_toml(&longer).unwrap().journal.unwrap();
    assert_eq!(j.retention_ms(), (7200 + 3600) * 1000);
}

#[test]
fn pipelines_are_refused_naming_the_key_when_they_cannot_work() {
    let mut both = pipelines(&[("a", "")]);
    both += "[[steps]]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:1/x\"\n";
    for (toml, key, says) in [
        (both, "steps", "not both"),
        (pipelines(&[("Bad Name", "")]), "pipelines[0].name", "a-z"),
        (pipelines(&[("a", ""), ("a", "")]), "pipelines[1].name", "pipelines[0]"),
        (
            pipelines(&[("a", "topics = [\"elsewhere\"]")]),
            "pipelines[0].topics",
            "not one of kafka.topics",
        ),
        (
            pipelines(&[("a", "[pipelines.journal]\nttl_secs = 60")]),
            "pipelines[0].journal",
            "no [journal]",
        ),
        (
            pipelines(&[("a", "")])
                + "[[pipelines.steps]]\ntype = \"webhook\"\nname = \"post\"\nurl = \"http://127.0.0.1:1/y\"\n",
            "pipelines[0].steps[1].name",
            "is also the name of pipelines[0].steps[0]",
        ),
        (
            pipelines(&[("a", ""), ("b", "topics = [\"tickets\"]")]),
            "pipelines[1]",
            "never reached: pipelines[0]",
        ),
        (
            pipelines(&[("a", "")]) + "[processor]\nunmatched = \"drop\"\n",
            "",
            "unknown variant",
        ),
    ] {
        match Config::from_toml(&toml) {
            Err(ConfigError::Invalid { key: k, message }) => {
                assert_eq!(k, key, "{message}");
                assert!(message.contains(says), "{key}: {message}");
            }
            Err(e) => assert!(key.is_empty() && e.to_string().contains(says), "{e}"),
            Ok(_) => panic!("{key}: accepted"),
        }
    }
}

#[test]
fn budgets_are_refused_naming_the_key_when_they_cannot_work() {
    let example = include_str!("../../config/example.toml");
    let with = |limits: &str| format!("{example}\n[llm.budget]\n{limits}");
    let limit =
        |extra: &str| format!("[[llm.budget.limits]]\nname = \"b\"\nperiod = \"day\"\n{extra}\n");
    let build = |toml: &str| -> Result<(), ConfigError> {
        let cfg = Config::from_toml(toml)?;
        crate::pipeline::build(
            &cfg,
            &crate::telemetry::Metrics::new(),
            &crate::processor::gate::Gate::new(),
        )
        .map(|_| ())
    };
    // A budget that works: USD over the priced classify step, for one source.
    build(&with(&limit(
        "usd = 5.0\nsource = \"/webhooks/blog\"\nstep = \"classify\"",
    )))
    .unwrap();
    let unpriced =
        with(&limit("usd = 5.0")).replace("[llm.prices.mock-small]", "[llm.prices.other]");
    for (toml, key, says) in [
        (with(&limit("")), "llm.budget.limits.b.usd", "exactly one"),
        (
            with(&limit("usd = 1.0\ntokens = 5")),
            "llm.budget.limits.b.usd",
            "exactly one",
        ),
        (
            with(&limit("usd = -1.0")),
            "llm.budget.limits.b.usd",
            "above 0",
        ),
        (
            with(&limit("tokens = 0")),
            "llm.budget.limits.b.tokens",
            "above 0",
        ),
        (
            with(&(limit("tokens = 5") + &limit("tokens = 6"))),
            "llm.budget.limits.b.name",
            "two budgets",
        ),
        (
            with(&limit("tokens = 5\npipeline = \"tickets\"")),
            "llm.budget.limits.b.pipeline",
            "no pipeline",
        ),
        (
            with(&limit("tokens = 5\nstep = \"clasify\"")),
            "llm.budget.limits.b.step",
            "no step",
        ),
        (unpriced, "steps.classify.model", "no price for mock-small"),
    ] {
        match build(&toml) {
            Err(ConfigError::Invalid { key: k, message }) => {
                assert_eq!(k, key, "{message}");
                assert!(message.contains(says), "{key}: {message}");
            }
            other => panic!("{key}: {other:?}"),
        }
    }
}

//! Signatures of every scheme, rotation, clock skew, replays and delivery ids.

use super::*;

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
        assert_eq!(*event.data, sent, "the sender's JSON, unchanged");
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

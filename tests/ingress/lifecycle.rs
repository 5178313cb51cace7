//! Bad input, TLS, shutdown and SIGTERM under load, hang-ups, the memory budget, oversized records.

use super::*;
use crate::limits::read_status;

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

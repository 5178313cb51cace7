//! Bodies (size, streaming, slow clients), per-source and per-IP limits.

use super::*;

/// Reads an HTTP/1.1 response head from a raw connection: the status code.
pub(crate) async fn read_status(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> Option<u16> {
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
pub(crate) async fn stream_body(
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

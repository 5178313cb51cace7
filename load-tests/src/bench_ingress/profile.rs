//! `bench-ingress parts` (each step of the request path in process) and `closed-loop` (the rate 1, 8 and 64 records in flight get).

use super::*;

/// `bench-ingress closed-loop`: the ceiling 64 connections put on any ingress that answers
/// after the ack. 64 tasks each keep one record in flight on a raw producer, as 64 HTTP/1.1
/// connections do; prints the rate, ack latency and CPU per record of this process and the broker.
pub(crate) async fn closed_loop() {
    let (broker, bootstrap) = start_broker();
    let topic = "bench-closed";
    create_topic(&bootstrap, topic, PARTITIONS).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms().to_string())
        .set("message.timeout.ms", "5000")
        .create()
        .expect("producer");
    let warm = raw_step(&producer, topic, 1 << 30, 64, 200.0).await;
    assert_eq!(warm.failed, 0, "warm-up failed");
    let producer = Arc::new(producer);
    for in_flight in [1usize, 8, 64] {
        let (cpu0, broker0) = (self_cpu(), process_cpu(broker.pid()));
        let t0 = Instant::now();
        let run = Duration::from_secs(3);
        let tasks: Vec<_> = (0..in_flight)
            .map(|t| {
                let producer = producer.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let value = body("closed");
                    let key = format!("k{t}");
                    while t0.elapsed() < run {
                        let s = Instant::now();
                        let r = producer
                            .send_result(FutureRecord::to(topic).key(&key).payload(&value))
                            .map_err(|(e, _)| e)
                            .expect("enqueue")
                            .await;
                        assert!(matches!(r, Ok(Ok(_))), "delivery failed: {r:?}");
                        lat.push(s.elapsed().as_micros() as u32);
                    }
                    lat
                })
            })
            .collect();
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.expect("task"));
        }
        let secs = t0.elapsed().as_secs_f64();
        let n = lat.len() as f64;
        let (cpu, broker_cpu) = (self_cpu() - cpu0, process_cpu(broker.pid()) - broker0);
        let (p50, p99, _) = percentiles(lat);
        println!(
            "{in_flight:>3} in flight, linger.ms {}: {:>7.0} records/s, ack p50 {p50:.2} ms p99 {p99:.2} ms; CPU µs/record: producer {:.1}, broker {:.1}",
            linger_ms(),
            n / secs,
            cpu * 1e6 / n,
            broker_cpu * 1e6 / n
        );
    }
}

/// `bench-ingress parts`: CPU µs of each step of the ingress's request path, in process, one
/// at a time over many 1 KB requests: what the ingress spends beyond hyper and librdkafka.
pub(crate) async fn parts() {
    use spillway::codec::{Envelope, EnvelopeEncoder};
    use spillway::ingress::replay::{Claim, ReplayCache};
    let registry = start_registry();
    const N: usize = 50_000;
    let secret = Secret::new(&Scheme::StandardWebhooks, WHSEC).expect("secret");
    let ts = unix_secs();
    let requests: Vec<(hyper::HeaderMap, Vec<u8>)> = (0..N)
        .map(|i| {
            let id = format!("msg_{i}");
            let b = body(&id);
            let mut h = hyper::HeaderMap::new();
            h.insert("webhook-id", id.parse().expect("header"));
            h.insert("webhook-timestamp", ts.to_string().parse().expect("header"));
            h.insert(
                "webhook-signature",
                secret
                    .sign_standard_webhooks(&id, ts, &b)
                    .parse()
                    .expect("header"),
            );
            (h, b)
        })
        .collect();
    let time = |name: &str, t0: Instant| {
        println!(
            "  {name:<34} {:>6.2} µs/request",
            t0.elapsed().as_secs_f64() * 1e6 / N as f64
        );
    };
    println!("# Ingress request path, in process, {N} requests of {BODY_BYTES} B");
    let t0 = Instant::now();
    for (h, b) in &requests {
        spillway::ingress::auth::verify(
            &Scheme::StandardWebhooks,
            std::slice::from_ref(&secret),
            h,
            b,
            ts,
            300,
        )
        .expect("verifies");
    }
    time("signature (Standard Webhooks)", t0);
    let t0 = Instant::now();
    for (_, b) in &requests {
        std::hint::black_box(spillway::ingress::source::parse_json(b).expect("json"));
    }
    time("JSON parse", t0);
    let cache = ReplayCache::new(Duration::from_secs(900), 1_000_000);
    let t0 = Instant::now();
    for i in 0..N {
        match cache.claim(&format!("bench:msg_{i}")).await {
            Claim::First(f) => f.accepted(),
            Claim::Duplicate => panic!("fresh id"),
        }
    }
    time("replay cache claim + accept", t0);
    // Memory: a million more ids, as many as `replay.max_ids` defaults to.
    let rss0 = rss_kb();
    for i in N..N + 1_000_000 {
        if let Claim::First(f) = cache.claim(&format!("bench:msg_{i}")).await {
            f.accepted();
        }
    }
    println!(
        "  {:<34} {:>6.0} bytes/id (RSS growth over 1,000,000 ids)",
        "replay cache memory",
        (rss_kb() - rss0) as f64 * 1024.0 / 1e6
    );
    let encoder = EnvelopeEncoder::new(&registry.url(), Duration::from_secs(5)).expect("encoder");
    let data = String::from_utf8(body("x")).expect("utf-8");
    fn envelope<'a>(id: &'a str, data: &'a str) -> Envelope<'a> {
        Envelope {
            id,
            source: "/webhooks/bench",
            event_type: "com.example.blog.comment",
            time: Some("2026-12-04T17:03:09.123Z"),
            subject: None,
            delivery_id: None,
            received_at_ms: Some(1),
            data,
        }
    }
    encoder
        .encode("bench-parts", &envelope("warm", &data))
        .await
        .expect("registers");
    let t0 = Instant::now();
    for i in 0..N {
        let id = format!("bench:msg_{i}");
        std::hint::black_box(
            encoder
                .encode("bench-parts", &envelope(&id, &data))
                .await
                .expect("encodes"),
        );
    }
    time("Avro envelope (cached schema id)", t0);
    let t0 = Instant::now();
    for i in 0..N {
        std::hint::black_box(spillway::codec::rfc3339_millis(i as i64));
    }
    time("ce_time text", t0);
}

/// This process's resident set, in kB.
pub(crate) fn rss_kb() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

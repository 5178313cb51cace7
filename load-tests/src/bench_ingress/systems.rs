//! The systems measured: serving children (the ingress, an HMAC-only server, verify-then-produce), readiness waits and reading the topic back.

use super::*;

/// Starts this binary again as `role` (a serving child whose CPU is measured on its own).
pub(crate) fn spawn_child(args: &[&str]) -> Child {
    Command::new(std::env::current_exe().expect("own path"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn serving child")
}

pub(crate) struct Killed(pub(crate) Child);
impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; SIGTERM lets the ingress drain and flush.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

pub(crate) async fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn wait_ready(metrics: SocketAddr) {
    let url = format!("http://{metrics}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        assert!(Instant::now() < deadline, "ingress never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ids of every record in `topic`, with how often each occurs.
/// Reads every partition of `topic` to its end. The end is where a fetch reports
/// `PartitionEOF`, not the ListOffsets high watermark: tansu 0.6 can answer ListOffsets with
/// an offset below the log end (the base of the last batch), which would make records that
/// are there look lost. Returns (records read, the watermarks' sum, distinct keys).
pub(crate) fn topic_ids(bootstrap: &str, topic: &str) -> (usize, i64, HashSet<String>) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("verify-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut watermarks = 0i64;
    for p in 0..PARTITIONS {
        let (lo, hi) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        watermarks += hi - lo;
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .expect("offset");
    }
    c.assign(&tpl).expect("assign");
    let (mut total, mut ids) = (0usize, HashSet::new());
    let mut at_end = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    while at_end.len() < PARTITIONS as usize && Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                total += 1;
                if let Some(k) = m.key() {
                    ids.insert(String::from_utf8_lossy(k).into_owned());
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            _ => {}
        }
    }
    if at_end.len() < PARTITIONS as usize {
        println!("WARNING: {topic} was not read to its end before the deadline; the counts below are incomplete");
    }
    (total, watermarks, ids)
}

// ---------------------------------------------------------------------------------------
// Serving children.

/// `bench-ingress serve-hmac ADDR [BOOTSTRAP TOPIC]`: reads each body, verifies it like the
/// ingress and answers 202; with a broker, first produces the raw body keyed by its
/// `webhook-id` (idempotent, `acks=all`) and answers after the delivery report: the floor
/// of any verify-then-produce service, with none of the ingress's other work.
pub(crate) async fn serve_hmac(addr: SocketAddr, kafka: Option<(String, String)>) {
    use http_body_util::{BodyExt, Full};
    use hyper::{Response, StatusCode};
    let secret = Arc::new(Secret::new(&Scheme::StandardWebhooks, WHSEC).expect("secret"));
    let producer = kafka.map(|(bootstrap, topic)| {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger_ms().to_string())
            .set("message.timeout.ms", "5000")
            .create()
            .expect("producer");
        Arc::new((p, topic))
    });
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let secret = secret.clone();
        let producer = producer.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let secret = secret.clone();
                    let producer = producer.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let bytes = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let verified = spillway::ingress::auth::verify(
                            &Scheme::StandardWebhooks,
                            std::slice::from_ref(&secret),
                            &parts.headers,
                            &bytes,
                            unix_secs(),
                            300,
                        );
                        let mut status = if verified.is_ok() {
                            StatusCode::ACCEPTED
                        } else {
                            StatusCode::UNAUTHORIZED
                        };
                        if let (Some(p), true) = (&producer, verified.is_ok()) {
                            let (producer, topic) = &**p;
                            let key = parts
                                .headers
                                .get("webhook-id")
                                .map(|v| format!("bench:{}", v.to_str().unwrap_or("")))
                                .unwrap_or_default();
                            let delivered = match producer
                                .send_result(FutureRecord::to(topic).key(&key).payload(&bytes[..]))
                            {
                                Ok(d) => matches!(d.await, Ok(Ok(_))),
                                Err(_) => false,
                            };
                            if !delivered {
                                status = StatusCode::SERVICE_UNAVAILABLE;
                            }
                        }
                        let mut r = Response::new(Full::new(Bytes::from_static(
                            br#"{"status":"accepted"}"#,
                        )));
                        *r.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `bench-ingress serve-ingress CONFIG`: the ingress service exactly as `spillway ingress`
/// runs it.
pub(crate) async fn serve_ingress(config: &str) {
    spillway::telemetry::init_logging(spillway::telemetry::LogFormat::Text);
    let config = spillway::ingress::config::IngressConfig::load(std::path::Path::new(config))
        .expect("bench ingress config");
    spillway::ingress::run(config, spillway::shutdown::on_signal())
        .await
        .expect("ingress ran");
}

// ---------------------------------------------------------------------------------------

//! Kafka and the registry down or failing: 503 with Retry-After, never 2xx without the record.

use super::*;

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

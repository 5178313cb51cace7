//! The provider simulator (`spillway mock-llm`) behaves like the providers it stands in for.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use spillway_mock_llm::{estimate_tokens, label_for, serve, SimulatorConfig, Stats};
use tokio_util::sync::CancellationToken;

async fn start(tune: impl FnOnce(&mut SimulatorConfig)) -> (String, CancellationToken) {
    let mut config = SimulatorConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    tune(&mut config);
    let stop = CancellationToken::new();
    let (addr, _task) = serve(config, stop.clone()).await.expect("simulator starts");
    (format!("http://{addr}"), stop)
}

fn openai(prompt: &str, max_tokens: u64) -> Value {
    json!({"model": "gpt-mock", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": prompt}]})
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request")
}

async fn stats(base: &str) -> Stats {
    reqwest::get(format!("{base}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn openai_answers_are_deterministic_with_exact_usage() {
    let (base, _stop) = start(|_| {}).await;
    let url = format!("{base}/v1/chat/completions");
    let prompt = "Classify: I love this blog post!";
    let a: Value = post(&url, &openai(prompt, 512)).await.json().await.unwrap();
    let b: Value = post(&url, &openai(prompt, 512)).await.json().await.unwrap();
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );
    let content = a["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.starts_with(&format!("label: {}", label_for(prompt))));
    assert_eq!(
        a["usage"]["prompt_tokens"].as_u64().unwrap(),
        estimate_tokens(&format!("{prompt}\n"))
    );
    let completion = a["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(content.split_whitespace().count() as u64, completion + 1);
    let s = stats(&base).await;
    assert_eq!((s.received, s.completed), (2, 2));
    assert_eq!(s.output_tokens, 2 * completion);
}

#[tokio::test]
async fn anthropic_messages_have_the_messages_api_shape() {
    let (base, _stop) = start(|c| c.output_tokens = 7).await;
    let body = json!({"model": "claude-mock", "max_tokens": 100, "system": "Be brief.",
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
    let r: Value = post(&format!("{base}/v1/messages"), &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["type"], "message");
    assert_eq!(r["content"][0]["type"], "text");
    assert_eq!(r["usage"]["output_tokens"], 7);
    assert_eq!(r["usage"]["input_tokens"], estimate_tokens("Be brief.hi\n"));
    let missing = json!({"model": "m", "messages": []});
    let r = post(&format!("{base}/v1/messages"), &missing).await;
    assert_eq!(r.status(), 400, "Anthropic requires max_tokens");
}

#[tokio::test]
async fn over_the_request_limit_answers_429_with_retry_after_and_headers() {
    let (base, _stop) = start(|c| c.rpm = 60).await;
    let url = format!("{base}/v1/chat/completions");
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    let mut admitted = 0u64;
    let mut refusal = None;
    for _ in 0..80 {
        let r = client
            .post(&url)
            .json(&openai("x", 10))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => admitted += 1,
            429 => {
                refusal.get_or_insert(r);
            }
            other => panic!("unexpected status {other}"),
        }
    }
    // The bucket holds one minute's worth (60) and refills one per second: never more.
    let refill = started.elapsed().as_secs_f64().ceil() as u64;
    assert!(admitted >= 60, "the full burst is admitted: {admitted}");
    assert!(admitted <= 60 + refill, "{admitted} admitted in {refill} s");
    let r = refusal.expect("requests over the limit are refused");
    let h = r.headers();
    let retry: f64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (1.0..=2.0).contains(&retry),
        "about one request per second refills: {retry}"
    );
    assert!(h.contains_key("retry-after-ms"));
    assert_eq!(h["x-ratelimit-limit-requests"], "60");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let s = stats(&base).await;
    assert_eq!(s.admitted, admitted);
    assert_eq!(s.rate_limited, 80 - admitted);
}

#[tokio::test]
async fn output_tokens_are_reserved_at_admission_and_settled_after() {
    // 1,000 output tokens per minute; each answer uses 100 of the 600 it reserves.
    let (base, _stop) = start(|c| {
        c.output_tpm = 1_000;
        c.output_tokens = 100;
    })
    .await;
    let url = format!("{base}/v1/chat/completions");
    assert_eq!(post(&url, &openai("a", 600)).await.status(), 200);
    // Without the refund only 400 would remain and this would be refused.
    assert_eq!(post(&url, &openai("b", 600)).await.status(), 200);
    // About 800 remain: reserving 900 must wait.
    let r = post(&url, &openai("c", 900)).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
}

#[tokio::test]
async fn scripted_faults_answer_like_providers() {
    let (base, _stop) = start(|c| c.script = "500,529,quota,overflow,malformed,ok".into()).await;
    let url = format!("{base}/v1/chat/completions");
    let mut got = Vec::new();
    for _ in 0..6 {
        let r = post(&url, &openai("x", 10)).await;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        got.push((status, serde_json::from_str::<Value>(&text).ok()));
    }
    assert_eq!(got[0].0, 500);
    assert_eq!(got[1].0, 529);
    assert_eq!(got[2].0, 429);
    assert_eq!(
        got[2].1.as_ref().unwrap()["error"]["type"],
        "insufficient_quota"
    );
    assert_eq!(got[3].0, 400);
    assert_eq!(
        got[3].1.as_ref().unwrap()["error"]["code"],
        "context_length_exceeded"
    );
    assert_eq!(got[4].0, 200);
    assert!(got[4].1.is_none(), "malformed body does not parse");
    assert_eq!(got[5].0, 200);
    let s = stats(&base).await;
    assert_eq!(
        (
            s.server_errors,
            s.overloaded,
            s.quota_errors,
            s.context_overflows,
            s.malformed,
            s.completed
        ),
        (1, 1, 1, 1, 1, 1)
    );
}

#[tokio::test]
async fn a_hang_never_answers_until_the_client_gives_up() {
    let (base, _stop) = start(|c| c.script = "hang".into()).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&openai("x", 10))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout());
    assert_eq!(stats(&base).await.hung, 1);
}

#[tokio::test]
async fn a_prompt_over_the_context_window_is_a_context_overflow() {
    let (base, _stop) = start(|c| c.context_tokens = 50).await;
    let r = post(
        &format!("{base}/v1/chat/completions"),
        &openai(&"word ".repeat(100), 10),
    )
    .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded");
}

#[tokio::test]
async fn anthropic_refusals_carry_anthropic_rate_limit_headers() {
    let (base, _stop) = start(|c| {
        c.rpm = 1;
        c.output_tpm = 10_000;
    })
    .await;
    let url = format!("{base}/v1/messages");
    let body = json!({"model": "claude-mock", "max_tokens": 100,
                      "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&url, &body).await.status(), 200);
    let r = post(&url, &body).await;
    assert_eq!(r.status(), 429);
    let h = r.headers();
    assert!(h.contains_key("retry-after"));
    assert_eq!(h["anthropic-ratelimit-requests-limit"], "1");
    assert_eq!(h["anthropic-ratelimit-requests-remaining"], "0");
    assert_eq!(h["anthropic-ratelimit-output-tokens-limit"], "10000");
    assert!(h.contains_key("anthropic-ratelimit-output-tokens-reset"));
    assert!(
        !h.contains_key("anthropic-ratelimit-input-tokens-limit"),
        "unlimited: no header"
    );
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["type"], "rate_limit_error");
}

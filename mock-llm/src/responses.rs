//! What the simulator answers: deterministic labels and token counts from the prompt, provider
//! error bodies and rate-limit headers for each API.

use super::*;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value as Json};
use std::time::Duration;

/// Approximate token count: one token per four characters, at least one.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// The prompt text of a request: every message's text content, system included.
pub(crate) fn prompt_text(api: Api, req: &Json) -> Option<String> {
    let mut out = String::new();
    if api == Api::Anthropic {
        match &req["system"] {
            Json::String(s) => out.push_str(s),
            Json::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .for_each(|t| out.push_str(t)),
            _ => {}
        }
    }
    for m in req["messages"].as_array()? {
        match &m["content"] {
            Json::String(s) => out.push_str(s),
            Json::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .for_each(|t| out.push_str(t)),
            _ => return None,
        }
        out.push('\n');
    }
    Some(out)
}

/// FNV-1a: a stable hash, so answers are the same across runs and platforms.
pub(crate) fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The text of the first user message: the label depends on it alone, so a system prompt or
/// a repair conversation does not change the answer.
pub(crate) fn first_user_text(req: &Json) -> String {
    let Some(first) = req["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "user"))
    else {
        return String::new();
    };
    match &first["content"] {
        Json::String(s) => s.clone(),
        Json::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// The deterministic label the simulator answers for a first user message.
pub fn label_for(prompt: &str) -> &'static str {
    ["positive", "negative", "neutral"][(stable_hash(prompt) % 3) as usize]
}

pub(crate) fn answer(prompt: &str, tokens: u32, json_mode: bool) -> String {
    let label = label_for(prompt);
    let head = if json_mode {
        format!(r#"{{"label":"{label}"}}"#)
    } else {
        format!("label: {label}")
    };
    // One filler word per remaining token keeps `usage` exact for the simulator's accounting.
    let mut text = head;
    for _ in 1..tokens {
        text.push_str(if json_mode { " " } else { " ok" });
    }
    text
}

pub(crate) fn bad_request(s: &Shared, api: Api, message: &str) -> Response {
    lock(&s.stats).bad_requests += 1;
    error(
        api,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
        HeaderMap::new(),
    )
}

pub(crate) fn error(
    api: Api,
    status: StatusCode,
    kind: &str,
    message: &str,
    headers: HeaderMap,
) -> Response {
    let body = match api {
        Api::OpenAi => {
            let code = match kind {
                "api_error" | "overloaded_error" => Json::Null,
                other => Json::String(other.to_string()),
            };
            let error_type = match kind {
                "insufficient_quota" => "insufficient_quota",
                "rate_limit_exceeded" => "requests",
                "context_length_exceeded" | "invalid_request_error" => "invalid_request_error",
                _ => "server_error",
            };
            json!({"error": {"message": message, "type": error_type, "code": code}})
        }
        Api::Anthropic => {
            let error_type = match kind {
                "rate_limit_exceeded" => "rate_limit_error",
                "insufficient_quota" => "billing_error",
                "context_length_exceeded" | "invalid_request_error" => "invalid_request_error",
                "overloaded_error" => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": error_type, "message": message}})
        }
    };
    (status, headers, axum::Json(body)).into_response()
}

pub(crate) fn secs_header(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

/// Rate-limit headers in the provider's dialect, plus `retry-after` on a refusal.
pub(crate) fn limit_headers(api: Api, l: &Limits, retry: Option<Duration>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &str, value: String| {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            h.insert(n, v);
        }
    };
    if let Some(wait) = retry {
        put(
            "retry-after",
            wait.as_secs_f64().ceil().max(1.0).to_string(),
        );
        put("retry-after-ms", wait.as_millis().max(1).to_string());
    }
    let limit = |b: &Bucket| (b.limit_per_minute as u64).to_string();
    match api {
        // x-ratelimit-{limit,remaining,reset}-{requests,tokens}; reset as a duration.
        Api::OpenAi => {
            let tokens = if l.output.unlimited() {
                &l.input
            } else {
                &l.output
            };
            for (kind, b) in [("requests", &l.requests), ("tokens", tokens)] {
                if b.unlimited() {
                    continue;
                }
                put(&format!("x-ratelimit-limit-{kind}"), limit(b));
                put(
                    &format!("x-ratelimit-remaining-{kind}"),
                    b.remaining().to_string(),
                );
                put(&format!("x-ratelimit-reset-{kind}"), secs_header(b.reset()));
            }
        }
        // anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset};
        // reset as the Unix time the bucket is full again.
        Api::Anthropic => {
            for (kind, b) in [
                ("requests", &l.requests),
                ("input-tokens", &l.input),
                ("output-tokens", &l.output),
            ] {
                if b.unlimited() {
                    continue;
                }
                let full_at = (std::time::SystemTime::now() + b.reset())
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                put(&format!("anthropic-ratelimit-{kind}-limit"), limit(b));
                put(
                    &format!("anthropic-ratelimit-{kind}-remaining"),
                    b.remaining().to_string(),
                );
                put(
                    &format!("anthropic-ratelimit-{kind}-reset"),
                    full_at.to_string(),
                );
            }
        }
    }
    h
}

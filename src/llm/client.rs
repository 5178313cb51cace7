//! One provider account over HTTP: OpenAI-compatible chat completions or Anthropic Messages.
//!
//! A [`Provider`] sends exactly one request per [`Provider::complete`] call: no retries here
//! (the processor's worker owns them), and every outcome is classified as
//! `../shared/conventions.md` says, together with the rate-limit headers the answer carried.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::StatusCode;
use serde_json::{json, Value as Json};

use crate::config::ConfigError;
use crate::llm::config::ProviderApi;
use crate::llm::config::ProviderConfig;

/// Who said a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The prompt.
    User,
    /// An earlier answer (sent back with a repair request).
    Assistant,
}

/// One chat message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Author.
    pub role: Role,
    /// Text.
    pub content: String,
}

/// A chat request, independent of the wire API.
#[derive(Debug, Clone)]
pub struct ChatRequest<'a> {
    /// Model name.
    pub model: &'a str,
    /// System prompt.
    pub system: Option<&'a str>,
    /// Conversation, starting with the user prompt.
    pub messages: &'a [Message],
    /// Most output tokens.
    pub max_tokens: u32,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Ask for a JSON object (OpenAI `response_format`).
    pub json: bool,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The answer text.
    pub text: String,
    /// Prompt tokens the provider counted.
    pub input_tokens: u64,
    /// Output tokens the provider counted.
    pub output_tokens: u64,
}

/// Rate-limit state a provider reported with an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateHeaders {
    /// Requests left in the current window.
    pub remaining_requests: Option<u64>,
    /// Combined tokens left (OpenAI `x-ratelimit-remaining-tokens`, Anthropic `-tokens-`).
    pub remaining_tokens: Option<u64>,
    /// Input tokens left (Anthropic).
    pub remaining_input_tokens: Option<u64>,
    /// Output tokens left (Anthropic).
    pub remaining_output_tokens: Option<u64>,
    /// `retry-after-ms` or `retry-after`.
    pub retry_after: Option<Duration>,
}

/// Why a request failed, classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// 429 for a rate limit: wait, then try again.
    #[error("rate limited (429)")]
    RateLimited,
    /// 5xx, 529, 408 or 409: the provider is unwell; transient.
    #[error("provider unavailable ({0})")]
    Unavailable(u16),
    /// No full answer within the attempt timeout.
    #[error("timed out")]
    Timeout,
    /// Connection refused, reset or similar.
    #[error("connection failed: {0}")]
    Connect(String),
    /// A 200 whose body is not the API's shape.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// `insufficient_quota`: the account cannot pay; retrying cannot help until a human acts.
    #[error("insufficient quota: {0}")]
    Quota(String),
    /// 401 or 403: the key is wrong or revoked.
    #[error("authentication failed ({0})")]
    Auth(u16),
    /// The prompt plus `max_tokens` does not fit the model's context window.
    #[error("context window exceeded: {0}")]
    ContextOverflow(String),
    /// A 3xx: the configured base URL points elsewhere. Redirects are never followed (a POST
    /// would become a GET, and the API key would go to the other host). Like an auth failure,
    /// it is the account's configuration that is wrong, not the event: the breaker opens, an
    /// alert fires, the fallback chain is tried, and events wait instead of dead-lettering.
    #[error("provider {0}")]
    Redirect(String),
    /// Any other 4xx: the request itself is wrong.
    #[error("request rejected ({status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The provider's error message.
        message: String,
    },
}

/// What the caller should do with a [`CallError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Flow control: wait for the limit, never counts against the breaker.
    RateLimited,
    /// Transient: retry; counts against the breaker.
    Transient,
    /// The account is unusable (quota, auth): open the breaker and alert.
    Fatal,
    /// Deterministic: the event goes to the DLQ; the provider is healthy.
    Deterministic,
}

impl CallError {
    /// Stable code for metrics and `dlq.reason`.
    pub fn code(&self) -> &'static str {
        match self {
            CallError::RateLimited => "llm_rate_limited",
            CallError::Unavailable(_) => "llm_unavailable",
            CallError::Timeout => "llm_timeout",
            CallError::Connect(_) => "llm_connect",
            CallError::Malformed(_) => "llm_malformed_response",
            CallError::Quota(_) => "llm_insufficient_quota",
            CallError::Auth(_) => "llm_auth",
            CallError::ContextOverflow(_) => "llm_context_overflow",
            CallError::Rejected { .. } => "llm_rejected",
            CallError::Redirect(_) => "llm_redirect",
        }
    }

    /// How to treat it.
    pub fn class(&self) -> ErrorClass {
        match self {
            CallError::RateLimited => ErrorClass::RateLimited,
            CallError::Unavailable(_)
            | CallError::Timeout
            | CallError::Connect(_)
            | CallError::Malformed(_) => ErrorClass::Transient,
            CallError::Quota(_) | CallError::Auth(_) | CallError::Redirect(_) => ErrorClass::Fatal,
            CallError::ContextOverflow(_) | CallError::Rejected { .. } => ErrorClass::Deterministic,
        }
    }
}

/// A configured provider account.
pub struct Provider {
    name: String,
    api: ProviderApi,
    endpoint: reqwest::Url,
    client: reqwest::Client,
    timeout: Duration,
}

impl Provider {
    /// Builds the client; the API key is resolved now and kept in a sensitive header.
    pub fn new(name: &str, config: &ProviderConfig) -> Result<Provider, ConfigError> {
        let key = |k: &str| format!("llm.providers.{name}.{k}");
        let invalid = |k: String, message: String| ConfigError::Invalid { key: k, message };
        let base = config
            .base_url
            .get(&key("base_url"))?
            .0
            .as_str()
            .trim_end_matches('/');
        let path = match config.api {
            ProviderApi::OpenAi => "/v1/chat/completions",
            ProviderApi::Anthropic => "/v1/messages",
        };
        // A base URL that already ends in /v1 (common for OpenAI-compatible servers) is fine.
        let url = match base.strip_suffix("/v1") {
            Some(stem) => format!("{stem}{path}"),
            None => format!("{base}{path}"),
        };
        let endpoint =
            reqwest::Url::parse(&url).map_err(|e| invalid(key("base_url"), e.to_string()))?;
        let mut headers = HeaderMap::new();
        if let Some(api_key) = &config.api_key {
            let secret = api_key.resolve(&key("api_key"))?;
            let (name, value) = match config.api {
                ProviderApi::OpenAi => ("authorization", format!("Bearer {secret}")),
                ProviderApi::Anthropic => ("x-api-key", secret),
            };
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| invalid(key("api_key"), "is not a valid header value".into()))?;
            value.set_sensitive(true);
            headers.insert(HeaderName::from_static(name), value);
        }
        if config.api == ProviderApi::Anthropic {
            headers.insert(
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static("2023-06-01"),
            );
        }
        for (h, v) in &config.headers {
            let k = key(&format!("headers.{h}"));
            let resolved = v.resolve(&k)?;
            let name = HeaderName::from_bytes(h.as_bytes())
                .map_err(|e| invalid(k.clone(), e.to_string()))?;
            let mut value =
                HeaderValue::from_str(&resolved).map_err(|e| invalid(k, e.to_string()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let timeout = Duration::from_millis(config.timeout_ms);
        let client = crate::outbound::client(None, timeout.min(Duration::from_secs(10)), headers)
            .map_err(|e| invalid(key("base_url"), e.to_string()))?;
        Ok(Provider {
            name: name.to_string(),
            api: config.api,
            endpoint,
            client,
            timeout,
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one request. The attempt timeout covers connecting, sending and reading the whole
    /// answer; when it fires the connection is dropped, so nothing keeps running.
    pub async fn complete(
        &self,
        req: &ChatRequest<'_>,
    ) -> (Result<Completion, CallError>, RateHeaders) {
        let body = match self.api {
            ProviderApi::OpenAi => openai_body(req),
            ProviderApi::Anthropic => anthropic_body(req),
        };
        let sent = self
            .client
            .post(self.endpoint.clone())
            .timeout(self.timeout)
            .json(&body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => return (Err(transport_error(e)), RateHeaders::default()),
        };
        let status = response.status();
        if let Some(message) = crate::outbound::redirect_message(status, response.headers()) {
            return (Err(CallError::Redirect(message)), RateHeaders::default());
        }
        let headers = rate_headers(self.api, response.headers());
        let bytes = match response.bytes().await {
            Ok(b) => b,
            Err(e) => return (Err(transport_error(e)), headers),
        };
        let result = if status.is_success() {
            parse_completion(self.api, &bytes)
        } else {
            Err(classify_error(status, &bytes))
        };
        (result, headers)
    }
}

fn transport_error(e: reqwest::Error) -> CallError {
    if e.is_timeout() {
        CallError::Timeout
    } else {
        // Without the URL: it may carry credentials for self-hosted gateways.
        CallError::Connect(e.without_url().to_string())
    }
}

fn openai_body(req: &ChatRequest<'_>) -> Json {
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = req.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.extend(req.messages.iter().map(message_json));
    let mut body = json!({
        "model": req.model,
        "messages": messages,
        "max_tokens": req.max_tokens,
    });
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    if req.json {
        body["response_format"] = json!({"type": "json_object"});
    }
    body
}

fn anthropic_body(req: &ChatRequest<'_>) -> Json {
    let mut body = json!({
        "model": req.model,
        "messages": req.messages.iter().map(message_json).collect::<Vec<_>>(),
        "max_tokens": req.max_tokens,
    });
    if let Some(system) = req.system {
        body["system"] = json!(system);
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    body
}

fn message_json(m: &Message) -> Json {
    let role = match m.role {
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    json!({"role": role, "content": m.content})
}

/// Reads a 200 answer's text and token usage.
pub fn parse_completion(api: ProviderApi, body: &[u8]) -> Result<Completion, CallError> {
    let v: Json = serde_json::from_slice(body)
        .map_err(|e| CallError::Malformed(format!("body is not JSON: {e}")))?;
    let (text, input, output) = match api {
        ProviderApi::OpenAi => (
            v["choices"][0]["message"]["content"]
                .as_str()
                .map(str::to_string),
            v["usage"]["prompt_tokens"].as_u64(),
            v["usage"]["completion_tokens"].as_u64(),
        ),
        ProviderApi::Anthropic => (
            v["content"].as_array().map(|parts| {
                parts
                    .iter()
                    .filter(|p| p["type"] == "text")
                    .filter_map(|p| p["text"].as_str())
                    .collect::<String>()
            }),
            v["usage"]["input_tokens"].as_u64(),
            v["usage"]["output_tokens"].as_u64(),
        ),
    };
    match (text, input, output) {
        (Some(text), Some(input_tokens), Some(output_tokens)) => Ok(Completion {
            text,
            input_tokens,
            output_tokens,
        }),
        _ => Err(CallError::Malformed(
            "answer lacks the text or the usage counts".to_string(),
        )),
    }
}

/// Classifies an error answer from its status and the error object in its body (both APIs put
/// `type`, and OpenAI also `code`, under `error`).
pub fn classify_error(status: StatusCode, body: &[u8]) -> CallError {
    let v: Json = serde_json::from_slice(body).unwrap_or(Json::Null);
    let err = &v["error"];
    let kind = err["type"].as_str().unwrap_or("");
    let code = err["code"].as_str().unwrap_or("");
    let message: String = err["message"]
        .as_str()
        .unwrap_or("")
        .chars()
        .take(300)
        .collect();
    let has = |needle: &str| kind == needle || code == needle;
    if has("insufficient_quota") {
        return CallError::Quota(message);
    }
    let lower = message.to_ascii_lowercase();
    if has("context_length_exceeded")
        || lower.contains("context window")
        || lower.contains("context length")
        || lower.contains("prompt is too long")
    {
        return CallError::ContextOverflow(message);
    }
    match status.as_u16() {
        429 => CallError::RateLimited,
        401 | 403 => CallError::Auth(status.as_u16()),
        408 | 409 | 500..=599 => CallError::Unavailable(status.as_u16()),
        s => CallError::Rejected { status: s, message },
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Parses `retry-after-ms`, else `retry-after` in seconds, capped at an hour
/// ([`crate::outbound::retry_after`]).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    crate::outbound::retry_after(headers)
}

/// The rate-limit state an answer's headers report, in the API's own header names.
pub fn rate_headers(api: ProviderApi, headers: &HeaderMap) -> RateHeaders {
    let retry_after = retry_after(headers);
    match api {
        ProviderApi::OpenAi => RateHeaders {
            remaining_requests: header_u64(headers, "x-ratelimit-remaining-requests"),
            remaining_tokens: header_u64(headers, "x-ratelimit-remaining-tokens"),
            remaining_input_tokens: None,
            remaining_output_tokens: None,
            retry_after,
        },
        ProviderApi::Anthropic => RateHeaders {
            remaining_requests: header_u64(headers, "anthropic-ratelimit-requests-remaining"),
            remaining_tokens: header_u64(headers, "anthropic-ratelimit-tokens-remaining"),
            remaining_input_tokens: header_u64(
                headers,
                "anthropic-ratelimit-input-tokens-remaining",
            ),
            remaining_output_tokens: header_u64(
                headers,
                "anthropic-ratelimit-output-tokens-remaining",
            ),
            retry_after,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_as_the_conventions_say() {
        let quota = br#"{"error":{"type":"insufficient_quota","message":"You exceeded your current quota"}}"#;
        assert!(matches!(
            classify_error(StatusCode::TOO_MANY_REQUESTS, quota),
            CallError::Quota(_)
        ));
        let limited = br#"{"error":{"type":"rate_limit_exceeded","message":"slow down"}}"#;
        assert_eq!(
            classify_error(StatusCode::TOO_MANY_REQUESTS, limited).class(),
            ErrorClass::RateLimited
        );
        let overflow = br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#;
        assert!(matches!(
            classify_error(StatusCode::BAD_REQUEST, overflow),
            CallError::ContextOverflow(_)
        ));
        for s in [500u16, 502, 503, 529, 408, 409] {
            let status = StatusCode::from_u16(s).unwrap();
            assert_eq!(
                classify_error(status, b"").class(),
                ErrorClass::Transient,
                "{s}"
            );
        }
        assert_eq!(
            classify_error(StatusCode::UNAUTHORIZED, b"").class(),
            ErrorClass::Fatal
        );
        assert_eq!(
            classify_error(StatusCode::NOT_FOUND, b"{}").class(),
            ErrorClass::Deterministic
        );
    }

    #[test]
    fn retry_after_ms_wins_over_seconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("1250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1250)));
    }

    #[test]
    fn both_answer_shapes_parse_with_usage() {
        let openai = br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        let c = parse_completion(ProviderApi::OpenAi, openai).unwrap();
        assert_eq!(
            (c.text.as_str(), c.input_tokens, c.output_tokens),
            ("hi", 3, 1)
        );
        let anthropic = br#"{"content":[{"type":"text","text":"yo"}],"usage":{"input_tokens":5,"output_tokens":2}}"#;
        let c = parse_completion(ProviderApi::Anthropic, anthropic).unwrap();
        assert_eq!(
            (c.text.as_str(), c.input_tokens, c.output_tokens),
            ("yo", 5, 2)
        );
        assert!(matches!(
            parse_completion(
                ProviderApi::OpenAi,
                br#"{"id":"x","choices":[{"message":{"content":"#
            ),
            Err(CallError::Malformed(_))
        ));
    }
}

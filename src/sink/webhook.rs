//! The generic HTTP webhook sink: POSTs the event as JSON to a configured URL.
//!
//! Classification follows `../shared/conventions.md`: 2xx succeeds; 408, 409, 425, 429, 5xx,
//! timeouts and connection errors are transient (with `Retry-After` honoured); any other 4xx
//! is deterministic and dead-letters the record. The request carries `Idempotency-Key` set to
//! the event's dedup key, so receivers can drop redeliveries; with `signing_secret` it is
//! also signed with Standard Webhooks (`webhook-id` = the dedup key, `webhook-timestamp`,
//! `webhook-signature`), so receivers can verify it came from Spillway.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::codec::Event;
use crate::config::ConfigError;
use crate::step::{Attempt, BoxFuture, EventContext, Step, StepError, StepOutput};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use crate::config::{HttpUrl, Parsed, PropertyValue};
use crate::config::duration_ms;
use crate::config::Config;
use crate::pipeline::{Assembly, StepKind};

/// Body of the POST.
#[derive(Serialize)]
struct Body<'a> {
    #[serde(flatten)]
    event: &'a Event,
    /// Outputs of the earlier steps.
    #[serde(skip_serializing_if = "Map::is_empty")]
    outputs: &'a Map<String, Json>,
}

/// POSTs each event to a URL.
pub struct WebhookSink {
    name: String,
    url: reqwest::Url,
    client: reqwest::Client,
    signing: Option<crate::signing::Secret>,
}

impl WebhookSink {
    /// Builds the sink; secret header values are resolved now and never logged.
    pub fn new(config: &WebhookConfig) -> Result<Self, ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid { key, message };
        let url = config.url.get(&format!("steps.{}.url", config.name))?.0.clone();
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let key = format!("steps.{}.headers.{name}", config.name);
            let resolved = value.resolve(&key)?;
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| invalid(key.clone(), e.to_string()))?;
            let mut value =
                HeaderValue::from_str(&resolved).map_err(|e| invalid(key, e.to_string()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = crate::outbound::client(
            Some(Duration::from_millis(config.timeout_ms)),
            Duration::from_millis(config.timeout_ms.min(5_000)),
            headers,
        )
        .map_err(|e| invalid(format!("steps.{}", config.name), e.to_string()))?;
        let signing = match &config.signing_secret {
            None => None,
            Some(v) => {
                let key = format!("steps.{}.signing_secret", config.name);
                let text = v.resolve(&key)?;
                Some(
                    crate::signing::Secret::standard_webhooks(&text)
                        .map_err(|m| invalid(key, m))?,
                )
            }
        };
        Ok(WebhookSink {
            name: config.name.clone(),
            url,
            client,
            signing,
        })
    }

    async fn post(&self, ctx: &EventContext) -> Result<(), StepError> {
        let body = Body {
            event: &ctx.event,
            outputs: &ctx.outputs,
        };
        let bytes = serde_json::to_vec(&body).map_err(|e| {
            StepError::deterministic("webhook_body", format!("cannot serialize the body: {e}"))
        })?;
        let key = idempotency_key(&ctx.dedup_key)?;
        let mut request = self
            .client
            .post(self.url.clone())
            .header("Idempotency-Key", key.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = &self.signing {
            let ts = (crate::telemetry::now_ms() / 1000) as i64;
            let signature = secret.sign_standard_webhooks(&ctx.dedup_key, ts, &bytes);
            request = request
                .header("webhook-id", key)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", signature);
        }
        let response = request.body(bytes).send().await.map_err(|e| {
            let code = if e.is_timeout() {
                "webhook_timeout"
            } else {
                "webhook_connect"
            };
            // reqwest's Display includes the URL, which may carry a token: keep it out.
            StepError::transient(code, format!("{code}: {}", e.without_url()))
        })?;
        classify(response.status(), response.headers())
    }
}

/// The dedup key as a header value. An id with a control character (from an upstream topic's
/// `ce_id` or `journal.id_field`) cannot be one, and never will be: a deterministic failure,
/// dead-lettered at once, not a transient one retried until it dead-letters anyway.
pub fn idempotency_key(dedup_key: &str) -> Result<HeaderValue, StepError> {
    HeaderValue::from_bytes(dedup_key.as_bytes()).map_err(|_| {
        let at = dedup_key
            .char_indices()
            .find(|(_, c)| c.is_control())
            .map_or(0, |(i, _)| i);
        StepError::deterministic(
            "invalid_event_id",
            format!(
                "the event id cannot be an HTTP header (Idempotency-Key): it has a control \
                 character at byte {at}"
            ),
        )
    })
}

/// Maps an HTTP response to the step's result.
pub fn classify(status: StatusCode, headers: &HeaderMap) -> Result<(), StepError> {
    if status.is_success() {
        return Ok(());
    }
    if let Some(message) = crate::outbound::redirect_message(status, headers) {
        return Err(StepError::deterministic(
            "webhook_redirect",
            format!("webhook {message}"),
        ));
    }
    let message = format!("webhook answered {status}");
    let transient = status.is_server_error() || matches!(status.as_u16(), 408 | 409 | 425 | 429);
    if !transient {
        return Err(StepError::deterministic("webhook_rejected", message));
    }
    let code = if status == StatusCode::TOO_MANY_REQUESTS {
        "webhook_rate_limited"
    } else {
        "webhook_unavailable"
    };
    match crate::outbound::retry_after(headers) {
        Some(after) => Err(StepError::retry_after(code, message, after)),
        None => Err(StepError::transient(code, message)),
    }
}

impl Step for WebhookSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn run<'a>(
        &'a self,
        ctx: &'a EventContext,
        _attempt: Attempt,
    ) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move { self.post(ctx).await.map(|()| StepOutput::none()) })
    }
}

// ---- Configuration: `[[steps]] type = "webhook"` ----

/// The generic webhook sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Step name used in metrics and DLQ headers; defaults to `webhook`.
    #[serde(default = "default_webhook_name")]
    pub name: String,
    /// Target URL.
    pub url: Parsed<HttpUrl>,
    /// Timeout of one attempt (connect, send and response), in milliseconds.
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra request headers. Values may be literals or secret references.
    #[serde(default)]
    pub headers: BTreeMap<String, PropertyValue>,
    /// Standard Webhooks secret (`whsec_<base64>`): when set, each request carries
    /// `webhook-id` (the dedup key), `webhook-timestamp` and `webhook-signature`.
    #[serde(default)]
    pub signing_secret: Option<PropertyValue>,
}

fn default_webhook_name() -> String {
    "webhook".to_string()
}

pub(crate) fn default_webhook_timeout_ms() -> u64 {
    10_000
}

impl StepKind for WebhookConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, at: &str, _config: &Config) -> Result<(), ConfigError> {
        duration_ms(&format!("{at}.timeout_ms"), self.timeout_ms, 1)?;
        self.url.get(&format!("{at}.url"))?;
        Ok(())
    }

    fn build(&self, _cx: &Assembly<'_>) -> Result<Arc<dyn Step>, ConfigError> {
        Ok(Arc::new(WebhookSink::new(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::Action;
    use reqwest::header::RETRY_AFTER;

    fn headers(retry_after: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = retry_after {
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn an_id_that_cannot_be_a_header_is_a_deterministic_failure_at_once() {
        for id in ["evt\n1", "a\rb", "x\u{0}", "del\u{7f}"] {
            let err = idempotency_key(id).unwrap_err();
            assert_eq!(err.action, Action::DeadLetter, "{id:?}");
            assert_eq!(err.code, "invalid_event_id");
            assert!(err.message.contains("control character"), "{}", err.message);
        }
        for id in ["github:sha256:00ff", "blog:msg_1", "évt ✓"] {
            assert!(idempotency_key(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn a_redirect_is_a_deterministic_failure_naming_its_target_origin() {
        for status in [301u16, 302, 303, 307, 308] {
            let mut h = headers(None);
            h.insert("location", HeaderValue::from_static("http://127.0.0.2:9/x"));
            let err = classify(StatusCode::from_u16(status).unwrap(), &h).unwrap_err();
            assert_eq!(err.action, Action::DeadLetter, "{status}");
            assert_eq!(err.code, "webhook_redirect");
            assert!(
                err.message.contains("http://127.0.0.2:9") && !err.message.contains("/x"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn success_statuses_pass() {
        assert!(classify(StatusCode::OK, &headers(None)).is_ok());
        assert!(classify(StatusCode::ACCEPTED, &headers(None)).is_ok());
    }

    #[test]
    fn server_errors_and_429_are_transient_with_retry_after() {
        let e = classify(StatusCode::TOO_MANY_REQUESTS, &headers(Some("3"))).unwrap_err();
        assert_eq!(
            e.action,
            Action::Retry {
                after: Some(Duration::from_secs(3))
            }
        );
        let e = classify(StatusCode::BAD_GATEWAY, &headers(None)).unwrap_err();
        assert_eq!(e.action, Action::Retry { after: None });
        let e = classify(StatusCode::REQUEST_TIMEOUT, &headers(None)).unwrap_err();
        assert!(matches!(e.action, Action::Retry { .. }));
    }

    #[test]
    fn other_client_errors_dead_letter() {
        for s in [400, 401, 403, 404, 422] {
            let e = classify(StatusCode::from_u16(s).unwrap(), &headers(None)).unwrap_err();
            assert_eq!(e.action, Action::DeadLetter, "status {s}");
            assert_eq!(e.code, "webhook_rejected");
        }
    }
}

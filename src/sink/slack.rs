//! The Slack sink: a message per event, through `chat.postMessage` with a bot token, or an
//! incoming webhook.
//!
//! - **Template.** `text` is a minijinja template over `event`, `data` and `outputs`.
//! - **Pacing.** Slack allows about one message per second per channel; posts to one channel
//!   are spaced `pacing_ms` apart (default 1000), and a 429's `Retry-After` is honoured.
//! - **Classification.** HTTP 429 and Slack's `ratelimited` are retried after `Retry-After`;
//!   5xx, timeouts and Slack's transient errors are retried; `channel_not_found`,
//!   `not_in_channel`, `is_archived`, `invalid_auth` and other permanent errors go to the DLQ
//!   at once.
//! - **Reconciliation** (bot mode). Each message carries the event's dedup key in its
//!   metadata. The worker records the intent in the journal before the first post; when a
//!   post is retried (its answer was lost after Slack accepted it) or an event comes back after
//!   a crash with the intent recorded, the sink first looks the key up in the channel's recent
//!   history (`conversations.history`) and, if the message is there, does not post again.
//!   Incoming webhooks have no history to ask; there the journal alone prevents repeats.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value as Json};

use crate::config::ConfigError;
use crate::step::{Attempt, BoxFuture, EventContext, Step, StepError, StepOutput};
use crate::template::{Escape, Templates};
use serde::Deserialize;
use std::sync::Arc;
use crate::config::{bounded, default_true, duration_ms, Config, PropertyValue};
use crate::pipeline::{Assembly, StepKind};
use crate::sink::webhook::default_webhook_timeout_ms;

/// The metadata event type Spillway's messages carry.
pub const METADATA_EVENT_TYPE: &str = "spillway_event";

enum Target {
    Bot {
        api: String,
        token: String,
        channel: String,
    },
    Webhook {
        url: reqwest::Url,
    },
}

/// Posts one Slack message per event.
pub struct SlackSink {
    name: String,
    target: Target,
    text: Templates,
    client: reqwest::Client,
    pacing: Duration,
    history: u32,
    /// Per channel: the earliest time the next post may go.
    next_slot: Mutex<HashMap<String, tokio::time::Instant>>,
}

impl SlackSink {
    /// Builds the sink; the token or webhook URL is resolved now and never logged.
    pub fn new(config: &SlackConfig) -> Result<SlackSink, ConfigError> {
        let key = |k: &str| format!("steps.{}.{k}", config.name);
        let invalid = |k: &str, message: String| ConfigError::Invalid {
            key: key(k),
            message,
        };
        let target = match (&config.webhook_url, &config.token, &config.channel) {
            (Some(url), None, None) => {
                let url = url.resolve(&key("webhook_url"))?;
                Target::Webhook {
                    url: reqwest::Url::parse(&url)
                        .map_err(|e| invalid("webhook_url", e.to_string()))?,
                }
            }
            (None, Some(token), Some(channel)) => Target::Bot {
                api: config.api_url.trim_end_matches('/').to_string(),
                token: token.resolve(&key("token"))?,
                channel: channel.clone(),
            },
            _ => {
                return Err(invalid(
                    "token",
                    "set either webhook_url, or token and channel".into(),
                ))
            }
        };
        let client = crate::outbound::client(
            Some(Duration::from_millis(config.timeout_ms)),
            Duration::from_millis(config.timeout_ms.min(5_000)),
            reqwest::header::HeaderMap::new(),
        )
        .map_err(|e| invalid("timeout_ms", e.to_string()))?;
        Ok(SlackSink {
            name: config.name.clone(),
            target,
            text: Templates::new(
                &config.name,
                &[("text", &config.text)],
                if config.escape {
                    Escape::Slack
                } else {
                    Escape::None
                },
            )?,
            client,
            pacing: Duration::from_millis(config.pacing_ms),
            history: config.reconcile_history,
            next_slot: Mutex::new(HashMap::new()),
        })
    }

    fn channel_key(&self) -> String {
        match &self.target {
            Target::Bot { channel, .. } => channel.clone(),
            Target::Webhook { url } => url.path().to_string(),
        }
    }

    /// Waits for the channel's next free slot (one post per `pacing`).
    async fn pace(&self) {
        let wait_until = {
            let mut slots = self.next_slot.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            let slot = slots.entry(self.channel_key()).or_insert(now);
            let at = (*slot).max(now);
            *slot = at + self.pacing;
            at
        };
        tokio::time::sleep_until(wait_until).await;
    }

    /// Whether a message carrying `dedup_key` is already in the channel's recent history.
    async fn already_posted(
        &self,
        api: &str,
        token: &str,
        channel: &str,
        dedup_key: &str,
    ) -> Result<Option<String>, StepError> {
        let mut url = reqwest::Url::parse(&format!("{api}/conversations.history"))
            .map_err(|e| StepError::deterministic("slack_config", e.to_string()))?;
        url.query_pairs_mut()
            .append_pair("channel", channel)
            .append_pair("limit", &self.history.to_string())
            .append_pair("include_all_metadata", "true");
        let response = self
            .client
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(request_error)?;
        let body = answer(response).await?;
        Ok(body["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| {
                m["metadata"]["event_type"] == METADATA_EVENT_TYPE
                    && m["metadata"]["event_payload"]["dedup_key"] == dedup_key
            })
            .map(|m| m["ts"].as_str().unwrap_or_default().to_string()))
    }

    async fn post(&self, ctx: &EventContext, attempt: Attempt) -> Result<StepOutput, StepError> {
        let text = self
            .text
            .render("text", ctx)
            .map_err(|e| StepError::deterministic("slack_template", e))?;
        match &self.target {
            Target::Bot {
                api,
                token,
                channel,
            } => {
                if attempt.may_have_acted() {
                    if let Some(ts) = self
                        .already_posted(api, token, channel, &ctx.dedup_key)
                        .await?
                    {
                        tracing::info!(step = %self.name, "message already in the channel; not posting again");
                        return Ok(StepOutput::value(
                            json!({"channel": channel, "ts": ts, "reconciled": true}),
                        ));
                    }
                }
                self.pace().await;
                let response = self
                    .client
                    .post(format!("{api}/chat.postMessage"))
                    .bearer_auth(token)
                    .json(&json!({
                        "channel": channel,
                        "text": text,
                        "metadata": {
                            "event_type": METADATA_EVENT_TYPE,
                            "event_payload": {"dedup_key": ctx.dedup_key},
                        },
                    }))
                    .send()
                    .await
                    .map_err(request_error)?;
                let body = answer(response).await?;
                Ok(StepOutput::value(
                    json!({"channel": body["channel"], "ts": body["ts"]}),
                ))
            }
            Target::Webhook { url } => {
                self.pace().await;
                let response = self
                    .client
                    .post(url.clone())
                    .json(&json!({ "text": text }))
                    .send()
                    .await
                    .map_err(request_error)?;
                redirected(&response)?;
                let status = response.status();
                let after = crate::outbound::retry_after(response.headers());
                let body = response.text().await.unwrap_or_default();
                classify_webhook(status, after, body.trim()).map(|()| StepOutput::none())
            }
        }
    }
}

fn request_error(e: reqwest::Error) -> StepError {
    let code = if e.is_timeout() {
        "slack_timeout"
    } else {
        "slack_connect"
    };
    StepError::transient(code, format!("{code}: {}", e.without_url()))
}

fn redirected(r: &reqwest::Response) -> Result<(), StepError> {
    match crate::outbound::redirect_message(r.status(), r.headers()) {
        Some(message) => Err(StepError::deterministic(
            "slack_redirect",
            format!("slack {message}"),
        )),
        None => Ok(()),
    }
}

/// Reads a Web API answer: HTTP status first, then Slack's `ok` and `error`.
async fn answer(response: reqwest::Response) -> Result<Json, StepError> {
    redirected(&response)?;
    let status = response.status();
    let after = crate::outbound::retry_after(response.headers());
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(rate_limited(after));
    }
    if status.is_server_error() {
        return Err(StepError::transient(
            "slack_unavailable",
            format!("slack answered {status}"),
        ));
    }
    let body: Json = response.json().await.map_err(|e| {
        StepError::transient("slack_unavailable", format!("unreadable answer: {e}"))
    })?;
    if body["ok"] == true {
        return Ok(body);
    }
    let error = body["error"]
        .as_str()
        .unwrap_or("unknown_error")
        .to_string();
    Err(classify_error(&error, after))
}

fn rate_limited(after: Option<Duration>) -> StepError {
    StepError::retry_after(
        "slack_rate_limited",
        "slack rate limit",
        after.unwrap_or(Duration::from_secs(1)),
    )
}

/// Slack Web API error codes: transient ones are retried, the rest dead-letter at once.
pub fn classify_error(error: &str, after: Option<Duration>) -> StepError {
    match error {
        "ratelimited" | "rate_limited" => rate_limited(after),
        "internal_error" | "fatal_error" | "service_unavailable" | "request_timeout" => {
            StepError::transient("slack_unavailable", format!("slack error {error}"))
        }
        "channel_not_found" | "not_in_channel" | "is_archived" => {
            StepError::deterministic("slack_channel", format!("slack error {error}"))
        }
        "invalid_auth" | "not_authed" | "account_inactive" | "token_revoked" | "missing_scope" => {
            StepError::deterministic("slack_auth", format!("slack error {error}"))
        }
        other => StepError::deterministic("slack_rejected", format!("slack error {other}")),
    }
}

/// Incoming webhooks answer `ok` as text, or an error code with a 4xx.
fn classify_webhook(
    status: StatusCode,
    after: Option<Duration>,
    body: &str,
) -> Result<(), StepError> {
    if status.is_success() {
        return Ok(());
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(rate_limited(after));
    }
    if status.is_server_error() {
        return Err(StepError::transient(
            "slack_unavailable",
            format!("slack answered {status}"),
        ));
    }
    Err(classify_error(body, after))
}

impl Step for SlackSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn run<'a>(
        &'a self,
        ctx: &'a EventContext,
        attempt: Attempt,
    ) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(self.post(ctx, attempt))
    }

    fn records_intent(&self) -> bool {
        matches!(self.target, Target::Bot { .. })
    }
}

// ---- Configuration: `[[steps]] type = "slack"` ----

/// The Slack sink. Set `webhook_url`, or `token` and `channel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// Step name used in metrics and DLQ headers; defaults to `slack`.
    #[serde(default = "default_slack_name")]
    pub name: String,
    /// An incoming webhook URL (a secret: from the environment or a file).
    #[serde(default)]
    pub webhook_url: Option<PropertyValue>,
    /// A bot token (`xoxb-...`) for `chat.postMessage`.
    #[serde(default)]
    pub token: Option<PropertyValue>,
    /// The channel id for `chat.postMessage`.
    #[serde(default)]
    pub channel: Option<String>,
    /// Slack's Web API base URL.
    #[serde(default = "default_slack_api_url")]
    pub api_url: String,
    /// The message, a minijinja template over `event`, `data` and `outputs`.
    pub text: String,
    /// Escape `&`, `<` and `>` in every value the template renders (Slack's rules), so event
    /// text such as `<!channel>` cannot ping a channel or forge a link. The template's own
    /// text is never escaped, and `{{ x | safe }}` renders one value as is. `false` turns it
    /// off for this template: only for values that are trusted Slack markup.
    #[serde(default = "default_true")]
    pub escape: bool,
    /// Minimum time between two posts to the channel, in milliseconds (Slack: ~1 per second).
    #[serde(default = "default_slack_pacing_ms")]
    pub pacing_ms: u64,
    /// Timeout of one request, in milliseconds.
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// How many recent channel messages reconciliation looks through.
    #[serde(default = "default_slack_history")]
    pub reconcile_history: u32,
}

fn default_slack_name() -> String {
    "slack".to_string()
}

fn default_slack_api_url() -> String {
    "https://slack.com/api".to_string()
}

fn default_slack_pacing_ms() -> u64 {
    1_000
}

fn default_slack_history() -> u32 {
    100
}

impl StepKind for SlackConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, at: &str, _config: &Config) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        duration_ms(&key("timeout_ms"), self.timeout_ms, 1)?;
        duration_ms(&key("pacing_ms"), self.pacing_ms, 0)?;
        // conversations.history answers at most 999 messages a page.
        bounded(
            &key("reconcile_history"),
            self.reconcile_history.into(),
            1,
            999,
            "messages",
        )?;
        let bot = self.token.is_some() && self.channel.is_some();
        if bot == self.webhook_url.is_some() || (self.token.is_some() != self.channel.is_some()) {
            return Err(ConfigError::invalid(
                key("token"),
                "set either webhook_url, or token and channel",
            ));
        }
        Ok(())
    }

    fn build(&self, _cx: &Assembly<'_>) -> Result<Arc<dyn Step>, ConfigError> {
        Ok(Arc::new(SlackSink::new(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::Action;

    fn response(status: u16, retry_after: &str) -> reqwest::Response {
        reqwest::Response::from(
            axum::http::Response::builder()
                .status(status)
                .header("retry-after", retry_after)
                .body(r#"{"ok":false,"error":"ratelimited"}"#)
                .unwrap(),
        )
    }

    #[tokio::test]
    async fn a_retry_after_of_a_year_from_slack_waits_at_most_an_hour() {
        for (status, header) in [(429, "31536000"), (200, "31536000"), (429, "1e30")] {
            let err = answer(response(status, header)).await.unwrap_err();
            assert_eq!(
                err.action,
                Action::Retry {
                    after: Some(crate::outbound::MAX_SERVER_WAIT)
                },
                "{status} with Retry-After {header}"
            );
        }
        let err = answer(response(429, "30")).await.unwrap_err();
        assert_eq!(
            err.action,
            Action::Retry {
                after: Some(Duration::from_secs(30))
            }
        );
    }

    #[test]
    fn slack_errors_are_classified_per_conventions() {
        let e = classify_error("ratelimited", Some(Duration::from_secs(7)));
        assert_eq!(
            e.action,
            Action::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            classify_error("channel_not_found", None).action,
            Action::DeadLetter
        );
        assert_eq!(
            classify_error("invalid_auth", None).action,
            Action::DeadLetter
        );
        assert!(matches!(
            classify_error("internal_error", None).action,
            Action::Retry { .. }
        ));
        assert!(classify_webhook(StatusCode::OK, None, "ok").is_ok());
        assert_eq!(
            classify_webhook(StatusCode::NOT_FOUND, None, "channel_not_found")
                .unwrap_err()
                .code,
            "slack_channel"
        );
    }
}

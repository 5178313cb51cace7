//! One configured webhook source, compiled for the request path: its scheme and resolved
//! secrets, limits, where the delivery id and the CloudEvents attributes come from, and its
//! optional JSON Schema.

use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::Value as Json;

use super::auth::{Encoding, Scheme, Secret};
use super::limit::Rate;
use crate::config::ingress::{FieldRef, SchemeName, SignatureEncoding, SourceConfig};
use crate::config::ConfigError;

/// A source ready to serve requests.
pub struct Source {
    /// Its name (the path segment and the metrics label).
    pub name: String,
    /// `ce_source`: `/webhooks/<name>`.
    pub ce_source: String,
    /// Signature scheme.
    pub scheme: Scheme,
    /// Secrets, in configuration order.
    pub secrets: Vec<Secret>,
    /// Allowed timestamp skew, both ways, in seconds.
    pub tolerance_secs: i64,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Per-source rate after authentication.
    pub rate: Option<Rate>,
    /// Where the delivery id comes from.
    pub delivery_id: FieldRef,
    /// Event type.
    pub event_type: FieldRef,
    /// Optional subject.
    pub subject: Option<FieldRef>,
    /// Optional occurrence time.
    pub time: Option<FieldRef>,
    /// Target topic.
    pub topic: String,
    /// Optional JSON Schema of the body.
    pub schema: Option<jsonschema::Validator>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("scheme", &self.scheme)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// Why a request's body or headers do not make an event (a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    /// The body is not JSON.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// A required value is missing.
    #[error("{what} is missing: expected {place}")]
    Missing {
        /// Which value (`delivery id`, `event type`).
        what: &'static str,
        /// Where it was looked for.
        place: String,
    },
    /// The body does not satisfy the source's JSON Schema.
    #[error("body does not match the source's schema: {0}")]
    Schema(String),
    /// A value taken from the request is longer than Spillway keeps (ids are cache keys and
    /// Kafka keys; attributes are headers).
    #[error("{what} is {len} bytes long; at most {max} are accepted")]
    TooLong {
        /// Which value.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
}

/// Longest delivery id, event type, subject or time taken from a request, in bytes. Sender
/// ids are GUIDs or short tokens; the cap bounds the replay cache's memory per entry.
pub const MAX_ATTRIBUTE_BYTES: usize = 256;

impl Source {
    /// Compiles `config` for source `name`, resolving its secrets and reading its schema.
    pub fn new(name: &str, config: &SourceConfig) -> Result<Source, ConfigError> {
        let key = |k: &str| format!("sources.{name}.{k}");
        let scheme = match config.scheme {
            SchemeName::StandardWebhooks => Scheme::StandardWebhooks,
            SchemeName::Github => Scheme::GitHub,
            SchemeName::Stripe => Scheme::Stripe,
            SchemeName::Slack => Scheme::Slack,
            SchemeName::Hmac => Scheme::Hmac {
                header: config
                    .signature_header
                    .clone()
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
                prefix: config.signature_prefix.clone().unwrap_or_default(),
                encoding: match config.signature_encoding {
                    Some(SignatureEncoding::Base64) => Encoding::Base64,
                    _ => Encoding::Hex,
                },
            },
        };
        let mut secrets = Vec::with_capacity(config.secrets.len());
        for (i, s) in config.secrets.iter().enumerate() {
            let k = key(&format!("secrets[{i}]"));
            let text = s.resolve(&k)?;
            secrets.push(
                Secret::new(&scheme, &text)
                    .map_err(|m| ConfigError::Invalid { key: k, message: m })?,
            );
        }
        let delivery_id = match (&config.delivery_id, config.scheme) {
            (Some(d), _) => d.clone(),
            (None, SchemeName::StandardWebhooks) => FieldRef::Header {
                header: "webhook-id".into(),
            },
            (None, SchemeName::Github) => FieldRef::Header {
                header: "x-github-delivery".into(),
            },
            (None, SchemeName::Stripe) => FieldRef::Json { json: "/id".into() },
            (None, SchemeName::Slack) => FieldRef::Json {
                json: "/event_id".into(),
            },
            (None, SchemeName::Hmac) => {
                return Err(ConfigError::Invalid {
                    key: key("delivery_id"),
                    message: "is required for scheme = \"hmac\"".into(),
                })
            }
        };
        let schema = match &config.schema {
            None => None,
            Some(path) => {
                let invalid = |message: String| ConfigError::Invalid {
                    key: key("schema"),
                    message,
                };
                let text = std::fs::read_to_string(path)
                    .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
                let json: Json = serde_json::from_str(&text)
                    .map_err(|e| invalid(format!("{} is not JSON: {e}", path.display())))?;
                Some(
                    jsonschema::validator_for(&json)
                        .map_err(|e| invalid(format!("invalid JSON Schema: {e}")))?,
                )
            }
        };
        let rate = match &config.rate {
            None => None,
            Some(r) => Some(Rate::parse(r).map_err(|m| ConfigError::Invalid {
                key: key("rate"),
                message: m,
            })?),
        };
        Ok(Source {
            name: name.to_string(),
            ce_source: format!("/webhooks/{name}"),
            scheme,
            secrets,
            tolerance_secs: config.tolerance_secs as i64,
            max_body_bytes: config.max_body_bytes,
            rate,
            delivery_id,
            event_type: config.event_type.clone(),
            subject: config.subject.clone(),
            time: config.time.clone(),
            topic: config.topic.clone(),
            schema,
        })
    }

    /// The source-namespaced delivery id (`<source>:<sender's id>`): `ce_id`, the record key
    /// and the replay-cache key.
    pub fn event_id(&self, headers: &HeaderMap, body: &Json) -> Result<String, InvalidEvent> {
        let id = required("delivery id", &self.delivery_id, headers, body)?;
        Ok(format!("{}:{}", self.name, id))
    }

    /// The event type.
    pub fn event_type(&self, headers: &HeaderMap, body: &Json) -> Result<String, InvalidEvent> {
        required("event type", &self.event_type, headers, body)
    }

    /// The optional subject.
    pub fn subject(
        &self,
        headers: &HeaderMap,
        body: &Json,
    ) -> Result<Option<String>, InvalidEvent> {
        optional("subject", self.subject.as_ref(), headers, body)
    }

    /// The optional occurrence time.
    pub fn time(&self, headers: &HeaderMap, body: &Json) -> Result<Option<String>, InvalidEvent> {
        optional("time", self.time.as_ref(), headers, body)
    }

    /// Checks the body against the source's JSON Schema, naming up to five failing paths.
    pub fn validate(&self, body: &Json) -> Result<(), InvalidEvent> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        let errors: Vec<String> = schema
            .iter_errors(body)
            .take(5)
            .map(|e| {
                let path = e.instance_path().to_string();
                format!("{}: {e}", if path.is_empty() { "/" } else { &path })
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(InvalidEvent::Schema(errors.join("; ")))
        }
    }

    /// The timestamp tolerance as a duration.
    pub fn tolerance(&self) -> Duration {
        Duration::from_secs(self.tolerance_secs.max(0) as u64)
    }
}

/// Parses a body as JSON, describing the first error with its line and column.
pub fn parse_json(body: &[u8]) -> Result<Json, InvalidEvent> {
    serde_json::from_slice(body).map_err(|e| InvalidEvent::NotJson(e.to_string()))
}

fn extract(field: &FieldRef, headers: &HeaderMap, body: &Json) -> Option<String> {
    let value = match field {
        FieldRef::Fixed(v) => Some(v.clone()),
        FieldRef::Header { header } => headers
            .get(header.as_str())
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string()),
        FieldRef::Json { json } => body.pointer(json).and_then(|v| match v {
            Json::String(s) => Some(s.clone()),
            Json::Number(n) => Some(n.to_string()),
            _ => None,
        }),
    };
    value.filter(|v| !v.is_empty())
}

/// A value that must be present and at most [`MAX_ATTRIBUTE_BYTES`] long.
fn required(
    what: &'static str,
    field: &FieldRef,
    headers: &HeaderMap,
    body: &Json,
) -> Result<String, InvalidEvent> {
    optional(what, Some(field), headers, body)?.ok_or_else(|| InvalidEvent::Missing {
        what,
        place: describe(field),
    })
}

/// A value that may be absent, but if present is at most [`MAX_ATTRIBUTE_BYTES`] long.
fn optional(
    what: &'static str,
    field: Option<&FieldRef>,
    headers: &HeaderMap,
    body: &Json,
) -> Result<Option<String>, InvalidEvent> {
    match field.and_then(|f| extract(f, headers, body)) {
        Some(v) if v.len() > MAX_ATTRIBUTE_BYTES => Err(InvalidEvent::TooLong {
            what,
            len: v.len(),
            max: MAX_ATTRIBUTE_BYTES,
        }),
        v => Ok(v),
    }
}

fn describe(field: &FieldRef) -> String {
    match field {
        FieldRef::Fixed(v) => format!("the fixed value `{v}`"),
        FieldRef::Header { header } => format!("header {header}"),
        FieldRef::Json { json } => format!("a string or number at JSON Pointer {json}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn config(toml: &str) -> SourceConfig {
        figment::Figment::new()
            .merge(<figment::providers::Toml as figment::providers::Format>::string(toml))
            .extract()
            .unwrap()
    }

    #[test]
    fn delivery_ids_default_per_scheme_and_are_namespaced_by_source() {
        let stripe = Source::new(
            "stripe",
            &config("scheme = \"stripe\"\nsecrets = [\"k\"]\nevent_type = { json = \"/type\" }\ntopic = \"t\""),
        )
        .unwrap();
        let body: Json = serde_json::json!({"id": "evt_1", "type": "charge.succeeded"});
        let h = HeaderMap::new();
        assert_eq!(stripe.event_id(&h, &body).unwrap(), "stripe:evt_1");
        assert_eq!(stripe.event_type(&h, &body).unwrap(), "charge.succeeded");
        let err = stripe
            .event_id(&h, &serde_json::json!({"type": "x"}))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "delivery id is missing: expected a string or number at JSON Pointer /id"
        );

        let gh = Source::new(
            "gh",
            &config("scheme = \"github\"\nsecrets = [\"k\"]\nevent_type = { header = \"X-GitHub-Event\" }\ntopic = \"t\""),
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-github-delivery", HeaderValue::from_static("72d3162e"));
        h.insert("x-github-event", HeaderValue::from_static("issue_comment"));
        assert_eq!(gh.event_id(&h, &Json::Null).unwrap(), "gh:72d3162e");
        assert_eq!(gh.event_type(&h, &Json::Null).unwrap(), "issue_comment");
    }

    #[test]
    fn an_overlong_delivery_id_or_attribute_is_refused_with_its_length() {
        let stripe = Source::new(
            "stripe",
            &config("scheme = \"stripe\"\nsecrets = [\"k\"]\nevent_type = { json = \"/type\" }\nsubject = { json = \"/s\" }\ntopic = \"t\""),
        )
        .unwrap();
        let h = HeaderMap::new();
        let long = "x".repeat(MAX_ATTRIBUTE_BYTES + 1);
        let body = serde_json::json!({"id": long, "type": "t", "s": "ok"});
        assert_eq!(
            stripe.event_id(&h, &body).unwrap_err().to_string(),
            format!("delivery id is 257 bytes long; at most {MAX_ATTRIBUTE_BYTES} are accepted")
        );
        assert_eq!(stripe.subject(&h, &body).unwrap().as_deref(), Some("ok"));
        let body = serde_json::json!({"id": "evt_1", "type": "t", "s": long});
        assert!(matches!(
            stripe.subject(&h, &body),
            Err(InvalidEvent::TooLong {
                what: "subject",
                ..
            })
        ));
        let exact = "y".repeat(MAX_ATTRIBUTE_BYTES);
        let body = serde_json::json!({"id": exact, "type": "t"});
        assert_eq!(
            stripe.event_id(&h, &body).unwrap(),
            format!("stripe:{exact}")
        );
        assert_eq!(stripe.time(&h, &body).unwrap(), None);
    }

    #[test]
    fn a_json_schema_names_the_failing_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("schema.json");
        std::fs::write(
            &path,
            r#"{"type":"object","required":["comment"],"properties":{"comment":{"type":"object","required":["text"],"properties":{"text":{"type":"string"}}}}}"#,
        )
        .unwrap();
        let src = Source::new(
            "blog",
            &config(&format!(
                "scheme = \"standard-webhooks\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nevent_type = \"comment\"\ntopic = \"t\"\nschema = {:?}",
                path.display().to_string()
            )),
        )
        .unwrap();
        assert!(src
            .validate(&serde_json::json!({"comment": {"text": "hi"}}))
            .is_ok());
        let err = src
            .validate(&serde_json::json!({"comment": {"text": 7}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/comment/text"), "{err}");
    }

    #[test]
    fn a_body_that_is_not_json_says_where() {
        let err = parse_json(b"{\"a\": 1,}").unwrap_err().to_string();
        assert!(err.contains("line 1 column"), "{err}");
    }
}

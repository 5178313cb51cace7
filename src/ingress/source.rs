//! One configured webhook source, compiled for the request path: its scheme and resolved
//! secrets, limits, where the delivery id and the CloudEvents attributes come from, and its
//! optional JSON Schema.

use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use super::auth::{Encoding, Scheme, Secret};
use super::limit::Rate;
use crate::config::ConfigError;
use crate::ingress::config::{FieldRef, SchemeName, SignatureEncoding, SourceConfig};

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
    /// Whether the sender signs the delivery id. When it does not (GitHub's
    /// `X-GitHub-Delivery`, a generic HMAC source's id header), the event's identity is a
    /// digest of the signed body instead, so a captured request replayed with a new id is
    /// still recognised.
    pub id_signed: bool,
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
    /// A value taken from the request holds a control character: it could not be an HTTP
    /// header (`Idempotency-Key`, `webhook-id`) downstream.
    #[error("{what} has a control character (U+{code:04X}) at byte {at}; only printable text is accepted")]
    ControlCharacter {
        /// Which value.
        what: &'static str,
        /// The character.
        code: u32,
        /// Its byte offset.
        at: usize,
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
        // The body is signed by every scheme; of the headers, only Standard Webhooks signs
        // its `webhook-id`.
        let id_signed = match &delivery_id {
            FieldRef::Json { .. } => true,
            FieldRef::Header { header } => {
                config.scheme == SchemeName::StandardWebhooks
                    && header.eq_ignore_ascii_case("webhook-id")
            }
            FieldRef::Fixed(_) => false,
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
            Some(r) => Some(*r.get(&key("rate"))?),
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
            id_signed,
            event_type: config.event_type.clone(),
            subject: config.subject.clone(),
            time: config.time.clone(),
            topic: config.topic.clone(),
            schema,
        })
    }

    /// The event's source-namespaced identity, `ce_id`, the record key and the replay-cache
    /// key, and the sender's delivery id when that is not the identity.
    ///
    /// The identity is `<source>:<sender's id>` when the sender signs its id, and
    /// `<source>:sha256:<hex digest of the raw body>` when it does not (see
    /// [`Source::id_signed`]): a replay can change an unsigned id, never the signed body. The
    /// sender's id is still required, and returned second for tracing.
    pub fn event_id(
        &self,
        headers: &HeaderMap,
        body: &Json,
        raw_body: &[u8],
    ) -> Result<(String, Option<String>), InvalidEvent> {
        let id = required("delivery id", &self.delivery_id, headers, body)?;
        if self.id_signed {
            return Ok((format!("{}:{id}", self.name), None));
        }
        let digest = hex::encode(Sha256::digest(raw_body));
        Ok((format!("{}:sha256:{digest}", self.name), Some(id)))
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
    let value = field.and_then(|f| extract(f, headers, body));
    if let Some(v) = &value {
        if v.len() > MAX_ATTRIBUTE_BYTES {
            return Err(InvalidEvent::TooLong {
                what,
                len: v.len(),
                max: MAX_ATTRIBUTE_BYTES,
            });
        }
        if let Some((at, c)) = v.char_indices().find(|(_, c)| c.is_control()) {
            return Err(InvalidEvent::ControlCharacter {
                what,
                code: c as u32,
                at,
            });
        }
    }
    Ok(value)
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
        assert_eq!(stripe.event_id(&h, &body, b"").unwrap().0, "stripe:evt_1");
        assert_eq!(stripe.event_type(&h, &body).unwrap(), "charge.succeeded");
        let err = stripe
            .event_id(&h, &serde_json::json!({"type": "x"}), b"")
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
        // GitHub signs the body only: the identity is the body's digest, the GUID rides along.
        let (id, sender) = gh.event_id(&h, &Json::Null, b"Hello, World!").unwrap();
        assert_eq!(
            id,
            "gh:sha256:dffd6021bb2bd5b0af676290809ec3a53191dd81c7f70a4b28688a362182986f"
        );
        assert_eq!(sender.as_deref(), Some("72d3162e"));
        assert_eq!(gh.event_type(&h, &Json::Null).unwrap(), "issue_comment");
    }

    #[test]
    fn a_replay_with_a_new_unsigned_delivery_id_keeps_its_identity() {
        let gh = Source::new(
            "gh",
            &config("scheme = \"github\"\nsecrets = [\"k\"]\nevent_type = { header = \"X-GitHub-Event\" }\ntopic = \"t\""),
        )
        .unwrap();
        let hmac_header = Source::new(
            "shop",
            &config("scheme = \"hmac\"\nsecrets = [\"k\"]\nsignature_header = \"x-sig\"\ndelivery_id = { header = \"x-id\" }\nevent_type = \"order\"\ntopic = \"t\""),
        )
        .unwrap();
        let hmac_body = Source::new(
            "shop",
            &config("scheme = \"hmac\"\nsecrets = [\"k\"]\nsignature_header = \"x-sig\"\ndelivery_id = { json = \"/id\" }\nevent_type = \"order\"\ntopic = \"t\""),
        )
        .unwrap();
        let body = br#"{"id":"o-1","total":5}"#;
        let json: Json = serde_json::from_slice(body).unwrap();
        let with = |name: &'static str, value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            h
        };
        for (source, header) in [(&gh, "x-github-delivery"), (&hmac_header, "x-id")] {
            let first = source
                .event_id(&with(header, "guid-1"), &json, body)
                .unwrap();
            let replay = source
                .event_id(&with(header, "guid-2"), &json, body)
                .unwrap();
            assert_eq!(
                first.0, replay.0,
                "{}: a new unsigned id is the same event",
                source.name
            );
            assert_ne!(first.1, replay.1, "the sender's ids are kept for tracing");
            let other = source
                .event_id(&with(header, "guid-1"), &json, br#"{"id":"o-2"}"#)
                .unwrap();
            assert_ne!(first.0, other.0, "another signed body is another event");
        }
        // An id inside the signed body is the sender's own, signed.
        let (id, sender) = hmac_body.event_id(&HeaderMap::new(), &json, body).unwrap();
        assert_eq!((id.as_str(), sender), ("shop:o-1", None));
    }

    #[test]
    fn an_id_or_attribute_with_a_control_character_is_refused() {
        let stripe = Source::new(
            "stripe",
            &config("scheme = \"stripe\"\nsecrets = [\"k\"]\nevent_type = { json = \"/type\" }\ntopic = \"t\""),
        )
        .unwrap();
        let h = HeaderMap::new();
        for (id, code, at) in [
            ("evt\n1", 0x0a, 3),
            ("\u{7f}x", 0x7f, 0),
            ("a\u{85}b", 0x85, 1),
        ] {
            let body = serde_json::json!({"id": id, "type": "t"});
            let err = stripe.event_id(&h, &body, b"").unwrap_err();
            assert_eq!(
                err,
                InvalidEvent::ControlCharacter {
                    what: "delivery id",
                    code,
                    at
                }
            );
            assert!(err.to_string().contains("control character"), "{err}");
        }
        let body = serde_json::json!({"id": "evt_1", "type": "charge\u{0}"});
        assert!(matches!(
            stripe.event_type(&h, &body),
            Err(InvalidEvent::ControlCharacter {
                what: "event type",
                ..
            })
        ));
        let fine = serde_json::json!({"id": "évt_1 ✓", "type": "t"});
        assert_eq!(stripe.event_id(&h, &fine, b"").unwrap().0, "stripe:évt_1 ✓");
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
            stripe.event_id(&h, &body, b"").unwrap_err().to_string(),
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
            stripe.event_id(&h, &body, b"").unwrap().0,
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

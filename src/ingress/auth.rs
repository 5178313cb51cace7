//! Webhook signature verification: Standard Webhooks, Stripe, GitHub, Slack and generic HMAC,
//! as `../shared/conventions.md` specifies them.
//!
//! Every scheme verifies the exact raw body bytes with HMAC-SHA256, compares in constant time
//! with a length check (`Mac::verify_slice`), rejects a missing or empty signature, and tries
//! every configured secret so secrets can rotate. Schemes that sign a timestamp reject one
//! outside the tolerance, past or future. Header parsing never panics: a truncated or garbled
//! signature is simply a bad signature.

use axum::http::HeaderMap;
use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

/// How a generic HMAC signature is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Lower- or upper-case hex.
    Hex,
    /// Standard base64.
    Base64,
}

/// A signature scheme and its scheme-specific settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// Standard Webhooks 1.0 (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
    StandardWebhooks,
    /// Stripe (`Stripe-Signature: t=..,v1=..`).
    Stripe,
    /// GitHub (`X-Hub-Signature-256: sha256=..`, `X-GitHub-Delivery`).
    GitHub,
    /// Slack (`X-Slack-Signature: v0=..`, `X-Slack-Request-Timestamp`).
    Slack,
    /// HMAC-SHA256 of the raw body in a configurable header.
    Hmac {
        /// Header carrying the signature.
        header: String,
        /// Prefix before the encoded signature, e.g. `sha256=`; may be empty.
        prefix: String,
        /// Signature encoding.
        encoding: Encoding,
    },
}

pub use crate::signing::Secret;

impl Secret {
    /// A secret for `scheme` from its configured text. Standard Webhooks secrets are
    /// `whsec_<base64>` (the prefix is optional) and are base64-decoded
    /// ([`Secret::standard_webhooks`]); the other schemes use the text as-is.
    pub fn new(scheme: &Scheme, text: &str) -> Result<Secret, String> {
        match scheme {
            Scheme::StandardWebhooks => Secret::standard_webhooks(text),
            _ => Secret::raw(text),
        }
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A required header is absent or empty.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// The timestamp header is not a unix time in seconds.
    #[error("malformed timestamp")]
    MalformedTimestamp,
    /// The signed timestamp is outside the tolerance.
    #[error("timestamp is {skew_secs} s away from now (tolerance {tolerance_secs} s)")]
    StaleTimestamp {
        /// Signed timestamp minus now.
        skew_secs: i64,
        /// Allowed absolute skew.
        tolerance_secs: i64,
    },
    /// No signature matched any secret.
    #[error("signature does not match")]
    BadSignature,
}

impl AuthError {
    /// Stable code for metrics (`outcome`) and logs.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingHeader(_) | AuthError::BadSignature => "bad_signature",
            AuthError::MalformedTimestamp | AuthError::StaleTimestamp { .. } => "stale_timestamp",
        }
    }
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Index of the secret that matched (for the "which secret" metric during rotation).
    pub secret_index: usize,
    /// The signed timestamp, for schemes that sign one.
    pub timestamp: Option<i64>,
    /// The delivery id the scheme carries in headers, if any (`webhook-id`,
    /// `X-GitHub-Delivery`).
    pub delivery_id: Option<String>,
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, AuthError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(AuthError::MissingHeader(name))
}

fn check_timestamp(text: &str, now: i64, tolerance: i64) -> Result<i64, AuthError> {
    let ts: i64 = text.parse().map_err(|_| AuthError::MalformedTimestamp)?;
    let skew = ts.saturating_sub(now);
    if skew.saturating_abs() > tolerance {
        return Err(AuthError::StaleTimestamp {
            skew_secs: skew,
            tolerance_secs: tolerance,
        });
    }
    Ok(ts)
}

/// Whether `tag` is HMAC-SHA256(`key`, `parts` concatenated), in constant time.
fn matches(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(key) else {
        return false;
    };
    for p in parts {
        mac.update(p);
    }
    mac.verify_slice(tag).is_ok()
}

/// The first secret that signed `parts` with one of `tags`.
fn first_match(secrets: &[Secret], parts: &[&[u8]], tags: &[Vec<u8>]) -> Option<usize> {
    secrets.iter().position(|s| {
        tags.iter()
            .any(|t| !t.is_empty() && matches(s.key(), parts, t))
    })
}

/// Verifies a request's signature over its raw `body`. `now` is the current unix time and
/// `tolerance_secs` the allowed timestamp skew, both ways.
pub fn verify(
    scheme: &Scheme,
    secrets: &[Secret],
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<Verified, AuthError> {
    let hex = |s: &str| hex::decode(s).unwrap_or_default();
    let b64 = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .unwrap_or_default()
    };
    match scheme {
        Scheme::StandardWebhooks => {
            let id = header(headers, "webhook-id")?;
            let ts = header(headers, "webhook-timestamp")?;
            let sigs = header(headers, "webhook-signature")?;
            let timestamp = check_timestamp(ts, now, tolerance_secs)?;
            // Space-separated `v1,<base64>`; other versions are ignored, never trusted.
            let tags: Vec<Vec<u8>> = sigs
                .split(' ')
                .filter_map(|s| s.strip_prefix("v1,"))
                .map(b64)
                .collect();
            let parts: [&[u8]; 5] = [id.as_bytes(), b".", ts.as_bytes(), b".", body];
            let secret_index =
                first_match(secrets, &parts, &tags).ok_or(AuthError::BadSignature)?;
            Ok(Verified {
                secret_index,
                timestamp: Some(timestamp),
                delivery_id: Some(id.to_string()),
            })
        }
        Scheme::Stripe => {
            let sig = header(headers, "stripe-signature")?;
            let mut ts = None;
            let mut tags = Vec::new();
            for item in sig.split(',') {
                match item.trim().split_once('=') {
                    Some(("t", v)) => ts = Some(v),
                    Some(("v1", v)) => tags.push(hex(v)),
                    _ => {}
                }
            }
            let ts = ts.ok_or(AuthError::MalformedTimestamp)?;
            let timestamp = check_timestamp(ts, now, tolerance_secs)?;
            let parts: [&[u8]; 3] = [ts.as_bytes(), b".", body];
            let secret_index =
                first_match(secrets, &parts, &tags).ok_or(AuthError::BadSignature)?;
            Ok(Verified {
                secret_index,
                timestamp: Some(timestamp),
                delivery_id: None,
            })
        }
        Scheme::GitHub => {
            let sig = header(headers, "x-hub-signature-256")?;
            let tag = sig.strip_prefix("sha256=").map(hex).unwrap_or_default();
            let secret_index =
                first_match(secrets, &[body], &[tag]).ok_or(AuthError::BadSignature)?;
            Ok(Verified {
                secret_index,
                timestamp: None,
                delivery_id: headers
                    .get("x-github-delivery")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            })
        }
        Scheme::Slack => {
            let sig = header(headers, "x-slack-signature")?;
            let ts = header(headers, "x-slack-request-timestamp")?;
            let timestamp = check_timestamp(ts, now, tolerance_secs)?;
            let tag = sig.strip_prefix("v0=").map(hex).unwrap_or_default();
            let parts: [&[u8]; 4] = [b"v0:", ts.as_bytes(), b":", body];
            let secret_index =
                first_match(secrets, &parts, &[tag]).ok_or(AuthError::BadSignature)?;
            Ok(Verified {
                secret_index,
                timestamp: Some(timestamp),
                delivery_id: None,
            })
        }
        Scheme::Hmac {
            header: name,
            prefix,
            encoding,
        } => {
            let sig = headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .ok_or(AuthError::MissingHeader("signature"))?;
            let tag = match (sig.strip_prefix(prefix.as_str()), encoding) {
                (Some(v), Encoding::Hex) => hex(v),
                (Some(v), Encoding::Base64) => b64(v),
                (None, _) => Vec::new(),
            };
            let secret_index =
                first_match(secrets, &[body], &[tag]).ok_or(AuthError::BadSignature)?;
            Ok(Verified {
                secret_index,
                timestamp: None,
                delivery_id: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const NOW: i64 = 1_700_000_000;
    const BODY: &[u8] = br#"{"comment":{"id":7,"text":"Great post!"}}"#;

    fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().to_vec()
    }

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn sw_key() -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap()
    }

    fn sw_headers(ts: i64, body: &[u8], sig_override: Option<String>) -> HeaderMap {
        let ts = ts.to_string();
        let tag = mac(&sw_key(), &[b"msg_1", b".", ts.as_bytes(), b".", body]);
        let sig = sig_override.unwrap_or_else(|| {
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(tag)
            )
        });
        headers(&[
            ("webhook-id", "msg_1".into()),
            ("webhook-timestamp", ts),
            ("webhook-signature", sig),
        ])
    }

    fn sw(h: &HeaderMap, body: &[u8]) -> Result<Verified, AuthError> {
        let secret = Secret::new(&Scheme::StandardWebhooks, WHSEC).unwrap();
        verify(&Scheme::StandardWebhooks, &[secret], h, body, NOW, 300)
    }

    #[test]
    fn a_standard_webhooks_secret_without_a_key_is_refused() {
        for text in ["whsec_", "whsec_AAAA", "whsec_ not base64"] {
            let err = Secret::new(&Scheme::StandardWebhooks, text).unwrap_err();
            assert!(err.contains("whsec_<base64>"), "{text}: {err}");
        }
        assert!(Secret::new(&Scheme::StandardWebhooks, "").is_err());
        assert!(Secret::new(&Scheme::StandardWebhooks, WHSEC).is_ok());
    }

    #[test]
    fn accepts_a_valid_standard_webhooks_signature() {
        let v = sw(&sw_headers(NOW, BODY, None), BODY).unwrap();
        assert_eq!(v.delivery_id.as_deref(), Some("msg_1"));
        assert_eq!(v.timestamp, Some(NOW));
    }

    #[test]
    fn signing_produces_what_verification_accepts() {
        let secret = Secret::new(&Scheme::StandardWebhooks, WHSEC).unwrap();
        let signed = secret.sign_standard_webhooks("msg_1", NOW, BODY);
        assert_eq!(
            signed,
            sw_headers(NOW, BODY, None)["webhook-signature"]
                .to_str()
                .unwrap()
        );
        let h = sw_headers(NOW, BODY, Some(signed));
        assert!(sw(&h, BODY).is_ok());
    }

    #[test]
    fn rejects_a_body_with_one_flipped_byte() {
        let mut body = BODY.to_vec();
        body[10] ^= 0x01;
        assert_eq!(
            sw(&sw_headers(NOW, BODY, None), &body),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn rejects_empty_truncated_and_unknown_version_signatures() {
        for sig in ["v1,", "v1, ", "v2,abc", "v1,AAAA", "garbage", "v1"] {
            let h = sw_headers(NOW, BODY, Some(sig.to_string()));
            assert!(sw(&h, BODY).is_err(), "{sig:?} must be rejected");
        }
        // A truncated valid signature.
        let good = sw_headers(NOW, BODY, None);
        let sig = good["webhook-signature"].to_str().unwrap();
        let h = sw_headers(NOW, BODY, Some(sig[..sig.len() - 6].to_string()));
        assert_eq!(sw(&h, BODY), Err(AuthError::BadSignature));
    }

    #[test]
    fn rejects_a_missing_signature_header() {
        let mut h = sw_headers(NOW, BODY, None);
        h.remove("webhook-signature");
        assert_eq!(
            sw(&h, BODY),
            Err(AuthError::MissingHeader("webhook-signature"))
        );
    }

    #[test]
    fn rejects_a_reserialized_body() {
        let value: serde_json::Value = serde_json::from_slice(BODY).unwrap();
        let pretty = serde_json::to_vec_pretty(&value).unwrap();
        assert_eq!(
            sw(&sw_headers(NOW, BODY, None), &pretty),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn accepts_either_secret_during_rotation_and_says_which() {
        let old = Secret::new(
            &Scheme::StandardWebhooks,
            "whsec_b2xkLXNlY3JldC1rZXktcm90YXRlZC0x",
        )
        .unwrap();
        let new = Secret::new(&Scheme::StandardWebhooks, WHSEC).unwrap();
        let h = sw_headers(NOW, BODY, None);
        let v = verify(&Scheme::StandardWebhooks, &[old, new], &h, BODY, NOW, 300).unwrap();
        assert_eq!(v.secret_index, 1);
        // Several signatures in one header: any one may match.
        let good = h["webhook-signature"].to_str().unwrap().to_string();
        let h2 = sw_headers(NOW, BODY, Some(format!("v1,AAAA {good}")));
        assert!(sw(&h2, BODY).is_ok());
    }

    #[test]
    fn accepts_skew_of_299_seconds_and_rejects_301_both_ways() {
        for skew in [-299, 299] {
            assert!(
                sw(&sw_headers(NOW + skew, BODY, None), BODY).is_ok(),
                "{skew}"
            );
        }
        for skew in [-301i64, 301] {
            assert_eq!(
                sw(&sw_headers(NOW + skew, BODY, None), BODY),
                Err(AuthError::StaleTimestamp {
                    skew_secs: skew,
                    tolerance_secs: 300
                })
            );
        }
    }

    #[test]
    fn stripe_github_slack_and_generic_hmac_verify_their_formats() {
        let key = b"shhh";
        let ts = NOW.to_string();
        // Stripe: only v1 counts, several allowed, secret used as-is.
        let tag = hex::encode(mac(key, &[ts.as_bytes(), b".", BODY]));
        let scheme = Scheme::Stripe;
        let s = [Secret::new(&scheme, "shhh").unwrap()];
        let h = headers(&[(
            "stripe-signature",
            format!("t={ts},v0=dead,v1=beef,v1={tag}"),
        )]);
        assert!(verify(&scheme, &s, &h, BODY, NOW, 300).is_ok());
        let h = headers(&[("stripe-signature", format!("t={ts},v0={tag}"))]);
        assert_eq!(
            verify(&scheme, &s, &h, BODY, NOW, 300),
            Err(AuthError::BadSignature)
        );
        // GitHub: sha256=<hex> over the body; the delivery GUID is the dedup id.
        let tag = hex::encode(mac(key, &[BODY]));
        let scheme = Scheme::GitHub;
        let h = headers(&[
            ("x-hub-signature-256", format!("sha256={tag}")),
            (
                "x-github-delivery",
                "72d3162e-cc78-11e3-81ab-4c9367dc0958".into(),
            ),
        ]);
        let v = verify(&scheme, &s, &h, BODY, NOW, 300).unwrap();
        assert_eq!(
            v.delivery_id.as_deref(),
            Some("72d3162e-cc78-11e3-81ab-4c9367dc0958")
        );
        let h = headers(&[("x-hub-signature-256", format!("sha256={}", &tag[..10]))]);
        assert_eq!(
            verify(&scheme, &s, &h, BODY, NOW, 300),
            Err(AuthError::BadSignature)
        );
        // Slack: v0:{ts}:{body}.
        let tag = hex::encode(mac(key, &[b"v0:", ts.as_bytes(), b":", BODY]));
        let scheme = Scheme::Slack;
        let h = headers(&[
            ("x-slack-signature", format!("v0={tag}")),
            ("x-slack-request-timestamp", ts.clone()),
        ]);
        assert!(verify(&scheme, &s, &h, BODY, NOW, 300).is_ok());
        assert!(verify(&scheme, &s, &h, BODY, NOW + 301, 300).is_err());
        // Generic: configurable header, prefix and encoding.
        let scheme = Scheme::Hmac {
            header: "x-signature".into(),
            prefix: "hmac-sha256=".into(),
            encoding: Encoding::Base64,
        };
        let tag = base64::engine::general_purpose::STANDARD.encode(mac(key, &[BODY]));
        let h = headers(&[("x-signature", format!("hmac-sha256={tag}"))]);
        assert!(verify(&scheme, &s, &h, BODY, NOW, 300).is_ok());
        let h = headers(&[("x-signature", tag)]);
        assert_eq!(
            verify(&scheme, &s, &h, BODY, NOW, 300),
            Err(AuthError::BadSignature)
        );
    }
}

//! Webhook signature verification (`spillway::ingress::auth`) on hostile headers and bodies.
//!
//! Input format (what `fuzz/seeds/make_seeds.py` writes):
//!
//! - byte 0 picks the scheme, modulo 6: Standard Webhooks, Stripe, GitHub, Slack, generic
//!   HMAC in hex (`x-signature: sha256=<hex>`), generic HMAC in base64
//!   (`x-shopify-hmac-sha256: <base64>`);
//! - then newline-separated fields: the signature header's value, the timestamp header's value
//!   (Standard Webhooks, Slack), the delivery-id header's value (Standard Webhooks, GitHub), the
//!   text of one more secret (given to `Secret::new` and appended to the fixed secret);
//! - the rest, newlines included, is the body.
//!
//! A field the input ends before, or the scheme has no header for, leaves its header out; a
//! value `HeaderValue::from_bytes` refuses (control characters) is left out too, as no HTTP
//! server would deliver it.
//!
//! Checks: nothing panics; an accepted request names a configured secret and a timestamp inside
//! the tolerance, is accepted again (determinism), and is refused once one byte is appended to
//! its body; and a Standard Webhooks signature made by `Secret::sign_standard_webhooks` for the
//! fuzzed id and body verifies.

#![no_main]

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use spillway::ingress::auth::{verify, AuthError, Encoding, Scheme, Secret};

/// The fixed "current time" of every verification.
const NOW: i64 = 1_700_000_000;
/// Allowed timestamp skew, both ways (the ingress default).
const TOLERANCE_SECS: i64 = 300;

/// Keep in step with `fuzz/seeds/make_seeds.py`, which signs the seeds with these.
const STANDARD_WEBHOOKS_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STRIPE_SECRET: &str = "whsec_spillway_fuzz_stripe_endpoint_secret";
/// GitHub's documentation example.
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
/// Slack's documentation example.
const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const HMAC_SECRET: &str = "spillway-fuzz-hmac-secret";

/// One scheme with its fixed secret and the headers the input's fields go to.
struct Case {
    scheme: Scheme,
    secrets: Vec<Secret>,
    signature_header: &'static str,
    timestamp_header: Option<&'static str>,
    id_header: Option<&'static str>,
}

fn case(
    scheme: Scheme,
    secret: &str,
    signature_header: &'static str,
    timestamp_header: Option<&'static str>,
    id_header: Option<&'static str>,
) -> Case {
    let secrets = vec![Secret::new(&scheme, secret).expect("the fixed secret is valid")];
    Case {
        scheme,
        secrets,
        signature_header,
        timestamp_header,
        id_header,
    }
}

fn cases() -> &'static [Case] {
    static CASES: OnceLock<Vec<Case>> = OnceLock::new();
    CASES.get_or_init(|| {
        vec![
            case(
                Scheme::StandardWebhooks,
                STANDARD_WEBHOOKS_SECRET,
                "webhook-signature",
                Some("webhook-timestamp"),
                Some("webhook-id"),
            ),
            case(
                Scheme::Stripe,
                STRIPE_SECRET,
                "stripe-signature",
                None,
                None,
            ),
            case(
                Scheme::GitHub,
                GITHUB_SECRET,
                "x-hub-signature-256",
                None,
                Some("x-github-delivery"),
            ),
            case(
                Scheme::Slack,
                SLACK_SECRET,
                "x-slack-signature",
                Some("x-slack-request-timestamp"),
                None,
            ),
            case(
                Scheme::Hmac {
                    header: "x-signature".into(),
                    prefix: "sha256=".into(),
                    encoding: Encoding::Hex,
                },
                HMAC_SECRET,
                "x-signature",
                None,
                None,
            ),
            case(
                Scheme::Hmac {
                    header: "x-shopify-hmac-sha256".into(),
                    prefix: String::new(),
                    encoding: Encoding::Base64,
                },
                HMAC_SECRET,
                "x-shopify-hmac-sha256",
                None,
                None,
            ),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let cases = cases();
    let case = &cases[usize::from(selector) % cases.len()];

    let mut fields = rest.splitn(5, |&b| b == b'\n');
    let signature = fields.next();
    let timestamp = fields.next();
    let id = fields.next();
    let extra_secret = fields.next();
    let body = fields.next().unwrap_or(&[]);

    let mut headers = HeaderMap::new();
    for (name, value) in [
        (Some(case.signature_header), signature),
        (case.timestamp_header, timestamp),
        (case.id_header, id),
    ] {
        if let (Some(name), Some(value)) = (name, value) {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.append(HeaderName::from_static(name), value);
            }
        }
    }

    let mut secrets = case.secrets.clone();
    if let Some(text) = extra_secret.and_then(|b| std::str::from_utf8(b).ok()) {
        // The `whsec_<base64>` decoding, whatever the scheme in use.
        let _ = Secret::new(&Scheme::StandardWebhooks, text);
        if let Ok(secret) = Secret::new(&case.scheme, text) {
            secrets.push(secret);
        }
    }

    let first = verify(&case.scheme, &secrets, &headers, body, NOW, TOLERANCE_SECS);
    match &first {
        Ok(verified) => {
            assert!(
                verified.secret_index < secrets.len(),
                "secret_index {} of {} secrets",
                verified.secret_index,
                secrets.len()
            );
            if let Some(ts) = verified.timestamp {
                assert!(
                    ts.saturating_sub(NOW).saturating_abs() <= TOLERANCE_SECS,
                    "accepted timestamp {ts} is outside the tolerance"
                );
            }
            assert_eq!(
                verify(&case.scheme, &secrets, &headers, body, NOW, TOLERANCE_SECS),
                first,
                "verification is not deterministic"
            );
            // Every scheme signs the body last: one more byte must break the signature.
            let mut longer = body.to_vec();
            longer.push(b'\n');
            assert_eq!(
                verify(
                    &case.scheme,
                    &secrets,
                    &headers,
                    &longer,
                    NOW,
                    TOLERANCE_SECS
                ),
                Err(AuthError::BadSignature),
                "a body with one more byte was accepted"
            );
        }
        Err(e) => {
            let _ = (e.code(), e.to_string());
        }
    }

    // Sign and verify round trip: what Spillway's own webhook sink sends must verify, for any
    // id a header can carry and any body.
    if case.scheme == Scheme::StandardWebhooks {
        let id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty());
        if let Some(id) = id {
            let signature = case.secrets[0].sign_standard_webhooks(id, NOW, body);
            let mut signed = HeaderMap::new();
            signed.insert(
                "webhook-id",
                HeaderValue::from_str(id).expect("a trimmed header value is a header value"),
            );
            signed.insert("webhook-timestamp", HeaderValue::from(NOW));
            signed.insert(
                "webhook-signature",
                HeaderValue::from_str(&signature).expect("v1,<base64> is a header value"),
            );
            let verified = verify(
                &case.scheme,
                &case.secrets,
                &signed,
                body,
                NOW,
                TOLERANCE_SECS,
            )
            .expect("sign_standard_webhooks output must verify");
            assert_eq!(verified.secret_index, 0);
            assert_eq!(verified.timestamp, Some(NOW));
            assert_eq!(verified.delivery_id.as_deref(), Some(id));
        }
    }
});

//! Signing secrets and Standard Webhooks signatures: the key material the ingress verifies
//! senders with ([`crate::ingress::auth`]) and the webhook sink signs its own requests with
//! ([`crate::sink::webhook`]). Neither side owns it, so it lives here.

use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Shortest Standard Webhooks key accepted, in bytes (the specification generates 24 to 64):
/// an empty key would make every signature computable by anyone.
const MIN_STANDARD_WEBHOOKS_KEY_BYTES: usize = 16;

/// One signing secret, as the key bytes. Its `Debug` never shows them.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// A Standard Webhooks secret, `whsec_<base64>` (the prefix is optional), base64-decoded
    /// to at least 16 bytes.
    pub fn standard_webhooks(text: &str) -> Result<Secret, String> {
        if text.is_empty() {
            return Err("secret is empty".into());
        }
        let b64 = text.strip_prefix("whsec_").unwrap_or(text);
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("a Standard Webhooks secret must be whsec_<base64>: {e}"))?;
        if key.len() < MIN_STANDARD_WEBHOOKS_KEY_BYTES {
            return Err(format!(
                "a Standard Webhooks secret must be whsec_<base64> of at least \
                 {MIN_STANDARD_WEBHOOKS_KEY_BYTES} bytes; this one decodes to {} bytes",
                key.len()
            ));
        }
        Ok(Secret(key))
    }

    /// A secret used as-is (Stripe, GitHub, Slack, generic HMAC).
    pub fn raw(text: &str) -> Result<Secret, String> {
        if text.is_empty() {
            return Err("secret is empty".into());
        }
        Ok(Secret(text.as_bytes().to_vec()))
    }

    /// The key bytes, for HMAC.
    pub(crate) fn key(&self) -> &[u8] {
        &self.0
    }

    /// The Standard Webhooks `webhook-signature` value (`v1,<base64>`) for a message: what a
    /// sender puts on the wire, and what Spillway's own webhook sink sends.
    pub fn sign_standard_webhooks(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

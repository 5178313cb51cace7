//! Outbound HTTP: how the sinks and the LLM client build their clients and read what a server
//! asks of them.
//!
//! - **Redirects are never followed.** A followed 301/302/303 turns a POST into a body-less
//!   GET whose 2xx would count as success (the event lost), and a redirect to another host
//!   would take the request's credentials with it. A 3xx is an error of its own, carrying the
//!   `Location`, so the configured URL gets fixed; credentials only ever go to the host that
//!   was configured.
//! - **Server-given waits are capped** at [`MAX_SERVER_WAIT`]: a `Retry-After` of a year
//!   must not hold an event, its key and its partition for a year.

use std::time::Duration;

use reqwest::header::{HeaderMap, LOCATION, RETRY_AFTER};
use reqwest::StatusCode;

/// The longest wait a server can ask for with `Retry-After` or `retry-after-ms`.
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(3_600);

/// Longest origin of a redirect target quoted in an error message, in characters: a host
/// may be hundreds of characters long, and the message goes into a DLQ header.
const MAX_ORIGIN_CHARS: usize = 120;

/// A client that never follows redirects, with the given per-request timeout (unset: the
/// caller sets one per request), connect timeout and default headers.
pub fn client(
    timeout: Option<Duration>,
    connect_timeout: Duration,
    headers: HeaderMap,
) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .default_headers(headers);
    if let Some(timeout) = timeout {
        builder = builder.timeout(timeout);
    }
    builder.build()
}

/// For a 3xx answer, a message naming the status and where it pointed (the redirect itself is
/// not followed); `None` for any other status. Only the `Location`'s origin is quoted
/// (`https://host:port`): its path and query may hold a token (a Slack incoming webhook's path
/// is its secret), and the message goes to logs and DLQ headers.
pub fn redirect_message(status: StatusCode, headers: &HeaderMap) -> Option<String> {
    if !status.is_redirection() {
        return None;
    }
    let target = match headers.get(LOCATION).map(|v| v.to_str()) {
        None => "nowhere (no Location header)".to_string(),
        Some(Err(_)) => "an unreadable Location".to_string(),
        Some(Ok(location)) => match reqwest::Url::parse(location.trim()) {
            Ok(url) if url.has_host() => {
                let origin = url.origin().ascii_serialization();
                if origin.len() > MAX_ORIGIN_CHARS {
                    // Only ASCII here: cutting at a byte is cutting at a character.
                    format!("{}… (cut; path not shown)", &origin[..MAX_ORIGIN_CHARS])
                } else {
                    format!("{origin}/… (path not shown)")
                }
            }
            Ok(_) => "a URL without a host".to_string(),
            // A relative reference: another path on the configured host.
            Err(_) => "another path on the same host".to_string(),
        },
    };
    Some(format!(
        "answered {status} redirecting to {target}; redirects are not followed: set the final \
         URL in the configuration"
    ))
}

/// The wait a server asked for: `retry-after-ms` (milliseconds, as OpenAI sends it), else
/// `Retry-After` in seconds, capped at [`MAX_SERVER_WAIT`]. The HTTP-date form of
/// `Retry-After` is rare for APIs and ignored, as are negative or non-numeric values.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let v: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        (v.is_finite() && v >= 0.0).then_some(v)
    };
    let secs = number("retry-after-ms")
        .map(|ms| ms / 1_000.0)
        .or_else(|| number(RETRY_AFTER.as_str()))?;
    Some(Duration::from_secs_f64(
        secs.min(MAX_SERVER_WAIT.as_secs_f64()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_server_given_wait_is_capped_at_an_hour() {
        for (name, value) in [
            ("retry-after", "31536000"),
            ("retry-after", "18446744073709551616"),
            ("retry-after", "1e300"),
            ("retry-after-ms", "99999999999999"),
        ] {
            assert_eq!(
                retry_after(&headers(&[(name, value)])),
                Some(MAX_SERVER_WAIT),
                "{name}: {value}"
            );
        }
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")])),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[
                ("retry-after", "2"),
                ("retry-after-ms", "1250")
            ])),
            Some(Duration::from_millis(1250)),
            "retry-after-ms wins"
        );
        for bad in ["-1", "NaN", "inf", "Wed, 21 Oct 2015 07:28:00 GMT", ""] {
            assert_eq!(
                retry_after(&headers(&[("retry-after", bad)])),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_redirect_names_where_it_pointed_without_the_path_or_query_that_may_hold_a_token() {
        let h = headers(&[(
            "location",
            "https://user:pw@hooks.elsewhere.example:8443/services/T0/B0/s3cr3t?token=abc",
        )]);
        let m = redirect_message(StatusCode::FOUND, &h).unwrap();
        assert!(
            m.contains("302") && m.contains("https://hooks.elsewhere.example:8443"),
            "{m}"
        );
        for secret in ["s3cr3t", "token", "abc", "user", "pw@"] {
            assert!(!m.contains(secret), "{secret} leaked: {m}");
        }
        assert!(redirect_message(StatusCode::OK, &h).is_none());
        assert!(redirect_message(StatusCode::NOT_FOUND, &h).is_none());
        let relative = redirect_message(
            StatusCode::SEE_OTHER,
            &headers(&[("location", "/v2/x?k=1")]),
        )
        .unwrap();
        assert!(
            relative.contains("another path on the same host"),
            "{relative}"
        );
        // Found by the llm_answer fuzz target: a 400-character host made a 447-character message.
        let host = format!("https://{}.example", "r".repeat(400));
        let long = redirect_message(StatusCode::FOUND, &headers(&[("location", &host)])).unwrap();
        assert!(
            long.chars().count() <= 300,
            "{} characters",
            long.chars().count()
        );
        let none = redirect_message(StatusCode::TEMPORARY_REDIRECT, &HeaderMap::new()).unwrap();
        assert!(none.contains("no Location"), "{none}");
    }
}

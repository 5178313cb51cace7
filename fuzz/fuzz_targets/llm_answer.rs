//! LLM provider answers (`spillway::llm::client`): the completion parser, the error
//! classifier and the rate-limit / `Retry-After` header readers, for both wire APIs.
//!
//! Input format (what `fuzz/seeds/make_seeds.py` writes):
//!
//! - byte 0: bit 0 picks the API (0 = OpenAI chat completions, 1 = Anthropic messages);
//! - bytes 1-2: big-endian `u16`; the status is `100 + value % 500` (100..=599);
//! - then `name: value` header lines (LF or CRLF) up to the first empty line; lines without a
//!   colon, or with a name or value `http` refuses, are skipped, as no HTTP client would
//!   deliver them;
//! - the rest is the body.
//!
//! Also `spillway::outbound::redirect_message`, which turns a 3xx into the error message.
//!
//! Checks: nothing panics; `retry_after` never says more than an hour, and `rate_headers`
//! reports the same value; a parsed completion came from a JSON body; an error classification
//! keeps at most 300 characters of the provider's message and the status it was given; only a
//! 3xx is a redirect, and its message stays short whatever the `Location`.

#![no_main]

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use spillway::llm::config::ProviderApi;
use spillway::llm::client::{
    classify_error, parse_completion, rate_headers, retry_after, CallError,
};
use spillway::outbound::redirect_message;

/// `retry_after` caps the provider's wish at an hour.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3_600);
/// `classify_error` keeps this many characters of the provider's message.
const MAX_MESSAGE_CHARS: usize = 300;
/// `redirect_message` quotes at most 200 characters of the `Location`; the rest of its text is
/// well under another 200.
const MAX_REDIRECT_MESSAGE_CHARS: usize = 400;

/// Splits the header lines, up to the first empty line, from the body.
fn parse_head(input: &[u8]) -> (HeaderMap, &[u8]) {
    let mut headers = HeaderMap::new();
    let mut rest = input;
    loop {
        let (line, tail) = match rest.iter().position(|&b| b == b'\n') {
            Some(n) => (&rest[..n], &rest[n + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = tail;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return (headers, rest);
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = HeaderName::from_bytes(line[..colon].trim_ascii());
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.append(name, value);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [api, hi, lo, rest @ ..] = data else {
        return;
    };
    let api = if *api & 1 == 0 {
        ProviderApi::OpenAi
    } else {
        ProviderApi::Anthropic
    };
    let status = StatusCode::from_u16(100 + u16::from_be_bytes([*hi, *lo]) % 500)
        .expect("100..=599 is a status code");
    let (headers, body) = parse_head(rest);

    let after = retry_after(&headers);
    if let Some(after) = after {
        assert!(
            after <= MAX_RETRY_AFTER,
            "retry_after {after:?} exceeds an hour"
        );
    }
    let rate = rate_headers(api, &headers);
    assert_eq!(
        rate.retry_after, after,
        "rate_headers disagrees with retry_after"
    );

    if let Ok(completion) = parse_completion(api, body) {
        assert!(
            serde_json::from_slice::<serde_json::Value>(body).is_ok(),
            "parsed {completion:?} from a body that is not JSON"
        );
    }

    let error = classify_error(status, body);
    match &error {
        CallError::Quota(message)
        | CallError::ContextOverflow(message)
        | CallError::Rejected { message, .. } => {
            assert!(
                message.chars().count() <= MAX_MESSAGE_CHARS,
                "kept {} characters of the provider's message",
                message.chars().count()
            );
        }
        CallError::Auth(code) | CallError::Unavailable(code) => {
            assert_eq!(*code, status.as_u16());
        }
        _ => {}
    }
    if let CallError::Rejected { status: code, .. } = &error {
        assert_eq!(*code, status.as_u16());
    }
    let _ = (error.code(), error.class(), error.to_string());

    let redirect = redirect_message(status, &headers);
    assert_eq!(
        redirect.is_some(),
        status.is_redirection(),
        "{status}: {redirect:?}"
    );
    if let Some(message) = redirect {
        assert!(
            message.chars().count() <= MAX_REDIRECT_MESSAGE_CHARS,
            "a {}-character redirect message",
            message.chars().count()
        );
    }
});

#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/seeds/<target>/, deterministically.

Run from anywhere: python3 fuzz/seeds/make_seeds.py. Each seed is a plausible, mostly valid
input in its target's input format (documented at the top of fuzz/fuzz_targets/<target>.rs):
correctly signed webhook requests, real Confluent-framed Avro envelopes, the shipped
configuration files and real provider answers. Standard library only.
"""

import base64
import hashlib
import hmac
import json
import shutil
import struct
from pathlib import Path

SEEDS = Path(__file__).resolve().parent
REPO = SEEDS.parent.parent

# --- signatures ----------------------------------------------------------------------------
# Keep in step with fuzz/fuzz_targets/signatures.rs.
NOW = 1_700_000_000
STANDARD_WEBHOOKS, STRIPE, GITHUB, SLACK, HMAC_HEX, HMAC_BASE64 = range(6)
STANDARD_WEBHOOKS_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STRIPE_SECRET = "whsec_spillway_fuzz_stripe_endpoint_secret"
GITHUB_SECRET = "It's a Secret to Everybody"
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
HMAC_SECRET = "spillway-fuzz-hmac-secret"
# A second secret, as during a rotation: the line after the id in the input.
OLD_STANDARD_WEBHOOKS_SECRET = "whsec_b2xkLXNlY3JldC1rZXktcm90YXRlZC0x"
# Secret::new refuses Standard Webhooks keys shorter than 16 bytes.
assert len(base64.b64decode(OLD_STANDARD_WEBHOOKS_SECRET.removeprefix("whsec_"))) >= 16


def mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def standard_webhooks_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def standard_webhooks_signature(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    tag = mac(standard_webhooks_key(secret), msg_id.encode(), b".", str(ts).encode(), b".", body)
    return "v1," + b64(tag)


def stripe_signature(secret: str, ts: int, body: bytes) -> str:
    return f"t={ts},v1={mac(secret.encode(), str(ts).encode(), b'.', body).hex()}"


def github_signature(secret: str, body: bytes) -> str:
    return "sha256=" + mac(secret.encode(), body).hex()


def slack_signature(secret: str, ts: int, body: bytes) -> str:
    return "v0=" + mac(secret.encode(), b"v0:", str(ts).encode(), b":", body).hex()


def signature_input(scheme: int, signature: str, timestamp="", msg_id="", secret="", body=b""):
    head = "\n".join([signature, str(timestamp), msg_id, secret]).encode()
    return bytes([scheme]) + head + b"\n" + body


# The documented examples, as a check of the signing code above.
SW_DOC_BODY = b'{"test": 2432232314}'
SW_DOC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_DOC_TS = 1614265330
assert (
    standard_webhooks_signature(STANDARD_WEBHOOKS_SECRET, SW_DOC_ID, SW_DOC_TS, SW_DOC_BODY)
    == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
), "Standard Webhooks documentation example"
assert (
    github_signature(GITHUB_SECRET, b"Hello, World!")
    == "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
), "GitHub documentation example"
SLACK_DOC_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow"
    b"&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner"
    b"&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands"
    b"%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_DOC_TS = 1531420618
assert (
    slack_signature(SLACK_SECRET, SLACK_DOC_TS, SLACK_DOC_BODY)
    == "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
), "Slack documentation example"

GITHUB_DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
GITHUB_COMMENT = json.dumps(
    {
        "action": "created",
        "issue": {"number": 1347, "title": "Found a bug", "state": "open"},
        "comment": {"id": 1, "body": "Me too", "user": {"login": "octocat", "id": 1}},
        "repository": {"id": 1296269, "full_name": "octocat/Hello-World"},
        "sender": {"login": "octocat", "id": 1},
    },
    separators=(",", ":"),
).encode()
STRIPE_EVENT = json.dumps(
    {
        "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
        "object": "event",
        "api_version": "2019-02-19",
        "created": NOW,
        "data": {"object": {"id": "pi_3NG8Dt2eZvKYlo2C0ltmj5Ix", "object": "payment_intent",
                            "amount": 2000, "currency": "usd", "status": "succeeded"}},
        "livemode": False,
        "pending_webhooks": 1,
        "type": "payment_intent.succeeded",
    },
    indent=2,
).encode()
BLOG_COMMENT = b'{"post":"hello-world","comment":{"id":7,"author":"ada","text":"Great post!"}}'
SHOPIFY_ORDER = b'{"id":820982911946154508,"email":"jon@example.com","total_price":"598.94"}'


def signature_seeds():
    sw = STANDARD_WEBHOOKS_SECRET
    good = standard_webhooks_signature(sw, SW_DOC_ID, NOW, SW_DOC_BODY)
    comment_sig = standard_webhooks_signature(sw, "msg_2Lh9KRb0pK5YpQ0Yzz1Tb8cUTaB", NOW, BLOG_COMMENT)
    yield "standard-webhooks-valid", signature_input(
        STANDARD_WEBHOOKS, good, NOW, SW_DOC_ID, OLD_STANDARD_WEBHOOKS_SECRET, SW_DOC_BODY)
    yield "standard-webhooks-blog-comment", signature_input(
        STANDARD_WEBHOOKS, comment_sig, NOW, "msg_2Lh9KRb0pK5YpQ0Yzz1Tb8cUTaB", "", BLOG_COMMENT)
    yield "standard-webhooks-two-signatures", signature_input(
        STANDARD_WEBHOOKS, "v1,AAAA " + good, NOW, SW_DOC_ID, "", SW_DOC_BODY)
    yield "standard-webhooks-rotated-secret", signature_input(
        STANDARD_WEBHOOKS,
        standard_webhooks_signature(OLD_STANDARD_WEBHOOKS_SECRET, SW_DOC_ID, NOW, SW_DOC_BODY),
        NOW, SW_DOC_ID, OLD_STANDARD_WEBHOOKS_SECRET, SW_DOC_BODY)
    yield "standard-webhooks-doc-example-stale", signature_input(
        STANDARD_WEBHOOKS, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", SW_DOC_TS,
        SW_DOC_ID, "", SW_DOC_BODY)
    yield "standard-webhooks-short-extra-secret", signature_input(
        STANDARD_WEBHOOKS, good, NOW, SW_DOC_ID, "whsec_AAAA", SW_DOC_BODY)
    yield "standard-webhooks-empty-v1", signature_input(
        STANDARD_WEBHOOKS, "v1,", NOW, SW_DOC_ID, "", SW_DOC_BODY)
    yield "standard-webhooks-truncated", signature_input(
        STANDARD_WEBHOOKS, good[:-6], NOW, SW_DOC_ID, "", SW_DOC_BODY)
    yield "standard-webhooks-skew-299", signature_input(
        STANDARD_WEBHOOKS, standard_webhooks_signature(sw, SW_DOC_ID, NOW + 299, SW_DOC_BODY),
        NOW + 299, SW_DOC_ID, "", SW_DOC_BODY)

    yield "stripe-valid", signature_input(
        STRIPE, stripe_signature(STRIPE_SECRET, NOW, STRIPE_EVENT), body=STRIPE_EVENT)
    yield "stripe-v0-and-v1", signature_input(
        STRIPE, f"t={NOW},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39,"
        + stripe_signature(STRIPE_SECRET, NOW, STRIPE_EVENT).split(",", 1)[1],
        body=STRIPE_EVENT)
    yield "stripe-truncated-hex", signature_input(
        STRIPE, stripe_signature(STRIPE_SECRET, NOW, STRIPE_EVENT)[:-7], body=STRIPE_EVENT)
    yield "stripe-stale", signature_input(
        STRIPE, stripe_signature(STRIPE_SECRET, NOW - 3600, STRIPE_EVENT), body=STRIPE_EVENT)

    yield "github-doc-example", signature_input(
        GITHUB, github_signature(GITHUB_SECRET, b"Hello, World!"), "", GITHUB_DELIVERY, "",
        b"Hello, World!")
    yield "github-issue-comment", signature_input(
        GITHUB, github_signature(GITHUB_SECRET, GITHUB_COMMENT), "", GITHUB_DELIVERY,
        "old-github-secret", GITHUB_COMMENT)
    yield "github-truncated-hex", signature_input(
        GITHUB, github_signature(GITHUB_SECRET, GITHUB_COMMENT)[:-10], "", GITHUB_DELIVERY, "",
        GITHUB_COMMENT)
    yield "github-sha1-only", signature_input(
        GITHUB, "sha1=" + hmac.new(GITHUB_SECRET.encode(), GITHUB_COMMENT, hashlib.sha1).hexdigest(),
        "", GITHUB_DELIVERY, "", GITHUB_COMMENT)

    yield "slack-valid", signature_input(
        SLACK, slack_signature(SLACK_SECRET, NOW, SLACK_DOC_BODY), NOW, body=SLACK_DOC_BODY)
    yield "slack-doc-example-stale", signature_input(
        SLACK, "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
        SLACK_DOC_TS, body=SLACK_DOC_BODY)
    yield "slack-missing-prefix", signature_input(
        SLACK, slack_signature(SLACK_SECRET, NOW, SLACK_DOC_BODY)[3:], NOW, body=SLACK_DOC_BODY)

    yield "hmac-hex-valid", signature_input(
        HMAC_HEX, "sha256=" + mac(HMAC_SECRET.encode(), BLOG_COMMENT).hex(), body=BLOG_COMMENT)
    yield "hmac-hex-uppercase", signature_input(
        HMAC_HEX, "sha256=" + mac(HMAC_SECRET.encode(), BLOG_COMMENT).hex().upper(),
        body=BLOG_COMMENT)
    yield "hmac-base64-valid", signature_input(
        HMAC_BASE64, b64(mac(HMAC_SECRET.encode(), SHOPIFY_ORDER)), body=SHOPIFY_ORDER)
    yield "hmac-base64-unpadded", signature_input(
        HMAC_BASE64, b64(mac(HMAC_SECRET.encode(), SHOPIFY_ORDER)).rstrip("="),
        body=SHOPIFY_ORDER)


# --- codec_json ----------------------------------------------------------------------------
# Keep in step with fuzz/fuzz_targets/codec_json.rs.
CE_HEADERS = ["ce_id", "ce_source", "ce_type", "ce_time", "ce_subject", "ce_specversion",
              "content-type"]
AUTO, TOMBSTONE, NO_HEADERS = 1, 2, 4
NULL_CE_ID_FIRST = 0x80


def codec_json_input(flags: int, headers: dict, payload: bytes, extra_mask: int = 0) -> bytes:
    mask = extra_mask
    lines = b""
    for i, name in enumerate(CE_HEADERS):
        if name in headers:
            mask |= 1 << i
            lines += headers[name].encode() + b"\n"
    return bytes([flags, mask]) + lines + payload


def codec_json_seeds():
    ce = {
        "ce_id": "github:" + GITHUB_DELIVERY,
        "ce_source": "/webhooks/github",
        "ce_type": "com.github.issue_comment",
        "ce_time": "2026-03-01T12:00:00Z",
        "ce_subject": "octocat/Hello-World",
        "ce_specversion": "1.0",
        "content-type": "application/json",
    }
    yield "json-cloudevents-headers", codec_json_input(0, ce, GITHUB_COMMENT)
    yield "auto-json-without-headers", codec_json_input(
        AUTO | NO_HEADERS, {}, b'{"order_id":"o-1001","amount_cents":4599,"currency":"EUR"}')
    yield "auto-partial-headers", codec_json_input(
        AUTO, {"ce_id": "stripe:evt_1NG8Du2eZvKYlo2CUI79vXWy", "ce_type": "payment_intent.succeeded"},
        STRIPE_EVENT)
    yield "json-null-ce-id-first", codec_json_input(
        0, {"ce_id": "blog:msg_1", "ce_source": "/webhooks/blog"}, BLOG_COMMENT,
        extra_mask=NULL_CE_ID_FIRST)
    yield "auto-confluent-frame-junk", codec_json_input(
        AUTO, {"ce_id": "orders:1"}, b"\x00\x00\x00\x00\x07" + b"\x02\x06foo\xff\xfe junk")
    yield "auto-truncated-frame", codec_json_input(AUTO, {}, b"\x00\x00\x01")
    yield "json-invalid", codec_json_input(0, {"ce_id": "x"}, b'{"text": "unterminated')
    yield "json-scalars", codec_json_input(0, {}, b'[1, -2.5e10, "s\\u00e9", true, null, {}]')
    yield "tombstone", codec_json_input(TOMBSTONE, {"ce_id": "orders:2"}, b"")


# --- codec_avro ----------------------------------------------------------------------------
# Avro binary of schemas/event.avsc, by hand: https://avro.apache.org/docs/1.12.0/specification/
def avro_long(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)  # zig-zag
    z &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = z & 0x7F
        z >>= 7
        if z:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def avro_string(s: str) -> bytes:
    raw = s.encode()
    return avro_long(len(raw)) + raw


def avro_optional(value, encode) -> bytes:
    """A ["null", T] union: the branch index, then the value."""
    return avro_long(0) if value is None else avro_long(1) + encode(value)


# The specification's examples.
assert [avro_long(n) for n in (0, -1, 1, -2, 2, -64, 64)] == [
    b"\x00", b"\x01", b"\x02", b"\x03", b"\x04", b"\x7f", b"\x80\x01"]
assert avro_string("foo") == b"\x06foo"

ENVELOPE_FIELDS = [f["name"] for f in json.loads((REPO / "schemas/event.avsc").read_text())["fields"]]
assert ENVELOPE_FIELDS == ["specversion", "id", "source", "type", "time", "subject",
                           "datacontenttype", "received_at", "data"], ENVELOPE_FIELDS


def envelope_frame(schema_id: int, e: dict) -> bytes:
    datum = (
        avro_string(e.get("specversion", "1.0"))
        + avro_string(e["id"])
        + avro_string(e["source"])
        + avro_string(e["type"])
        + avro_optional(e.get("time"), avro_string)
        + avro_optional(e.get("subject"), avro_string)
        + avro_string(e.get("datacontenttype", "application/json"))
        + avro_optional(e.get("received_at"), avro_long)
        + avro_string(e["data"])
    )
    return b"\x00" + struct.pack(">I", schema_id) + datum


def codec_avro_seeds():
    yield "envelope-all-fields", envelope_frame(1, {
        "id": "github:" + GITHUB_DELIVERY,
        "source": "/webhooks/github",
        "type": "com.github.issue_comment",
        "time": "2026-03-01T12:00:00Z",
        "subject": "octocat/Hello-World",
        "received_at": 1_772_366_400_123,
        "data": GITHUB_COMMENT.decode(),
    })
    yield "envelope-nulls", envelope_frame(2, {
        "id": "stripe:evt_1NG8Du2eZvKYlo2CUI79vXWy",
        "source": "/webhooks/stripe",
        "type": "payment_intent.succeeded",
        "data": STRIPE_EVENT.decode(),
    })
    yield "envelope-data-not-json", envelope_frame(42, {
        "id": "blog:msg_2Lh9KRb0pK5YpQ0Yzz1Tb8cUTaB",
        "source": "/webhooks/blog",
        "type": "com.example.blog.comment",
        "time": "2026-03-01T12:00:00.5+01:00",
        "received_at": -1,
        "datacontenttype": "text/plain",
        "data": "plain text, not JSON: caf\u00e9 \u2615 \U0001f680",
    })


# --- llm_answer ----------------------------------------------------------------------------
# Keep in step with fuzz/fuzz_targets/llm_answer.rs.
OPENAI, ANTHROPIC = 0, 1


def llm_input(api: int, status: int, headers: list, body) -> bytes:
    assert 100 <= status <= 599
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers).encode()
    return bytes([api]) + struct.pack(">H", status - 100) + head + b"\r\n" + body


OPENAI_RATE = [
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "30000000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "29999950"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "0s"),
]


def llm_seeds():
    yield "openai-200", llm_input(OPENAI, 200, [
        ("content-type", "application/json"),
        ("openai-processing-ms", "412"),
        ("x-request-id", "req_9f1c2b7e5d3a4c8b9e0f1a2b3c4d5e6f"),
        *OPENAI_RATE,
    ], {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "{\"sentiment\":\"positive\"}",
                        "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
    })
    yield "anthropic-200", llm_input(ANTHROPIC, 200, [
        ("content-type", "application/json"),
        ("request-id", "req_018EeWyXxfu5pfWkrYcMdjWG"),
        ("anthropic-ratelimit-requests-limit", "4000"),
        ("anthropic-ratelimit-requests-remaining", "3999"),
        ("anthropic-ratelimit-requests-reset", "2026-03-01T12:00:01Z"),
        ("anthropic-ratelimit-tokens-limit", "480000"),
        ("anthropic-ratelimit-tokens-remaining", "479000"),
        ("anthropic-ratelimit-input-tokens-limit", "400000"),
        ("anthropic-ratelimit-input-tokens-remaining", "399000"),
        ("anthropic-ratelimit-output-tokens-limit", "80000"),
        ("anthropic-ratelimit-output-tokens-remaining", "80000"),
    ], {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Hi! My name is Claude."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 2095, "output_tokens": 503,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    })
    yield "openai-429-rate-limited", llm_input(OPENAI, 429, [
        ("content-type", "application/json"),
        ("retry-after", "20"),
        *OPENAI_RATE[:2],
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-remaining-tokens", "120"),
    ], {"error": {
        "message": "Rate limit reached for gpt-4o-mini in organization org-abc123 on requests "
                   "per min (RPM): Limit 10000, Used 10000, Requested 1. Please try again in 20s.",
        "type": "rate_limit_exceeded", "param": None, "code": "rate_limit_exceeded"}})
    yield "openai-429-insufficient-quota", llm_input(OPENAI, 429, [
        ("content-type", "application/json"),
    ], {"error": {
        "message": "You exceeded your current quota, please check your plan and billing details. "
                   "For more information on this error, read the docs: "
                   "https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}})
    yield "anthropic-529-overloaded", llm_input(ANTHROPIC, 529, [
        ("content-type", "application/json"),
        ("request-id", "req_011CSHoEeqs5C35K2UUqR7Fy"),
        ("x-should-retry", "true"),
    ], {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"})
    yield "anthropic-429-retry-after-ms", llm_input(ANTHROPIC, 429, [
        ("content-type", "application/json"),
        ("retry-after", "5"),
        ("retry-after-ms", "4250.5"),
        ("anthropic-ratelimit-requests-remaining", "0"),
    ], {"type": "error", "error": {"type": "rate_limit_error",
                                   "message": "Number of request tokens has exceeded your "
                                              "per-minute rate limit"}})
    yield "anthropic-400-prompt-too-long", llm_input(ANTHROPIC, 400, [
        ("content-type", "application/json"),
    ], {"type": "error", "error": {"type": "invalid_request_error",
                                   "message": "prompt is too long: 210000 tokens > 200000 maximum"}})
    yield "openai-301-redirect", llm_input(OPENAI, 301, [
        ("location", "https://api.openai.com/v1/chat/completions/"),
        ("content-type", "text/html"),
    ], b"<html><head><title>301 Moved Permanently</title></head></html>")
    yield "openai-400-context-length", llm_input(OPENAI, 400, [
        ("content-type", "application/json"),
    ], {"error": {
        "message": "This model's maximum context length is 128000 tokens. However, your messages "
                   "resulted in 130512 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})


# --- config --------------------------------------------------------------------------------
def config_seeds():
    for name in ("example.toml", "ingress.toml", "ingress-local.toml"):
        yield name, (REPO / "config" / name).read_bytes()


def write(target: str, seeds) -> None:
    out = SEEDS / target
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    names = set()
    for name, data in seeds:
        assert name not in names, name
        names.add(name)
        (out / name).write_bytes(data)
    print(f"{target}: {len(names)} seeds")


def main() -> None:
    write("signatures", signature_seeds())
    write("codec_json", codec_json_seeds())
    write("codec_avro", codec_avro_seeds())
    write("config", config_seeds())
    write("llm_answer", llm_seeds())


if __name__ == "__main__":
    main()

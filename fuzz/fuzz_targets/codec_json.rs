//! Record decoding without a schema registry (`spillway::codec::Codec`): the JSON path, the
//! CloudEvents header reader and the Confluent frame reader.
//!
//! Input format (what `fuzz/seeds/make_seeds.py` writes):
//!
//! - byte 0, flags: bit 0 set = `format = "auto"` (else `"json"`); bit 1 = tombstone (no
//!   value); bit 2 = the record has no headers at all;
//! - byte 1, header mask: bit i (0..=6) = the record carries header i of [`HEADERS`]; bit 7 =
//!   a `ce_id` header without a value comes first;
//! - then one line (up to `\n`) per header present, in [`HEADERS`] order: its value bytes;
//! - the rest is the record value.
//!
//! Checks: nothing panics; `schema_id` accepts exactly the 5-byte-or-longer values that start
//! with the magic byte; no error is transient (there is no registry to be unavailable); each
//! error is the one the value calls for; a decoded event carries exactly the value's JSON and
//! the attributes its headers (or the record's coordinates) give.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use serde_json::Value as Json;
use spillway::codec::{schema_id, Codec, CodecError, MAGIC_BYTE};
use spillway::codec::CodecConfig;
use spillway::codec::CodecFormat;
use tokio::runtime::Runtime;

/// The headers the input can set, in mask-bit order.
const HEADERS: [&str; 7] = [
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_time",
    "ce_subject",
    "ce_specversion",
    "content-type",
];
const TOPIC: &str = "orders";
const PARTITION: i32 = 3;
const OFFSET: i64 = 42;

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime builds")
    })
}

/// Splits off the next `\n`-terminated line; the last line may be unterminated.
fn line(input: &[u8]) -> (&[u8], &[u8]) {
    match input.iter().position(|&b| b == b'\n') {
        Some(n) => (&input[..n], &input[n + 1..]),
        None => (input, &input[input.len()..]),
    }
}

/// What `header_str` must find: the first header of that name, as UTF-8.
fn expected_header<'a>(
    values: &[(&str, &'a [u8])],
    no_headers: bool,
    null_ce_id_first: bool,
    name: &str,
) -> Option<&'a str> {
    if no_headers || (name == "ce_id" && null_ce_id_first) {
        return None;
    }
    values
        .iter()
        .find(|&&(n, _)| n == name)
        .and_then(|&(_, v)| std::str::from_utf8(v).ok())
}

fuzz_target!(|data: &[u8]| {
    let [flags, mask, rest @ ..] = data else {
        return;
    };
    let (flags, mask) = (*flags, *mask);
    let format = if flags & 1 == 0 {
        CodecFormat::Json
    } else {
        CodecFormat::Auto
    };
    let tombstone = flags & 2 != 0;
    let no_headers = flags & 4 != 0;
    let null_ce_id_first = mask & 0x80 != 0;

    let mut rest = rest;
    let mut values: Vec<(&str, &[u8])> = Vec::new();
    for (i, &name) in HEADERS.iter().enumerate() {
        if mask & (1u8 << i) != 0 {
            let (value, tail) = line(rest);
            values.push((name, value));
            rest = tail;
        }
    }
    let payload = rest;

    let headers = (!no_headers).then(|| {
        let mut headers = OwnedHeaders::new_with_capacity(values.len() + 1);
        if null_ce_id_first {
            headers = headers.insert(Header {
                key: "ce_id",
                value: None::<&[u8]>,
            });
        }
        for &(name, value) in &values {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        headers
    });
    let record = OwnedMessage::new(
        (!tombstone).then(|| payload.to_vec()),
        Some(b"k".to_vec()),
        TOPIC.to_string(),
        Timestamp::NotAvailable,
        PARTITION,
        OFFSET,
        headers,
    );

    let framed = payload.len() >= 5 && payload[0] == MAGIC_BYTE;
    match schema_id(payload) {
        Ok(id) => {
            assert!(framed, "schema_id accepted {payload:?}");
            assert_eq!(
                id,
                u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]])
            );
        }
        Err(e) => assert!(!framed, "schema_id refused a framed value: {e}"),
    }

    let codec = Codec::new(&CodecConfig {
        format,
        schema_registry_url: None,
        schema_registry_timeout_ms: 1000,
    })
    .expect("a codec without a registry always builds");
    let result = runtime().block_on(codec.decode(&record));
    let looks_avro = format == CodecFormat::Auto && payload.first() == Some(&MAGIC_BYTE);

    match result {
        Err(e) => {
            let _ = (e.error_code(), e.to_string());
            assert!(!e.is_transient(), "transient error without a registry: {e}");
            if tombstone {
                assert!(matches!(e, CodecError::Tombstone), "{e}");
            } else if looks_avro {
                assert!(
                    matches!(e, CodecError::Truncated(_) | CodecError::NoRegistry(_)),
                    "{e}"
                );
            } else {
                assert!(matches!(e, CodecError::InvalidJson(_)), "{e}");
                assert!(serde_json::from_slice::<Json>(payload).is_err());
            }
        }
        Ok(event) => {
            assert!(!tombstone && !looks_avro, "decoded {event:?}");
            let expected: Json = serde_json::from_slice(payload).expect("a decoded value is JSON");
            assert_eq!(event.data, expected);

            let header = |name| expected_header(&values, no_headers, null_ce_id_first, name);
            assert_eq!(
                event.id,
                header("ce_id")
                    .map_or_else(|| format!("{TOPIC}/{PARTITION}/{OFFSET}"), str::to_string)
            );
            assert_eq!(
                event.source,
                header("ce_source").map_or_else(|| format!("kafka://{TOPIC}"), str::to_string)
            );
            assert_eq!(
                event.event_type,
                header("ce_type").unwrap_or("spillway.record")
            );
            assert_eq!(event.time.as_deref(), header("ce_time"));
            serde_json::to_vec(&event).expect("an event serializes");
        }
    }
});

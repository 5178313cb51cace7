//! Confluent-framed Avro decoding against the envelope schema (`schemas/event.avsc`), without a
//! schema registry: `spillway::codec::decode_framed`.
//!
//! Input format: the whole input is the record value, i.e. a Confluent frame (magic byte
//! `0x00`, big-endian `u32` schema id, Avro binary of the envelope). `fuzz/seeds/make_seeds.py`
//! writes real frames.
//!
//! Checks: nothing panics (Avro lengths, unions and strings from hostile bytes); no error is
//! transient; only a well-framed value decodes; a decoded event serializes.

#![no_main]

use std::sync::OnceLock;

use apache_avro::Schema;
use libfuzzer_sys::fuzz_target;
use rdkafka::message::{OwnedMessage, Timestamp};
use spillway::codec::{decode_framed, schema_id, ENVELOPE_SCHEMA};

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| Schema::parse_str(ENVELOPE_SCHEMA).expect("schemas/event.avsc parses"))
}

fuzz_target!(|data: &[u8]| {
    let schema = schema();
    let record = OwnedMessage::new(
        Some(data.to_vec()),
        Some(b"k".to_vec()),
        "spillway.events".to_string(),
        Timestamp::CreateTime(1_700_000_000_000),
        0,
        7,
        None,
    );
    match decode_framed(data, schema, &record) {
        Ok(event) => {
            assert!(
                schema_id(data).is_ok(),
                "decoded a value without a Confluent frame: {event:?}"
            );
            serde_json::to_vec(&event).expect("an event serializes");
        }
        Err(e) => {
            let _ = (e.error_code(), e.to_string());
            assert!(!e.is_transient(), "transient error without a registry: {e}");
        }
    }
});

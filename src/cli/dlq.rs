//! `spillway dlq list|show|replay`: look into the dead-letter topic and send records back.
//!
//! - `list` reads the DLQ from the beginning to its end (no consumer group, nothing is
//!   committed) and prints one JSON line per record that matches the filters (time, reason,
//!   key).
//! - `show` prints one record in full: headers, key and value.
//! - `replay` sends matching records back to their original topic (`__connect.errors.topic`)
//!   or a chosen one, with the original key, value and headers, minus the DLQ's own headers,
//!   plus `dlq.replay_count` incremented. It is paced (`--rate` per second), has a dry run,
//!   and is resumable: it consumes as its own consumer group and commits after each record
//!   Kafka acknowledged, so an interrupted replay continues where it stopped. The loop guard
//!   refuses records whose `dlq.replay_count` reached `--max-replays`; they stay in the DLQ.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::config::Config;

/// The header replay sets: how many times the record has been replayed.
pub const REPLAY_COUNT_HEADER: &str = "dlq.replay_count";

/// Which DLQ records a command applies to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only records dead-lettered at or after this Unix ms (the record's timestamp).
    pub since_ms: Option<i64>,
    /// Only records dead-lettered before this Unix ms.
    pub until_ms: Option<i64>,
    /// Only this `dlq.reason`.
    pub reason: Option<String>,
    /// Only this record key.
    pub key: Option<String>,
}

impl Filter {
    fn matches(&self, m: &OwnedMessage) -> bool {
        let ts = m.timestamp().to_millis().unwrap_or(0);
        self.since_ms.is_none_or(|s| ts >= s)
            && self.until_ms.is_none_or(|u| ts < u)
            && self
                .reason
                .as_deref()
                .is_none_or(|r| header(m, "dlq.reason") == Some(r))
            && self
                .key
                .as_deref()
                .is_none_or(|k| m.key() == Some(k.as_bytes()))
    }
}

/// Parses a `--since`/`--until` value: Unix milliseconds, or an age such as `90s`, `15m`,
/// `2h` or `7d` (that long before now).
pub fn parse_time(text: &str, now_ms: i64) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let (num, unit) = text.split_at(text.len().saturating_sub(1));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{text:?} is neither Unix ms nor an age like 15m, 2h or 7d"))?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(now_ms - n * unit_ms)
}

/// Failures of the DLQ commands.
#[derive(Debug, thiserror::Error)]
pub enum DlqToolError {
    /// Invalid configuration or unreadable secret.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Kafka could not be read or written.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// No record at the given coordinates.
    #[error("no record at {topic}/{partition}@{offset}")]
    NotFound {
        /// The DLQ topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
    },
    /// The decoder (codec, its runtime) could not be set up.
    #[error("decoder: {0}")]
    Decoder(String),
    /// A record has no original topic and no `--to` was given.
    #[error("record {0} has no __connect.errors.topic header; pass --to")]
    NoTarget(String),
}

pub(super) fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
}

fn replay_count(m: &OwnedMessage) -> u32 {
    header(m, REPLAY_COUNT_HEADER)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One line of `dlq list`.
pub fn summary(m: &OwnedMessage) -> Json {
    json!({
        "partition": m.partition(),
        "offset": m.offset(),
        "timestamp_ms": m.timestamp().to_millis(),
        "key": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        "reason": header(m, "dlq.reason"),
        "pipeline": header(m, "dlq.pipeline"),
        "stage": header(m, "__connect.errors.stage"),
        "source": format!(
            "{}/{}@{}",
            header(m, "__connect.errors.topic").unwrap_or("?"),
            header(m, "__connect.errors.partition").unwrap_or("?"),
            header(m, "__connect.errors.offset").unwrap_or("?"),
        ),
        "attempts": header(m, "dlq.attempts").and_then(|a| a.parse::<u64>().ok()),
        "replay_count": replay_count(m),
        "message": header(m, "__connect.errors.exception.message"),
    })
}

/// `dlq show`: the record in full.
pub fn detail(m: &OwnedMessage) -> Json {
    let headers: Vec<Json> = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    json!([
                        h.key,
                        h.value.map(|v| String::from_utf8_lossy(v).into_owned())
                    ])
                })
                .collect()
        })
        .unwrap_or_default();
    let mut j = summary(m);
    j["headers"] = Json::Array(headers);
    j["value"] = match m.payload() {
        None => Json::Null,
        Some(v) => match std::str::from_utf8(v) {
            Ok(text) => serde_json::from_str(text).unwrap_or_else(|_| Json::String(text.into())),
            Err(_) => json!({ "base64": base64_engine(v) }),
        },
    };
    j
}

fn base64_engine(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(v)
}

pub(super) fn client(config: &Config) -> Result<rdkafka::ClientConfig, DlqToolError> {
    let mut c = crate::kafka::base_config(&config.kafka)?;
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    Ok(c)
}

pub(super) fn partitions(
    consumer: &crate::kafka::Reader,
    topic: &str,
) -> Result<i32, DlqToolError> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len() as i32))
}

/// Reads a topic from where `consumer` is assigned to the end of every partition, calling
/// `each` per record; `each` returns false to stop early.
pub(super) fn read_to_end(
    consumer: &crate::kafka::Reader,
    count: i32,
    mut each: impl FnMut(OwnedMessage) -> Result<bool, DlqToolError>,
) -> Result<(), DlqToolError> {
    let mut at_end = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (at_end.len() as i32) < count {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                at_end.remove(&m.partition());
                if !each(m.detach())? {
                    return Ok(());
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => return Err(e.into()),
            // Nothing at all for a long while: the partitions are empty or unreachable.
            None if Instant::now() > deadline && at_end.is_empty() => return Ok(()),
            None => {}
        }
    }
    Ok(())
}

/// `dlq list`: every matching record's summary, oldest first per partition.
pub fn list(config: &Config, filter: &Filter, limit: usize) -> Result<Vec<Json>, DlqToolError> {
    let mut c = client(config)?;
    c.set("group.id", "spillway-dlq-list");
    let consumer: crate::kafka::Reader = c.create_with_context(crate::kafka::ReaderContext)?;
    let topic = &config.dlq.topic;
    let count = partitions(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..count {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    read_to_end(&consumer, count, |m| {
        if filter.matches(&m) {
            out.push(summary(&m));
        }
        Ok(out.len() < limit)
    })?;
    Ok(out)
}

/// `dlq show`: the record at `partition`/`offset` of the DLQ.
pub fn show(config: &Config, partition: i32, offset: i64) -> Result<Json, DlqToolError> {
    let mut c = client(config)?;
    c.set("group.id", "spillway-dlq-show");
    let consumer: crate::kafka::Reader = c.create_with_context(crate::kafka::ReaderContext)?;
    let topic = config.dlq.topic.clone();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let not_found = || DlqToolError::NotFound {
        topic: topic.clone(),
        partition,
        offset,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.offset() == offset => return Ok(detail(&m.detach())),
            Some(Ok(m)) if m.offset() > offset => return Err(not_found()),
            Some(Err(KafkaError::PartitionEOF(_))) => return Err(not_found()),
            Some(Err(e)) => return Err(e.into()),
            _ => {}
        }
    }
    Err(not_found())
}

/// How `dlq replay` runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Which records.
    pub filter: Filter,
    /// Send here instead of each record's original topic.
    pub to: Option<String>,
    /// Records per second at most.
    pub rate: f64,
    /// Print what would be replayed; produce and commit nothing.
    pub dry_run: bool,
    /// Refuse records already replayed this many times.
    pub max_replays: u32,
    /// The consumer group that holds the replay's progress.
    pub group: String,
    /// Stop after this many replayed records (the rest waits for the next run).
    pub limit: Option<u64>,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplaySummary {
    /// Records sent back (or, in a dry run, that would be).
    pub replayed: u64,
    /// Records refused by the loop guard.
    pub refused_by_loop_guard: u64,
    /// Records that did not match the filters.
    pub not_matching: u64,
    /// Whether nothing was produced or committed.
    pub dry_run: bool,
}

/// `dlq replay`. Resumes from the replay group's committed offsets.
pub async fn replay(config: &Config, opts: &ReplayOptions) -> Result<ReplaySummary, DlqToolError> {
    let mut c = client(config)?;
    c.set("group.id", &opts.group);
    let consumer: crate::kafka::Reader = c.create_with_context(crate::kafka::ReaderContext)?;
    let producer: FutureProducer = crate::kafka::producer_config(&config.kafka)?.create()?;
    let topic = config.dlq.topic.clone();
    let count = partitions(&consumer, &topic)?;
    // Resume from the group's progress; where it has none, from the beginning.
    let mut tpl = TopicPartitionList::new();
    for p in 0..count {
        tpl.add_partition(&topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    let mut start = TopicPartitionList::new();
    for p in 0..count {
        let offset = match committed.find_partition(&topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        start.add_partition_offset(&topic, p, offset)?;
    }
    consumer.assign(&start)?;

    let interval = Duration::from_secs_f64(1.0 / opts.rate.max(0.001));
    let mut next_send = tokio::time::Instant::now();
    let mut summary = ReplaySummary {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut records = Vec::new();
    // Read what is there now; the send loop below is async (pacing, acknowledgements).
    read_to_end(&consumer, count, |m| {
        records.push(m);
        Ok(true)
    })?;
    for m in records {
        let handled =
            |consumer: &crate::kafka::Reader, m: &OwnedMessage| -> Result<(), DlqToolError> {
                if opts.dry_run {
                    return Ok(());
                }
                let mut done = TopicPartitionList::new();
                done.add_partition_offset(&topic, m.partition(), Offset::Offset(m.offset() + 1))?;
                consumer.commit(&done, CommitMode::Sync)?;
                Ok(())
            };
        if !opts.filter.matches(&m) {
            summary.not_matching += 1;
            handled(&consumer, &m)?;
            continue;
        }
        let count = replay_count(&m);
        if count >= opts.max_replays {
            summary.refused_by_loop_guard += 1;
            tracing::warn!(
                partition = m.partition(),
                offset = m.offset(),
                replay_count = count,
                "refused by the loop guard; the record stays in the DLQ"
            );
            handled(&consumer, &m)?;
            continue;
        }
        if opts.limit.is_some_and(|l| summary.replayed >= l) {
            break;
        }
        let target = match (&opts.to, header(&m, "__connect.errors.topic")) {
            (Some(t), _) => t.clone(),
            (None, Some(t)) => t.to_string(),
            (None, None) => {
                return Err(DlqToolError::NoTarget(format!(
                    "{topic}/{}@{}",
                    m.partition(),
                    m.offset()
                )))
            }
        };
        if opts.dry_run {
            println!(
                "{}",
                json!({"would_replay": summary_line(&m), "to": target, "replay_count": count + 1})
            );
            summary.replayed += 1;
            continue;
        }
        tokio::time::sleep_until(next_send).await;
        next_send = tokio::time::Instant::now() + interval;
        let mut headers = OwnedHeaders::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                if h.key.starts_with("__connect.errors.") || h.key.starts_with("dlq.") {
                    continue;
                }
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let count_text = (count + 1).to_string();
        headers = headers.insert(Header {
            key: REPLAY_COUNT_HEADER,
            value: Some(count_text.as_bytes()),
        });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&target).headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| DlqToolError::Kafka(e))?;
        // Acknowledged, then committed: a crash in between replays this one record again,
        // and the processor's journal drops it if it already finished.
        handled(&consumer, &m)?;
        summary.replayed += 1;
    }
    producer.flush(Duration::from_secs(10))?;
    Ok(summary)
}

fn summary_line(m: &OwnedMessage) -> Json {
    let s = summary(m);
    json!({"partition": s["partition"], "offset": s["offset"], "key": s["key"], "reason": s["reason"]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_unix_ms_or_ages_before_now() {
        let now = 1_000_000_000;
        assert_eq!(parse_time("123", now), Ok(123));
        assert_eq!(parse_time("15m", now), Ok(now - 900_000));
        assert_eq!(parse_time("2h", now), Ok(now - 7_200_000));
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("5w", now).is_err());
    }
}

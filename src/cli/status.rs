//! `spillway status`: what `XPENDING` told users of the old stack. From the broker: lag per
//! partition (the group's committed offset against the log end), and the DLQ's size and the
//! age of its oldest record. From a running processor's `/metrics`: events in flight, paused
//! partitions and each provider's breaker state.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::Config;

/// One input partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// The group's committed offset (`None`: nothing committed yet).
    pub committed: Option<i64>,
    /// The log start offset.
    pub low: i64,
    /// The log end offset (high watermark).
    pub high: i64,
    /// Records not yet covered by the committed offset.
    pub lag: i64,
}

/// The DLQ topic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DlqStatus {
    /// Topic name.
    pub topic: String,
    /// Records held (high minus low watermark, summed over partitions).
    pub records: i64,
    /// Kafka timestamp of the oldest record still held, in Unix ms.
    pub oldest_ms: Option<i64>,
    /// Its age when the status was taken, in seconds.
    pub oldest_age_secs: Option<f64>,
}

/// What a running processor reports about itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessorStatus {
    /// Where it was read.
    pub metrics_url: String,
    /// Events being processed.
    pub in_flight: f64,
    /// Partitions paused (full buffers or a closed gate).
    pub paused_partitions: f64,
    /// Breaker state by provider: `closed`, `half_open` or `open`.
    pub breakers: Vec<(String, String)>,
    /// Offsets the journal restores being waited on still have to read.
    pub journal_restore_remaining: f64,
    /// Journal partitions whose restore is not making progress (the processor is not ready).
    pub journal_restores_stalled: f64,
    /// Entries in the processor's journal stores.
    pub journal_entries: f64,
}

/// One pipeline: the lag of the topics it takes, and what the processor finished for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineStatus {
    /// Its name (`default` for top-level `[[steps]]`).
    pub name: String,
    /// The input topics it takes (every input topic when it names none).
    pub topics: Vec<String>,
    /// Sum of those topics' lags (shared with any other pipeline that takes them too).
    pub lag: i64,
    /// Events it finished, by outcome, from the processor's `/metrics` (absent without them).
    pub events: Option<PipelineEvents>,
}

/// Events one pipeline finished since the processor started.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PipelineEvents {
    /// Every step done or skipped by its condition.
    pub succeeded: f64,
    /// Written to the DLQ.
    pub dead_lettered: f64,
    /// Skipped (a step's skip, duplicates).
    pub skipped: f64,
    /// Of those skipped, duplicates the journal held as done.
    pub duplicates: f64,
}

/// One spend budget this period, as the processor sees it (every replica's spend).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetStatus {
    /// Its name.
    pub name: String,
    /// Its cap per period, in USD or tokens.
    pub limit: f64,
    /// `usd` or `tokens`.
    pub unit: &'static str,
    /// Spent this period, reservations in flight included; `None` without the processor.
    pub spent: Option<f64>,
    /// Whether it has refused a call this period (its events wait).
    pub exhausted: Option<bool>,
    /// Events waiting on a spent budget, across budgets; `None` without the processor.
    pub waiting_events: Option<f64>,
}

/// The whole picture.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// Consumer group.
    pub group: String,
    /// Per input partition.
    pub partitions: Vec<PartitionLag>,
    /// Sum of the lags.
    pub total_lag: i64,
    /// The DLQ.
    pub dlq: DlqStatus,
    /// Per pipeline, in configuration order.
    pub pipelines: Vec<PipelineStatus>,
    /// Events no pipeline took (skipped or dead-lettered), from the processor's `/metrics`.
    pub unmatched: Option<f64>,
    /// Each configured spend budget this period, from the processor's `/metrics`.
    pub budgets: Vec<BudgetStatus>,
    /// The processor, if its metrics endpoint answered.
    pub processor: Option<ProcessorStatus>,
    /// Why the processor's figures are missing, if they are.
    pub processor_error: Option<String>,
}

/// Failures to gather the broker's figures.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Invalid configuration or unreadable secret.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Kafka could not be asked.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A configured topic does not exist.
    #[error("topic {0} does not exist")]
    MissingTopic(String),
}

/// The processor's `/metrics` URL from its config (`0.0.0.0` becomes loopback).
pub fn metrics_url(config: &Config) -> String {
    let mut addr = config.telemetry.metrics_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}/metrics")
}

/// Gathers the status: broker figures always, the processor's from `metrics_url` (its
/// `/metrics`) if given. Blocking; call it from a blocking context.
pub fn gather(config: &Config, metrics_url: Option<&str>) -> Result<Status, StatusError> {
    let timeout = Duration::from_secs(10);
    let mut client = crate::kafka::base_config(&config.kafka)?;
    client
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    let consumer: crate::kafka::Reader = client.create_with_context(crate::kafka::ReaderContext)?;
    let mut partitions = Vec::new();
    for topic in &config.kafka.topics {
        let count = partition_count(&consumer, topic, timeout)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..count {
            tpl.add_partition(topic, p);
        }
        let committed = consumer.committed_offsets(tpl, timeout)?;
        for p in 0..count {
            let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
            let committed = committed
                .find_partition(topic, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            let from = committed.unwrap_or(low).max(low);
            partitions.push(PartitionLag {
                topic: topic.clone(),
                partition: p,
                committed,
                low,
                high,
                lag: (high - from).max(0),
            });
        }
    }
    let total_lag = partitions.iter().map(|p| p.lag).sum();
    let dlq = dlq_status(&client, &consumer, &config.dlq.topic, timeout)?;
    let (processor, processor_error, text) = match metrics_url {
        None => (None, None, None),
        Some(url) => match scrape(url) {
            Ok((p, text)) => (Some(p), None, Some(text)),
            Err(e) => (None, Some(e), None),
        },
    };
    let named: Vec<(String, Vec<String>)> = if config.pipelines.is_empty() {
        vec![("default".to_string(), Vec::new())]
    } else {
        (config.pipelines.iter())
            .map(|p| (p.name.clone(), p.topics.clone()))
            .collect()
    };
    let pipelines = named
        .into_iter()
        .map(|(name, topics)| {
            let topics = if topics.is_empty() {
                config.kafka.topics.clone()
            } else {
                topics
            };
            let lag = (partitions.iter())
                .filter(|p| topics.contains(&p.topic))
                .map(|p| p.lag)
                .sum();
            let events = text.as_deref().map(|text| {
                let of = |metric: &str, outcome: Option<&str>| {
                    let mut labels = vec![("pipeline", name.as_str())];
                    labels.extend(outcome.map(|o| ("outcome", o)));
                    labelled_sum(text, metric, &labels)
                };
                PipelineEvents {
                    succeeded: of("spillway_events_total", Some("succeeded")),
                    dead_lettered: of("spillway_events_total", Some("dead_lettered")),
                    skipped: of("spillway_events_total", Some("skipped")),
                    duplicates: of("spillway_duplicates_total", None),
                }
            });
            PipelineStatus {
                name,
                topics,
                lag,
                events,
            }
        })
        .collect();
    let unmatched = text
        .as_deref()
        .map(|t| labelled_sum(t, "spillway_unmatched_events_total", &[]));
    let budgets = (config.llm.budget.iter())
        .flat_map(|b| &b.limits)
        .map(|l| {
            let of = |metric: &str| {
                text.as_deref()
                    .map(|t| labelled_sum(t, metric, &[("budget", l.name.as_str())]))
            };
            BudgetStatus {
                name: l.name.clone(),
                limit: l.usd.unwrap_or(l.tokens.unwrap_or(0) as f64),
                unit: if l.usd.is_some() { "usd" } else { "tokens" },
                spent: of("spillway_budget_spent"),
                exhausted: of("spillway_budget_exhausted").map(|v| v >= 1.0),
                waiting_events: text
                    .as_deref()
                    .map(|t| labelled_sum(t, "spillway_budget_waiting_events", &[])),
            }
        })
        .collect();
    Ok(Status {
        group: config.kafka.group_id.clone(),
        partitions,
        total_lag,
        dlq,
        pipelines,
        unmatched,
        budgets,
        processor,
        processor_error,
    })
}

fn partition_count(
    consumer: &crate::kafka::Reader,
    topic: &str,
    timeout: Duration,
) -> Result<i32, StatusError> {
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let count = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len() as i32);
    if count == 0 {
        return Err(StatusError::MissingTopic(topic.to_string()));
    }
    Ok(count)
}

/// The DLQ's size, and the timestamp of the first record of each non-empty partition.
fn dlq_status(
    client: &rdkafka::ClientConfig,
    consumer: &crate::kafka::Reader,
    topic: &str,
    timeout: Duration,
) -> Result<DlqStatus, StatusError> {
    let count = partition_count(consumer, topic, timeout)?;
    let mut records = 0;
    let mut tpl = TopicPartitionList::new();
    for p in 0..count {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        records += (high - low).max(0);
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    let mut oldest_ms: Option<i64> = None;
    // A fresh consumer without a group: reading the first records must not touch the
    // processor group's offsets.
    let mut reader_config = client.clone();
    reader_config.set("group.id", "spillway-status-reader");
    let reader: crate::kafka::Reader =
        reader_config.create_with_context(crate::kafka::ReaderContext)?;
    reader.assign(&tpl)?;
    let (mut done, deadline) = (
        std::collections::HashSet::new(),
        std::time::Instant::now() + timeout,
    );
    while done.len() < count as usize && std::time::Instant::now() < deadline {
        match reader.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if done.insert(m.partition()) => {
                if let Some(ts) = m.timestamp().to_millis() {
                    oldest_ms = Some(oldest_ms.map_or(ts, |o| o.min(ts)));
                }
                // One record per partition is enough.
                let mut one = TopicPartitionList::new();
                one.add_partition(topic, m.partition());
                let _ = reader.pause(&one);
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                done.insert(p);
            }
            _ => {}
        }
    }
    let now = crate::telemetry::now_ms() as i64;
    Ok(DlqStatus {
        topic: topic.to_string(),
        records,
        oldest_ms,
        oldest_age_secs: oldest_ms.map(|t| (now - t).max(0) as f64 / 1000.0),
    })
}

/// The sum of `metric`'s series in a `/metrics` text whose labels include every one of `labels`.
fn labelled_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(metric))
        .filter(|l| {
            let set = l.split_once('{').map_or("", |(_, r)| r).split('}').next();
            let set = set.unwrap_or("");
            labels
                .iter()
                .all(|(k, v)| set.split(',').any(|pair| pair == format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads the processor's own gauges from its `/metrics`; also returns the text.
fn scrape(url: &str) -> Result<(ProcessorStatus, String), String> {
    let text = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let r = reqwest::Client::new()
                    .get(url)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .map_err(|e| e.without_url().to_string())?;
                r.text().await.map_err(|e| e.without_url().to_string())
            })
        })
        .join()
        .map_err(|_| "metrics request panicked".to_string())?
    })?;
    let value = |name: &str| labelled_sum(&text, name, &[]);
    let breakers = text
        .lines()
        .filter(|l| l.starts_with("spillway_llm_breaker_state{"))
        .filter_map(|l| {
            let provider = l.split("provider=\"").nth(1)?.split('"').next()?;
            let state = match l.rsplit(' ').next()?.parse::<f64>().ok()? as i64 {
                0 => "closed",
                1 => "half_open",
                _ => "open",
            };
            Some((provider.to_string(), state.to_string()))
        })
        .collect();
    let status = ProcessorStatus {
        metrics_url: url.to_string(),
        in_flight: value("spillway_inflight_events"),
        paused_partitions: value("spillway_paused_partitions"),
        breakers,
        journal_restore_remaining: value("spillway_journal_restore_remaining_records"),
        journal_restores_stalled: value("spillway_journal_restore_stalled"),
        journal_entries: value("spillway_journal_store_entries"),
    };
    Ok((status, text))
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "group {}", self.group)?;
        writeln!(
            f,
            "{:<40} {:>12} {:>12} {:>10}",
            "partition", "committed", "end", "lag"
        )?;
        for p in &self.partitions {
            writeln!(
                f,
                "{:<40} {:>12} {:>12} {:>10}",
                format!("{}/{}", p.topic, p.partition),
                p.committed.map_or("-".to_string(), |c| c.to_string()),
                p.high,
                p.lag
            )?;
        }
        writeln!(f, "total lag {}", self.total_lag)?;
        writeln!(
            f,
            "{:<24} {:>10} {:>10} {:>13} {:>10} {:>10}",
            "pipeline", "lag", "succeeded", "dead-lettered", "skipped", "duplicates"
        )?;
        for p in &self.pipelines {
            let e = p.events.clone();
            let n = |v: Option<f64>| v.map_or("-".to_string(), |v| v.to_string());
            writeln!(
                f,
                "{:<24} {:>10} {:>10} {:>13} {:>10} {:>10}",
                p.name,
                p.lag,
                n(e.as_ref().map(|e| e.succeeded)),
                n(e.as_ref().map(|e| e.dead_lettered)),
                n(e.as_ref().map(|e| e.skipped)),
                n(e.as_ref().map(|e| e.duplicates)),
            )?;
        }
        if let Some(u) = self.unmatched.filter(|u| *u > 0.0) {
            writeln!(f, "unmatched events (no pipeline took them): {u}")?;
        }
        for b in &self.budgets {
            let n = |v: Option<f64>| v.map_or("-".to_string(), |v| v.to_string());
            writeln!(
                f,
                "budget {}: {} of {} {} spent this period{}",
                b.name,
                n(b.spent),
                b.limit,
                b.unit,
                match b.exhausted {
                    Some(true) => format!("; EXHAUSTED, {} events waiting", n(b.waiting_events)),
                    _ => String::new(),
                }
            )?;
        }
        match self.dlq.oldest_age_secs {
            Some(age) => writeln!(
                f,
                "dlq {}: {} records, oldest {:.0} s old",
                self.dlq.topic, self.dlq.records, age
            )?,
            None => writeln!(f, "dlq {}: {} records", self.dlq.topic, self.dlq.records)?,
        }
        match (&self.processor, &self.processor_error) {
            (Some(p), _) => {
                writeln!(
                    f,
                    "processor ({}): {} in flight, {} paused partitions",
                    p.metrics_url, p.in_flight, p.paused_partitions
                )?;
                for (provider, state) in &p.breakers {
                    writeln!(f, "breaker {provider}: {state}")?;
                }
                writeln!(
                    f,
                    "journal: {} entries stored, {} records left to restore{}",
                    p.journal_entries,
                    p.journal_restore_remaining,
                    if p.journal_restores_stalled > 0.0 {
                        format!(
                            ", {} restores STALLED (not ready)",
                            p.journal_restores_stalled
                        )
                    } else {
                        String::new()
                    }
                )?;
            }
            (None, Some(e)) => writeln!(f, "processor: metrics unavailable ({e})")?,
            (None, None) => {}
        }
        Ok(())
    }
}

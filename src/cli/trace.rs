//! `spillway trace <event id or dedup key>`: one event's whole story, read back from Kafka.
//! Every delivery of it on the input topics (and the pipeline that takes it), the journal
//! entry of each pipeline that ran it (each step done, skipped or only begun, the route taken,
//! the LLM's answer, tokens and cost), its DLQ records and its result records.
//!
//! It reads each topic from its start to its end (`read_committed`), so it takes as long as
//! the topics are large; the journal is bounded by its TTLs, the DLQ by what is waiting.

use std::collections::BTreeMap;

use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value as Json;

use super::dlq::{client, header, partitions, read_to_end, DlqToolError};
use crate::codec::{Codec, Event};
use crate::config::{Config, StepConfig, StepEntry};
use crate::journal::Entry;

/// What happened to one event.
#[derive(Debug, Clone, Serialize)]
pub struct Story {
    /// What was asked for: an event id or a dedup key (`<source>|<id>`).
    pub query: String,
    /// The dedup keys found for it (one, unless sources share the id).
    pub keys: Vec<String>,
    /// Its records on the input topics, in topic and offset order.
    pub deliveries: Vec<Delivery>,
    /// Each pipeline's journal entry for it.
    pub runs: Vec<Run>,
    /// The DLQ topic.
    pub dlq_topic: String,
    /// Its records on the DLQ (`dlq list`'s summary of each).
    pub dead_letters: Vec<Json>,
    /// Its records on the Kafka sinks' topics (keyed by the dedup key; committed only).
    pub results: Vec<Located>,
    /// One line that says what happened.
    pub verdict: String,
}

/// A record's place.
#[derive(Debug, Clone, Serialize)]
pub struct Located {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Kafka timestamp, Unix ms.
    pub timestamp_ms: Option<i64>,
}

/// One record of the event on an input topic.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    /// Where it is.
    #[serde(flatten)]
    pub at: Located,
    /// Its type (`ce_type`).
    pub event_type: String,
    /// Its dedup key.
    pub dedup_key: String,
    /// The pipeline that takes it, or `None` when none does.
    pub pipeline: Option<String>,
}

/// One pipeline's journal entry for the event.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// The pipeline (`default` for top-level `[[steps]]`).
    pub pipeline: String,
    /// The entry's key on the journal topic.
    pub journal_key: String,
    /// Every step finished: later deliveries are duplicates.
    pub done: bool,
    /// When the entry expires (Unix ms); after that a delivery runs again.
    pub expires_at_ms: u64,
    /// Whether it has expired already.
    pub expired: bool,
    /// The pipeline's steps, in order.
    pub steps: Vec<StepStory>,
    /// LLM tokens (input plus output) over its steps.
    pub tokens: u64,
    /// USD over its steps, from `[llm.prices]`.
    pub cost_usd: f64,
}

/// One step of a run.
#[derive(Debug, Clone, Serialize)]
pub struct StepStory {
    /// Step name.
    pub name: String,
    /// `done`, `skipped` (its condition was false), `begun` (its intent is recorded: it may
    /// have acted, and a redelivery reconciles) or `not_run`.
    pub status: &'static str,
    /// The route a route step chose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// An LLM step's call: model, provider, tokens, cost and answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmCall>,
    /// What the step recorded (`null` for steps without output).
    pub output: Json,
}

/// What an LLM step's answer cost and said.
#[derive(Debug, Clone, Serialize)]
pub struct LlmCall {
    /// Model that answered.
    pub model: String,
    /// Provider account.
    pub provider: String,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// USD, from `[llm.prices]` (0 without a price for the model).
    pub cost_usd: f64,
    /// The structured answer (or the text, for text output).
    pub answer: Json,
}

/// Whether `query` names the event whose dedup key is `raw` (`<source>|<id>`, or the id
/// alone without a journal) and whose key in its pipeline is `full` (`<pipeline>/<raw>`, or
/// `raw` for `default`): either key, or the id the key ends with.
fn names_event(query: &str, raw: &str, full: &str) -> bool {
    query == full
        || query == raw
        || raw
            .strip_suffix(query)
            .is_some_and(|rest| rest.ends_with('|'))
}

/// The key prefix of the pipeline named `name` (empty for `default`).
fn prefix_of<'a>(chains: &'a [Chain<'_>], name: &str) -> &'a str {
    (chains.iter())
        .find(|c| c.0 == name)
        .map_or("", |c| c.1.as_str())
}

/// A pipeline's name, key prefix and steps.
type Chain<'a> = (String, String, &'a [StepEntry]);

/// The named pipelines and their chains: `[[pipelines]]`, or `default` with `[[steps]]`.
fn chains(config: &Config) -> Vec<Chain<'_>> {
    if config.pipelines.is_empty() {
        return vec![("default".into(), String::new(), &config.steps)];
    }
    (config.pipelines.iter())
        .map(|p| (p.name.clone(), format!("{}/", p.name), p.steps.as_slice()))
        .collect()
}

/// Reads `topic` from its start to its end, committed records only, calling `each`.
fn scan(
    config: &Config,
    topic: &str,
    mut each: impl FnMut(OwnedMessage),
) -> Result<(), DlqToolError> {
    let mut c = client(config)?;
    c.set("group.id", "spillway-trace")
        .set("isolation.level", "read_committed");
    let consumer: crate::kafka::Reader = c.create_with_context(crate::kafka::ReaderContext)?;
    let count = partitions(&consumer, topic)?;
    if count == 0 {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..count {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    read_to_end(&consumer, count, |m| {
        each(m);
        Ok(true)
    })
}

fn located(m: &OwnedMessage) -> Located {
    Located {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
    }
}

/// The dedup key of a DLQ record: its original value and headers, decoded as the processor
/// did; where the decoder fell back to the DLQ record's own coordinates or topic, the
/// original's (`__connect.errors.*`) stand in, as the processor saw them.
fn dead_letter_key(config: &Config, event: Option<Event>, m: &OwnedMessage) -> String {
    let original = header(m, "__connect.errors.topic").unwrap_or("?");
    let coordinates = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
    let mut event = event.unwrap_or_else(|| Event {
        id: coordinates.clone(),
        source: format!("kafka://{}", m.topic()),
        event_type: String::new(),
        time: None,
        data: Default::default(),
    });
    if event.id == coordinates {
        event.id = format!(
            "{original}/{}/{}",
            header(m, "__connect.errors.partition").unwrap_or("?"),
            header(m, "__connect.errors.offset").unwrap_or("?")
        );
    }
    if event.source == format!("kafka://{}", m.topic()) {
        event.source = format!("kafka://{original}");
    }
    key_of(config, &event)
}

/// The key the processor would compute from an input record's headers alone, when they
/// decide it (`ce_id`, `ce_source` and `ce_type` present, no `journal.id_field`): lets trace
/// skip decoding the records of other events.
fn header_key(config: &Config, m: &OwnedMessage) -> Option<(String, String)> {
    if config
        .journal
        .as_ref()
        .is_some_and(|j| j.id_field.is_some())
    {
        return None;
    }
    let (id, source, event_type) = (
        header(m, "ce_id")?,
        header(m, "ce_source")?,
        header(m, "ce_type")?,
    );
    let raw = match config.journal {
        Some(_) => format!("{source}|{id}"),
        None => id.to_string(),
    };
    Some((raw, event_type.to_string()))
}

/// Adds `key` to `keys` once.
fn note(key: &str, keys: &mut Vec<String>) {
    if !keys.iter().any(|k| k == key) {
        keys.push(key.to_string());
    }
}

/// The event's dedup key before its pipeline's prefix, as the processor computes it.
fn key_of(config: &Config, event: &Event) -> String {
    match &config.journal {
        Some(j) => j.dedup_key(event),
        None => event.id.clone(),
    }
}

/// The pipeline that takes an event of `event_type` from `topic`, if any.
fn pipeline_of(config: &Config, topic: &str, event_type: &str) -> Option<String> {
    if config.pipelines.is_empty() {
        return Some("default".to_string());
    }
    (config.pipelines.iter())
        .find(|p| crate::step::takes(&p.topics, &p.types, topic, event_type))
        .map(|p| p.name.clone())
}

/// Gathers the story of the event `query` names. Blocking; call it from a blocking context.
pub fn trace(config: &Config, query: &str) -> Result<Story, DlqToolError> {
    let chains = chains(config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DlqToolError::Decoder(e.to_string()))?;
    let codec = (runtime.block_on(async { Codec::new(&config.codec) }))
        .map_err(|e| DlqToolError::Decoder(e.to_string()))?;
    let decode = |m: &OwnedMessage| runtime.block_on(codec.decode(m)).ok();

    let mut keys: Vec<String> = Vec::new();
    let mut deliveries = Vec::new();
    for topic in &config.kafka.topics {
        scan(config, topic, |m| {
            if let Some((raw, event_type)) = header_key(config, &m) {
                let pipeline = pipeline_of(config, topic, &event_type);
                let full = format!(
                    "{}{raw}",
                    prefix_of(&chains, pipeline.as_deref().unwrap_or(""))
                );
                if !names_event(query, &raw, &full) {
                    return; // Another event: not decoded.
                }
            }
            let Some(event) = decode(&m) else { return };
            let raw = key_of(config, &event);
            let pipeline = pipeline_of(config, topic, &event.event_type);
            let full = format!(
                "{}{raw}",
                prefix_of(&chains, pipeline.as_deref().unwrap_or(""))
            );
            if !names_event(query, &raw, &full) {
                return;
            }
            note(&full, &mut keys);
            deliveries.push(Delivery {
                at: located(&m),
                event_type: event.event_type.clone(),
                dedup_key: full,
                pipeline,
            });
        })?;
    }

    let mut dead_letters = Vec::new();
    scan(config, &config.dlq.topic, |m| {
        let raw = dead_letter_key(config, decode(&m), &m);
        let full = format!(
            "{}{raw}",
            prefix_of(&chains, header(&m, "dlq.pipeline").unwrap_or(""))
        );
        if names_event(query, &raw, &full) {
            note(&full, &mut keys);
            dead_letters.push(super::dlq::summary(&m));
        }
    })?;

    // Journal entries: every write holds the whole entry so far; merged, the latest wins.
    let mut entries: BTreeMap<String, Option<Entry>> = BTreeMap::new();
    if let Some(j) = &config.journal {
        scan(config, &j.topic, |m| {
            let Some(journal_key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                return;
            };
            let raw = (chains.iter())
                .filter(|c| !c.1.is_empty())
                .find_map(|c| journal_key.strip_prefix(&c.1))
                .unwrap_or(journal_key);
            if !names_event(query, raw, journal_key) {
                return;
            }
            note(journal_key, &mut keys);
            let entry = m
                .payload()
                .and_then(|v| serde_json::from_slice::<Entry>(v).ok());
            let slot = entries.entry(journal_key.to_string()).or_default();
            *slot = match (slot.take(), entry) {
                (_, None) => None, // A tombstone: the entry was removed.
                (Some(old), Some(new)) => Some(old.merged(&new)),
                (None, Some(new)) => Some(new),
            };
        })?;
    }
    let now_ms = crate::telemetry::now_ms();
    let mut runs = Vec::new();
    for (journal_key, entry) in entries {
        let Some(entry) = entry else { continue };
        let chain = (chains.iter())
            .filter(|c| journal_key.starts_with(&c.1))
            .max_by_key(|c| c.1.len());
        runs.push(match chain {
            Some((pipeline, _, steps)) => {
                let steps = steps_of(Some(steps), &entry);
                run(config, pipeline, &journal_key, &entry, steps, now_ms)
            }
            // Written before [[pipelines]] (no prefix): its steps as the entry holds them.
            None => {
                let steps = steps_of(None, &entry);
                run(config, UNPREFIXED, &journal_key, &entry, steps, now_ms)
            }
        });
    }

    let mut results = Vec::new();
    let mut outputs: Vec<&str> = Vec::new();
    for (_, _, steps) in &chains {
        for s in steps.iter() {
            if let StepConfig::Kafka(k) = &s.step {
                let targets: Vec<&str> = if k.topics.is_empty() {
                    vec![k.topic.as_str()]
                } else {
                    k.topics.iter().map(String::as_str).collect()
                };
                for t in targets {
                    if !outputs.contains(&t) {
                        outputs.push(t);
                    }
                }
            }
        }
    }
    for topic in outputs {
        scan(config, topic, |m| {
            let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
            if key.is_some_and(|k| keys.iter().any(|known| known == k) || names_event(query, k, k))
            {
                results.push(located(&m));
            }
        })?;
    }

    let verdict = verdict(&deliveries, &runs, &dead_letters, &results);
    Ok(Story {
        query: query.to_string(),
        keys,
        deliveries,
        runs,
        dlq_topic: config.dlq.topic.clone(),
        dead_letters,
        results,
        verdict,
    })
}

/// One pipeline's run from its journal entry, its steps in configuration order.
/// The kinds of step whose output trace reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Route,
    Llm,
    Other,
}

/// The pipeline's steps in order with their kinds; for an entry of no known pipeline, the
/// steps it holds, their kinds read from their outputs.
fn steps_of(chain: Option<&[StepEntry]>, entry: &Entry) -> Vec<(String, Kind)> {
    match chain {
        Some(steps) => (steps.iter())
            .map(|s| {
                let kind = match &s.step {
                    StepConfig::Route(_) => Kind::Route,
                    StepConfig::Llm(_) => Kind::Llm,
                    _ => Kind::Other,
                };
                (s.name().to_string(), kind)
            })
            .collect(),
        None => (entry.steps.iter())
            .map(|(name, out)| {
                let kind = if out.get("usage").is_some() && out.get("model").is_some() {
                    Kind::Llm
                } else if out.get("route").is_some() && out.get("value").is_some() {
                    Kind::Route
                } else {
                    Kind::Other
                };
                (name.clone(), kind)
            })
            .collect(),
    }
}

/// The pipeline label of journal entries written before `[[pipelines]]` (no prefix).
const UNPREFIXED: &str = "(unprefixed: written before [[pipelines]])";

fn run(
    config: &Config,
    pipeline: &str,
    journal_key: &str,
    entry: &Entry,
    steps: Vec<(String, Kind)>,
    now_ms: u64,
) -> Run {
    let mut tokens = 0;
    let mut cost_usd = 0.0;
    let steps = steps
        .into_iter()
        .map(|(name, kind)| {
            let output = entry.steps.get(&name).cloned();
            let status = match &output {
                Some(v) if v.get("skipped") == Some(&Json::Bool(true)) => "skipped",
                Some(_) => "done",
                None if entry.intents.contains(&name) => "begun",
                None => "not_run",
            };
            let output = output.unwrap_or(Json::Null);
            let route = match (kind, output.get("route")) {
                (Kind::Route, Some(Json::String(r))) => Some(r.clone()),
                _ => None,
            };
            let llm = match (kind, output.get("usage")) {
                (Kind::Llm, Some(usage)) => {
                    let n = |k: &str| usage.get(k).and_then(Json::as_u64).unwrap_or(0);
                    let model = output["model"].as_str().unwrap_or("").to_string();
                    let (input_tokens, output_tokens) = (n("input_tokens"), n("output_tokens"));
                    let cost = config.llm.prices.get(&model).map_or(0.0, |p| {
                        (input_tokens as f64 * p.input_usd_per_mtok
                            + output_tokens as f64 * p.output_usd_per_mtok)
                            / 1e6
                    });
                    tokens += input_tokens + output_tokens;
                    cost_usd += cost;
                    Some(LlmCall {
                        model,
                        provider: output["provider"].as_str().unwrap_or("").to_string(),
                        input_tokens,
                        output_tokens,
                        cost_usd: cost,
                        answer: match output.get("json") {
                            Some(j) if !j.is_null() => j.clone(),
                            _ => output.get("text").cloned().unwrap_or(Json::Null),
                        },
                    })
                }
                _ => None,
            };
            StepStory {
                name,
                status,
                route,
                llm,
                output,
            }
        })
        .collect();
    Run {
        pipeline: pipeline.to_string(),
        journal_key: journal_key.to_string(),
        done: entry.done,
        expires_at_ms: entry.expires_at_ms,
        expired: entry.expires_at_ms <= now_ms,
        steps,
        tokens,
        cost_usd,
    }
}

/// One line: how often it arrived, where it ran, what became of it.
fn verdict(
    deliveries: &[Delivery],
    runs: &[Run],
    dead_letters: &[Json],
    results: &[Located],
) -> String {
    if deliveries.is_empty() && runs.is_empty() && dead_letters.is_empty() {
        return "not found: no delivery, journal entry or dead letter has this id or key"
            .to_string();
    }
    let mut parts = vec![format!(
        "delivered {} time{}",
        deliveries.len(),
        if deliveries.len() == 1 { "" } else { "s" }
    )];
    for r in runs {
        let state = if r.done { "done" } else { "unfinished" };
        let routes: Vec<String> = (r.steps.iter())
            .filter_map(|s| s.route.as_ref().map(|route| format!("routed to {route}")))
            .collect();
        let skipped = r.steps.iter().filter(|s| s.status == "skipped").count();
        let mut line = format!("ran in pipeline {} ({state}", r.pipeline);
        for route in routes {
            line += &format!(", {route}");
        }
        if skipped > 0 {
            line += &format!(", {skipped} step(s) skipped");
        }
        line += ")";
        parts.push(line);
        let copies = (deliveries.iter())
            .filter(|d| d.pipeline.as_deref() == Some(r.pipeline.as_str()))
            .count();
        if r.done && copies > 1 {
            parts.push(format!(
                "{} duplicate{} skipped",
                copies - 1,
                if copies == 2 { "" } else { "s" }
            ));
        }
    }
    for d in dead_letters {
        parts.push(format!(
            "dead-lettered: {} at {}",
            d["reason"].as_str().unwrap_or("?"),
            d["stage"].as_str().unwrap_or("?")
        ));
    }
    parts.push(format!(
        "{} result record{}",
        results.len(),
        if results.len() == 1 { "" } else { "s" }
    ));
    parts.join("; ")
}

impl std::fmt::Display for Story {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}: {}", self.query, self.verdict)?;
        for k in &self.keys {
            writeln!(f, "dedup key {k}")?;
        }
        for d in &self.deliveries {
            writeln!(
                f,
                "delivery {}/{}@{} type {} -> pipeline {}",
                d.at.topic,
                d.at.partition,
                d.at.offset,
                d.event_type,
                d.pipeline.as_deref().unwrap_or("(none takes it)")
            )?;
        }
        for r in &self.runs {
            writeln!(
                f,
                "pipeline {} ({}{}): {} tokens, {:.6} USD",
                r.pipeline,
                if r.done { "done" } else { "unfinished" },
                if r.expired { ", entry expired" } else { "" },
                r.tokens,
                r.cost_usd
            )?;
            for s in &r.steps {
                write!(f, "  {:<20} {}", s.name, s.status)?;
                if let Some(route) = &s.route {
                    write!(f, " -> {route}")?;
                }
                if let Some(c) = &s.llm {
                    write!(
                        f,
                        " {} via {}: {} in / {} out tokens, {:.6} USD, answer {}",
                        c.model, c.provider, c.input_tokens, c.output_tokens, c.cost_usd, c.answer
                    )?;
                }
                writeln!(f)?;
            }
        }
        for d in &self.dead_letters {
            writeln!(
                f,
                "dead letter {}/{}@{}: {} at {} after {} attempt(s): {}",
                self.dlq_topic,
                d["partition"],
                d["offset"],
                d["reason"].as_str().unwrap_or("?"),
                d["stage"].as_str().unwrap_or("?"),
                d["attempts"],
                d["message"].as_str().unwrap_or("")
            )?;
        }
        for r in &self.results {
            writeln!(f, "result {}/{}@{}", r.topic, r.partition, r.offset)?;
        }
        Ok(())
    }
}

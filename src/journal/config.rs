//! The journal's configuration: `[journal]`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::{duration_ms, ConfigError};

/// Dedup by a stable event id, and a durable record of each event's finished steps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// The changelog of the local stores: a topic keyed by dedup key with
    /// `cleanup.policy=compact,delete` and `retention.ms` of at least the longest TTL (see
    /// [`JournalConfig::retention_ms`]). Input partition `p` writes to journal partition
    /// `p mod <its partition count>`.
    pub topic: String,
    /// How long an event's entry is kept, and its duplicates skipped, in seconds.
    #[serde(default = "default_journal_ttl_secs")]
    pub ttl_secs: u64,
    /// TTL per event type (`ce_type`), overriding `ttl_secs`, e.g.
    /// `{ "com.example.comment" = 86400, "com.example.presence" = 3600 }`.
    #[serde(default)]
    pub ttl_by_type: BTreeMap<String, u64>,
    /// Where the stable id comes from: unset, the `ce_id` header; or a JSON pointer into the
    /// event's data (e.g. `/order/id`) for upstream topics without CloudEvents headers.
    #[serde(default)]
    pub id_field: Option<String>,
    /// Directory of the local stores: one file per assigned journal partition
    /// (`<state_dir>/<journal topic>-<partition>.redb`). Each instance needs its own; a lost
    /// or deleted directory is restored from the journal topic.
    #[serde(default = "default_journal_state_dir")]
    pub state_dir: std::path::PathBuf,
    /// Page cache of each open partition store, in bytes. The processor's memory for dedup
    /// state is this times the journal partitions it holds, whatever the number of keys.
    #[serde(default = "default_journal_store_cache_bytes")]
    pub store_cache_bytes: u64,
    /// A restore whose read position has not moved for this long, in milliseconds, marks the
    /// processor not ready (`/readyz` 503, `spillway_journal_restore_stalled`). It keeps going.
    #[serde(default = "default_journal_restore_stall_ms")]
    pub restore_stall_ms: u64,
    /// Margin of the journal topic's `retention.ms` over the longest TTL, in seconds: records
    /// are deleted by retention only once every entry they hold has expired, even with this
    /// much clock difference between the processors and the brokers.
    #[serde(default = "default_journal_retention_margin_secs")]
    pub retention_margin_secs: u64,
    /// The TTLs `[[pipelines]]` set for their events (`pipelines[].journal`), in seconds: not
    /// read from `[journal]` but filled in when the configuration is loaded, so the topic's
    /// retention and the sweep cover them too.
    #[serde(skip)]
    pub pipeline_ttls_secs: Vec<u64>,
}

impl JournalConfig {
    /// The event's dedup key: `<source>|<id>`, the id from `id_field` when it is set and
    /// found in the data.
    pub fn dedup_key(&self, event: &crate::codec::Event) -> String {
        use serde_json::Value as Json;
        let id = (self.id_field.as_deref())
            .and_then(|ptr| event.data.pointer(ptr))
            .and_then(|v| match v {
                Json::String(s) => Some(s.clone()),
                Json::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| event.id.clone());
        format!("{}|{id}", event.source)
    }

    /// Every TTL: `ttl_secs`, `ttl_by_type` and the pipelines'.
    fn ttls_secs(&self) -> impl Iterator<Item = u64> + '_ {
        (self.ttl_by_type.values().copied())
            .chain([self.ttl_secs])
            .chain(self.pipeline_ttls_secs.iter().copied())
    }

    /// The longest TTL of any event type or pipeline.
    pub fn max_ttl_secs(&self) -> u64 {
        self.ttls_secs().max().unwrap_or(self.ttl_secs)
    }

    /// The shortest TTL of any event type or pipeline.
    pub fn min_ttl_secs(&self) -> u64 {
        self.ttls_secs().min().unwrap_or(self.ttl_secs)
    }

    /// The journal topic's `retention.ms` (`cleanup.policy=compact,delete`): the longest TTL
    /// plus the margin.
    pub fn retention_ms(&self) -> u64 {
        self.max_ttl_secs()
            .saturating_add(self.retention_margin_secs)
            .saturating_mul(1000)
    }
}

fn default_journal_ttl_secs() -> u64 {
    86_400
}

fn default_journal_state_dir() -> std::path::PathBuf {
    ".spillway/state".into()
}

fn default_journal_store_cache_bytes() -> u64 {
    2 << 20
}

fn default_journal_restore_stall_ms() -> u64 {
    30_000
}

fn default_journal_retention_margin_secs() -> u64 {
    3_600
}

impl JournalConfig {
    /// The `[journal]` section's rules; its topic differs from the input topics and the DLQ.
    pub fn validate(&self, inputs: &[String], dlq: &str) -> Result<(), ConfigError> {
        let j = self;
        if j.topic.trim().is_empty() {
            return Err(ConfigError::invalid("journal.topic", "must not be empty"));
        }
        if inputs.contains(&j.topic) || j.topic == dlq {
            return Err(ConfigError::invalid(
                "journal.topic",
                "must differ from the input topics and the DLQ topic",
            ));
        }
        if j.ttl_secs == 0 || j.ttl_by_type.values().any(|t| *t == 0) {
            return Err(ConfigError::invalid(
                "journal.ttl_secs",
                "TTLs must be at least 1 second",
            ));
        }
        if j.id_field.as_deref().is_some_and(|f| !f.starts_with('/')) {
            return Err(ConfigError::invalid(
                "journal.id_field",
                "must be a JSON pointer such as /id",
            ));
        }
        const TEN_YEARS_SECS: u64 = 10 * 366 * 86_400;
        let own_max = j.ttl_by_type.values().copied().chain([j.ttl_secs]).max();
        if own_max.unwrap_or(0) > TEN_YEARS_SECS || j.retention_margin_secs > TEN_YEARS_SECS {
            return Err(ConfigError::invalid(
                "journal.ttl_secs",
                "TTLs and retention_margin_secs must be at most ten years",
            ));
        }
        if j.store_cache_bytes < (1 << 20) || j.store_cache_bytes > (1 << 40) {
            return Err(ConfigError::invalid(
                "journal.store_cache_bytes",
                "must be between 1 MiB and 1 TiB",
            ));
        }
        duration_ms("journal.restore_stall_ms", j.restore_stall_ms, 1_000)?;
        if j.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "journal.state_dir",
                "must not be empty",
            ));
        }
        Ok(())
    }
}

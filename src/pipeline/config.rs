//! Pipelines as configured: `[[pipelines]]` (which events each takes, its steps, its journal
//! TTLs) and the `[[steps]]` entries of a chain, with their conditions.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::sink::StepConfig;

/// One `[[pipelines]]` entry: the events it takes and the chain of steps it runs for them. An
/// event runs the first pipeline (in file order) that takes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The pipeline's name (`[a-z0-9_-]`, at most 64 characters): its `pipeline` metrics label
    /// and the namespace of its journal keys (`<name>/<source>|<id>`).
    pub name: String,
    /// Input topics (of `kafka.topics`) whose events it takes; empty or absent: every topic.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Event types (CloudEvents `ce_type`) it takes; empty or absent: every type.
    #[serde(default)]
    pub types: Vec<String>,
    /// Its journal TTLs, overriding `[journal]`'s for its events.
    #[serde(default)]
    pub journal: PipelineJournal,
    /// Its chain of steps, run in order (`[[pipelines.steps]]`, as `[[steps]]`).
    pub steps: Vec<StepEntry>,
}

/// A pipeline's journal TTLs (`[pipelines.journal]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineJournal {
    /// How long its events' entries are kept, in seconds, for types `journal.ttl_by_type`
    /// does not name; default `journal.ttl_secs`.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// TTL by event type, in seconds, before every other TTL for that type.
    #[serde(default)]
    pub ttl_by_type: BTreeMap<String, u64>,
}

impl PipelineConfig {
    /// Every TTL the pipeline sets, in seconds.
    pub fn ttls_secs(&self) -> impl Iterator<Item = u64> + '_ {
        self.journal
            .ttl_secs
            .into_iter()
            .chain(self.journal.ttl_by_type.values().copied())
    }
}

/// One `[[steps]]` entry: the step type's own settings (tagged by `type`) and when it runs.
#[derive(Debug, Clone, Deserialize)]
pub struct StepEntry {
    /// Run the step only when this expression holds: minijinja over `event`, `data` and the
    /// earlier steps' `outputs`, e.g. `outputs.classify.json.label == "negative"`. A step whose
    /// condition is false is recorded as skipped (`{"skipped": true}`) in the journal, so a
    /// redelivered event skips it too; one that cannot be evaluated for an event (a missing
    /// field) dead-letters it as `condition_error`.
    #[serde(default)]
    pub when: Option<String>,
    /// Run the step only when the nearest `type = "route"` step before it chose this case.
    #[serde(default)]
    pub route: Option<String>,
    /// The step type and its settings.
    #[serde(flatten)]
    pub step: StepConfig,
}

impl StepEntry {
    /// The step's name: its journal entry, its output's key, its metrics label.
    pub fn name(&self) -> &str {
        self.step.name()
    }

    /// The step's full condition: its `when` and its route, or `None` if it always runs.
    /// `steps` are the entries before it (for the route step it refers to).
    pub fn condition_source(&self, before: &[StepEntry]) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(when) = &self.when {
            parts.push(format!("({when})"));
        }
        if let Some(case) = &self.route {
            let router = before
                .iter()
                .rev()
                .find(|s| matches!(s.step, StepConfig::Route(_)))?;
            let outputs = format!("outputs[{}]", json_string(router.name()));
            parts.push(format!(
                "({outputs}.route is defined and {outputs}.route == {})",
                json_string(case)
            ));
        }
        (!parts.is_empty()).then(|| parts.join(" and "))
    }

    /// The entry's own rules beyond its type's: its condition compiles, and its route names a
    /// case of a route step before it. `at` is its key (`steps[2]`).
    pub fn validate(&self, at: &str, before: &[StepEntry]) -> Result<(), ConfigError> {
        if let Some(when) = &self.when {
            crate::template::Condition::new(&format!("{at}.when"), when)?;
        }
        if let Some(case) = &self.route {
            let Some(router) = before.iter().rev().find_map(|s| match &s.step {
                StepConfig::Route(r) => Some(r),
                _ => None,
            }) else {
                return Err(ConfigError::invalid(
                    format!("{at}.route"),
                    "needs a step with type = \"route\" before this one",
                ));
            };
            if !router.routes().any(|r| r == case) {
                return Err(ConfigError::invalid(
                    format!("{at}.route"),
                    format!(
                        "`{case}` is not a case of the route step `{}` (its cases: {})",
                        router.name,
                        router.routes().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `text` as a string literal (JSON's syntax, which minijinja expressions accept).
fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

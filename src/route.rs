//! The route step (`type = "route"`): picks one of several routes for an event from a
//! template over its variables (typically the LLM's answer), so the steps after it can run
//! for one route only (`route = "<case>"` on a step) without repeating a condition on each.
//!
//! The choice is the step's output (`{"route": "<case>", "value": "<rendered>"}`), recorded
//! in the journal like any step's, so a redelivered event takes the route it took before,
//! whatever the template or the model would answer now. A value that matches no case takes
//! the `default` route, or, without one, is dead-lettered as `route_unmatched`: nothing is
//! silently dropped.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

use crate::config::{Config, ConfigError};
use crate::pipeline::{Assembly, StepKind};
use crate::step::{Attempt, BoxFuture, EventContext, Step, StepError, StepOutput};
use crate::template::{Escape, Templates};

/// `[[steps]] type = "route"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Step name (its output's key, `outputs.<name>.route`); defaults to `route`.
    #[serde(default = "default_route_name")]
    pub name: String,
    /// What to route on: a template over `event`, `data` and `outputs`, e.g.
    /// `{{ outputs.classify.json.label }}`. Its rendered text (trimmed) is matched against
    /// `cases` exactly.
    pub value: String,
    /// The routes, by the value that selects each. Steps with `route = "<case>"` run for it.
    pub cases: Vec<String>,
    /// The route of a value that matches no case. Unset: such an event is dead-lettered
    /// (`route_unmatched`).
    #[serde(default)]
    pub default: Option<String>,
}

fn default_route_name() -> String {
    "route".to_string()
}

impl RouteConfig {
    /// Every route a step can name: the cases and the default.
    pub fn routes(&self) -> impl Iterator<Item = &str> {
        self.cases.iter().chain(&self.default).map(String::as_str)
    }
}

/// A case or default name: what `route = "..."` may hold.
fn valid_route(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
}

impl StepKind for RouteConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, at: &str, _config: &Config) -> Result<(), ConfigError> {
        if self.cases.is_empty() {
            return Err(ConfigError::invalid(
                format!("{at}.cases"),
                "must list at least one case",
            ));
        }
        for (j, name) in self.routes().enumerate() {
            if !valid_route(name) {
                return Err(ConfigError::invalid(
                    format!("{at}.cases"),
                    format!("`{name}`: a route is 1 to 100 letters, digits, `_`, `-`, `.` or `:`"),
                ));
            }
            if self.routes().take(j).any(|earlier| earlier == name) {
                return Err(ConfigError::invalid(
                    format!("{at}.cases"),
                    format!("`{name}` is listed twice"),
                ));
            }
        }
        Templates::new(&self.name, &[("value", &self.value)], Escape::None).map(|_| ())
    }

    fn build(&self, _cx: &Assembly<'_>) -> Result<Arc<dyn Step>, ConfigError> {
        Ok(Arc::new(RouteStep {
            name: self.name.clone(),
            value: Templates::new(&self.name, &[("value", &self.value)], Escape::None)?,
            cases: self.cases.clone(),
            default: self.default.clone(),
        }))
    }
}

/// The built route step.
pub struct RouteStep {
    name: String,
    value: Templates,
    cases: Vec<String>,
    default: Option<String>,
}

impl RouteStep {
    /// The route for `value`, or the error that dead-letters the event.
    fn choose(&self, value: &str) -> Result<&str, StepError> {
        if let Some(case) = self.cases.iter().find(|c| *c == value) {
            return Ok(case);
        }
        self.default.as_deref().ok_or_else(|| {
            StepError::deterministic(
                "route_unmatched",
                format!(
                    "steps.{}: the value matched none of the cases ({}) and there is no default",
                    self.name,
                    self.cases.join(", ")
                ),
            )
        })
    }
}

impl Step for RouteStep {
    fn name(&self) -> &str {
        &self.name
    }

    fn run<'a>(
        &'a self,
        ctx: &'a EventContext,
        _attempt: Attempt,
    ) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        let chosen = self
            .value
            .render("value", ctx)
            .map_err(|e| {
                StepError::deterministic("route_template", format!("steps.{}.{e}", self.name))
            })
            .and_then(|value| {
                let value = value.trim();
                let route = self.choose(value)?;
                Ok(StepOutput::value(json!({ "route": route, "value": value })))
            });
        Box::pin(std::future::ready(chosen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(default: Option<&str>) -> RouteStep {
        RouteStep {
            name: "route".into(),
            value: Templates::new("route", &[("value", "{{ data.label }}")], Escape::None).unwrap(),
            cases: vec!["negative".into(), "positive".into()],
            default: default.map(str::to_string),
        }
    }

    async fn run(step: &RouteStep, label: &str) -> Result<StepOutput, StepError> {
        let ctx = crate::template::test_context(json!({ "label": label }));
        step.run(&ctx, Attempt::first()).await
    }

    #[tokio::test]
    async fn each_value_takes_its_case_and_an_unmatched_one_the_default_or_the_dlq() {
        let with_default = route(Some("other"));
        for (label, expected) in [("negative", "negative"), (" positive\n", "positive")] {
            let out = run(&with_default, label).await.unwrap();
            assert_eq!(out.value.unwrap()["route"], expected);
        }
        let out = run(&with_default, "neutral").await.unwrap();
        assert_eq!(out.value.unwrap()["route"], "other");
        let err = run(&route(None), "neutral").await.unwrap_err();
        assert_eq!(err.code, "route_unmatched");
        assert_eq!(err.action, crate::step::Action::DeadLetter);
        assert!(
            !err.message.contains("neutral"),
            "the value (model output) stays out of the DLQ message: {}",
            err.message
        );
    }
}

//! Prompt templates and output checks of an LLM step.
//!
//! The system and user prompts are [`crate::template`]s: strict about missing fields, over
//! `event` (`id`, `source`, `type`, `time`), `data` (the payload) and `outputs` (earlier steps'
//! results), never escaped.

use serde_json::Value as Json;

use crate::config::ConfigError;
use crate::llm::config::OutputConfig;
use crate::llm::config::OutputFormat;
use crate::step::EventContext;
use crate::template::{Escape, Templates};

/// The compiled system and user templates.
pub struct Prompt {
    templates: Templates,
}

impl Prompt {
    /// Compiles the templates; syntax errors fail at start-up, naming the step and the key.
    pub fn new(step: &str, system: Option<&str>, user: &str) -> Result<Prompt, ConfigError> {
        let mut named = vec![("user", user)];
        named.extend(system.map(|s| ("system", s)));
        Ok(Prompt {
            templates: Templates::new(step, &named, Escape::None)?,
        })
    }

    /// Renders `(system, user)` for an event. The error names what is missing, never values.
    pub fn render(&self, ctx: &EventContext) -> Result<(Option<String>, String), String> {
        let vars = Templates::vars(ctx);
        let system = if self.templates.has("system") {
            Some(self.templates.render_with("system", &vars)?)
        } else {
            None
        };
        Ok((system, self.templates.render_with("user", &vars)?))
    }
}

/// Why an answer was not accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    /// Full detail, fed back to the model in the repair request.
    pub for_model: String,
    /// Detail without any of the answer's content, for logs and DLQ headers.
    pub for_humans: String,
}

/// What an answer must look like.
pub struct OutputCheck {
    format: OutputFormat,
    schema: Option<jsonschema::Validator>,
}

impl OutputCheck {
    /// Compiles the schema; an invalid schema fails at start-up.
    pub fn new(step: &str, config: &OutputConfig) -> Result<OutputCheck, ConfigError> {
        let schema = config
            .schema
            .as_ref()
            .map(|s| {
                jsonschema::validator_for(s).map_err(|e| ConfigError::Invalid {
                    key: format!("steps.{step}.output.schema"),
                    message: format!("not a valid JSON Schema: {e}"),
                })
            })
            .transpose()?;
        Ok(OutputCheck {
            format: config.format,
            schema,
        })
    }

    /// Whether answers must be JSON.
    pub fn wants_json(&self) -> bool {
        self.format == OutputFormat::Json
    }

    /// Accepts the answer (its parsed JSON for the JSON format) or says why not.
    pub fn check(&self, text: &str) -> Result<Option<Json>, Invalid> {
        if self.format == OutputFormat::Text {
            return Ok(None);
        }
        let value: Json = serde_json::from_str(strip_fences(text)).map_err(|e| Invalid {
            for_model: format!("it is not valid JSON ({e})"),
            for_humans: format!(
                "answer is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ),
        })?;
        if let Some(schema) = &self.schema {
            let errors: Vec<_> = schema.iter_errors(&value).take(5).collect();
            if !errors.is_empty() {
                let for_model = errors
                    .iter()
                    .map(|e| format!("at `{}`: {e}", e.instance_path()))
                    .collect::<Vec<_>>()
                    .join("; ");
                let paths = errors
                    .iter()
                    .map(|e| e.instance_path().to_string())
                    .collect::<Vec<_>>();
                return Err(Invalid {
                    for_model: format!("it does not match the JSON Schema: {for_model}"),
                    for_humans: format!(
                        "answer does not match the output schema at {}",
                        paths.join(", ")
                    ),
                });
            }
        }
        Ok(Some(value))
    }
}

/// Models often wrap JSON in a Markdown code fence; accept that.
fn strip_fences(text: &str) -> &str {
    let t = text.trim();
    let Some(inner) = t.strip_prefix("```") else {
        return t;
    };
    let inner = inner.strip_prefix("json").unwrap_or(inner);
    inner.strip_suffix("```").unwrap_or(inner).trim()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx(data: Json) -> EventContext {
        crate::template::test_context(data)
    }

    #[test]
    fn templates_fill_from_event_fields_and_refuse_missing_ones() {
        let p = Prompt::new(
            "s",
            Some("Classify {{ event.type }}s."),
            "Text: {{ data.text }}",
        )
        .unwrap();
        let (system, user) = p.render(&ctx(json!({"text": "great post"}))).unwrap();
        assert_eq!(system.as_deref(), Some("Classify comments."));
        assert_eq!(user, "Text: great post");
        let err = p.render(&ctx(json!({"body": "x"}))).unwrap_err();
        assert!(err.contains("user template"), "{err}");
        assert!(Prompt::new("s", None, "{{ unclosed").is_err());
    }

    #[test]
    fn json_output_is_validated_against_the_schema() {
        let check = OutputCheck::new(
            "s",
            &OutputConfig {
                format: OutputFormat::Json,
                schema: Some(json!({
                    "type": "object",
                    "required": ["label"],
                    "properties": {"label": {"enum": ["positive", "negative", "neutral"]}}
                })),
                repair_attempts: 2,
            },
        )
        .unwrap();
        assert_eq!(
            check
                .check("```json\n{\"label\": \"positive\"}\n```")
                .unwrap(),
            Some(json!({"label": "positive"}))
        );
        let bad = check.check(r#"{"label": "ecstatic"}"#).unwrap_err();
        assert!(bad.for_model.contains("/label"), "{}", bad.for_model);
        assert!(
            !bad.for_humans.contains("ecstatic"),
            "no output in DLQ headers"
        );
        assert!(check.check("label: positive").is_err());
    }
}

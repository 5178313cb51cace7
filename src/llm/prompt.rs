//! Prompt templates and output checks of an LLM step.
//!
//! Templates are minijinja with strict undefined variables: a template that names a field the
//! event lacks fails (a deterministic error) instead of sending a prompt with a hole in it.
//! They see `event` (`id`, `source`, `type`, `time`), `data` (the payload) and `outputs`
//! (earlier steps' results).

use serde_json::{json, Value as Json};

use crate::config::{ConfigError, OutputConfig, OutputFormat};
use crate::processor::step::EventContext;

/// The compiled system and user templates.
pub struct Prompt {
    env: minijinja::Environment<'static>,
    has_system: bool,
}

impl Prompt {
    /// Compiles the templates; syntax errors fail at start-up, naming the step.
    pub fn new(step: &str, system: Option<&str>, user: &str) -> Result<Prompt, ConfigError> {
        Self::compile(step, system, user, minijinja::Environment::new())
    }

    /// A Slack message template. With `escape`, every value it renders (event data, earlier
    /// steps' outputs) has Slack's control characters `&`, `<` and `>` escaped, so text from
    /// an event cannot become a mention (`<!channel>`, `<@U123>`) or a link; the template's
    /// own text is left as written. A value piped through `|safe`, or a block inside
    /// `{% autoescape false %}`, is rendered as is.
    pub fn slack(step: &str, text: &str, escape: bool) -> Result<Prompt, ConfigError> {
        let mut env = minijinja::Environment::new();
        if escape {
            env.set_auto_escape_callback(|_| minijinja::AutoEscape::Custom("slack".into()));
            env.set_formatter(|out, state, value| {
                if value.is_safe()
                    || !matches!(state.auto_escape(), minijinja::AutoEscape::Custom(_))
                {
                    return minijinja::escape_formatter(out, state, value);
                }
                out.write_str(&slack_escape(&value.to_string()))
                    .map_err(|e| {
                        minijinja::Error::new(minijinja::ErrorKind::WriteFailure, e.to_string())
                    })
            });
        }
        Self::compile(step, None, text, env)
    }

    fn compile(
        step: &str,
        system: Option<&str>,
        user: &str,
        mut env: minijinja::Environment<'static>,
    ) -> Result<Prompt, ConfigError> {
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        let invalid = |k: &str, e: minijinja::Error| ConfigError::Invalid {
            key: format!("steps.{step}.{k}"),
            message: format!("template error: {e}"),
        };
        env.add_template_owned("user", user.to_string())
            .map_err(|e| invalid("user", e))?;
        if let Some(system) = system {
            env.add_template_owned("system", system.to_string())
                .map_err(|e| invalid("system", e))?;
        }
        Ok(Prompt {
            env,
            has_system: system.is_some(),
        })
    }

    /// Renders `(system, user)` for an event. The error names what is missing, never values.
    pub fn render(&self, ctx: &EventContext) -> Result<(Option<String>, String), String> {
        let e = &ctx.event;
        let vars = minijinja::Value::from(minijinja::value::Serde(json!({
            "event": {"id": e.id, "source": e.source, "type": e.event_type, "time": e.time},
            "data": e.data,
            "outputs": ctx.outputs,
        })));
        let render = |name: &str| -> Result<String, String> {
            self.env
                .get_template(name)
                .and_then(|t| t.render(&vars))
                .map_err(|e| format!("{name} template: {}", e.kind()))
        };
        let system = if self.has_system {
            Some(render("system")?)
        } else {
            None
        };
        Ok((system, render("user")?))
    }
}

/// Slack's escaping of message text: `&`, `<` and `>` as `&amp;`, `&lt;` and `&gt;`.
pub fn slack_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
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
    use crate::codec::Event;
    use crate::processor::step::Spend;
    use rdkafka::message::{OwnedHeaders, OwnedMessage, Timestamp};
    use std::sync::Arc;

    fn ctx(data: Json) -> EventContext {
        EventContext {
            record: Arc::new(OwnedMessage::new(
                None,
                None,
                "t".into(),
                Timestamp::NotAvailable,
                0,
                0,
                Some(OwnedHeaders::new()),
            )),
            event: Event {
                id: "e-1".into(),
                source: "/webhooks/blog".into(),
                event_type: "comment".into(),
                time: None,
                data,
            },
            dedup_key: "test|1".into(),
            intent_recorded: false,
            outputs: serde_json::Map::new(),
            attempt: 1,
            spend: Spend::default(),
            staged: Vec::new(),
        }
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
    fn event_text_in_a_slack_message_cannot_mention_or_link() {
        let mut c = ctx(json!({"text": "<!channel> urgent & <https://evil.example|click>"}));
        c.outputs
            .insert("llm".into(), json!({"label": "<@U999> is to blame"}));
        let text = "<@U123> new comment: {{ data.text }} ({{ outputs.llm.label }})";
        let (_, out) = Prompt::slack("s", text, true).unwrap().render(&c).unwrap();
        assert_eq!(
            out,
            "<@U123> new comment: &lt;!channel&gt; urgent &amp; \
             &lt;https://evil.example|click&gt; (&lt;@U999&gt; is to blame)"
        );
        // Opt-outs: one value with |safe, or the whole template.
        let (_, out) = Prompt::slack("s", "{{ data.text | safe }}", true)
            .unwrap()
            .render(&c)
            .unwrap();
        assert_eq!(out, "<!channel> urgent & <https://evil.example|click>");
        let block = "{% autoescape false %}{{ data.text }}{% endautoescape %} {{ data.text }}";
        let (_, out) = Prompt::slack("s", block, true).unwrap().render(&c).unwrap();
        assert_eq!(
            out,
            "<!channel> urgent & <https://evil.example|click> \
             &lt;!channel&gt; urgent &amp; &lt;https://evil.example|click&gt;"
        );
        let (_, out) = Prompt::slack("s", "{{ data.text }}", false)
            .unwrap()
            .render(&c)
            .unwrap();
        assert_eq!(out, "<!channel> urgent & <https://evil.example|click>");
        // Non-string values render as before; a missing field is still an error.
        let c = ctx(json!({"n": 3, "ok": true, "list": [1, 2]}));
        let values = "{{ data.n }} {{ data.ok }} {{ data.list }}";
        let render = |escape| {
            Prompt::slack("s", values, escape)
                .unwrap()
                .render(&c)
                .unwrap()
        };
        assert_eq!(render(true), render(false));
        assert!(Prompt::slack("s", "{{ data.missing }}", true)
            .unwrap()
            .render(&c)
            .is_err());
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

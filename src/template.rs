//! Event templates: minijinja over `event` (`id`, `source`, `type`, `time`), `data` (the
//! payload) and `outputs` (earlier steps' results), shared by the LLM step's prompts and the
//! Slack sink's message.
//!
//! Undefined variables are strict: a template that names a field the event lacks fails (a
//! deterministic error naming the template, never a value) instead of rendering a hole.
//! [`Escape::Slack`] escapes Slack's control characters in every rendered value.

#[cfg(test)]
use serde_json::{json, Value as Json};

use std::sync::Arc;

use crate::config::ConfigError;
use crate::step::EventContext;
use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{ErrorKind, Value};

/// How rendered values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// As they are (prompts).
    None,
    /// Slack's `&`, `<` and `>` as `&amp;`, `&lt;` and `&gt;`, so text from an event cannot
    /// become a mention (`<!channel>`, `<@U123>`) or a link. The template's own text is left
    /// as written; a value piped through `| safe`, or a block inside `{% autoescape false %}`,
    /// is rendered as is.
    Slack,
}

/// A step's compiled templates, by their configuration key (`user`, `system`, `text`).
pub struct Templates {
    env: minijinja::Environment<'static>,
}

impl Templates {
    /// Compiles `(key, source)` pairs; a syntax error fails at start-up naming
    /// `steps.<step>.<key>`.
    pub fn new(
        step: &str,
        named: &[(&str, &str)],
        escape: Escape,
    ) -> Result<Templates, ConfigError> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        if escape == Escape::Slack {
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
        for (key, source) in named {
            env.add_template_owned(key.to_string(), source.to_string())
                .map_err(|e| ConfigError::Invalid {
                    key: format!("steps.{step}.{key}"),
                    message: format!("template error: {e}"),
                })?;
        }
        Ok(Templates { env })
    }

    /// Whether a template with this key was compiled.
    pub fn has(&self, key: &str) -> bool {
        self.env.get_template(key).is_ok()
    }

    /// The variables an event's templates see: `event`, `data` and `outputs`, each converted
    /// only as far as a template reads it (conditions build this for every event).
    pub fn vars(ctx: &EventContext) -> minijinja::Value {
        minijinja::Value::from_object(Vars {
            event: ctx.event.clone(),
            outputs: ctx.outputs.clone(),
        })
    }

    /// Renders template `key` for an event. The error names the template and what went
    /// wrong, never values.
    pub fn render(&self, key: &str, ctx: &EventContext) -> Result<String, String> {
        self.render_with(key, &Self::vars(ctx))
    }

    /// Renders template `key` with variables from [`Templates::vars`].
    pub fn render_with(&self, key: &str, vars: &minijinja::Value) -> Result<String, String> {
        self.env
            .get_template(key)
            .and_then(|t| t.render(vars))
            .map_err(|e| format!("{key} template: {}", e.kind()))
    }
}

/// The top-level variables: `event` (`id`, `source`, `type`, `time`), `data`, `outputs`.
#[derive(Debug)]
struct Vars {
    event: Arc<crate::codec::Event>,
    outputs: Arc<JsonMap>,
}

type JsonMap = serde_json::Map<String, serde_json::Value>;

impl Object for Vars {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "event" => Some(Value::from_object(EventVars(self.event.clone()))),
            "data" => Some(lazy(Root::Event(self.event.clone()), Vec::new())),
            "outputs" => Some(lazy(Root::Outputs(self.outputs.clone()), Vec::new())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["event", "data", "outputs"])
    }
}

/// `event`: the CloudEvents attributes.
#[derive(Debug)]
struct EventVars(Arc<crate::codec::Event>);

impl Object for EventVars {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let e = &self.0;
        Some(match key.as_str()? {
            "id" => Value::from(e.id.as_str()),
            "source" => Value::from(e.source.as_str()),
            "type" => Value::from(e.event_type.as_str()),
            "time" => Value::from(e.time.as_deref()),
            _ => return None,
        })
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["id", "source", "type", "time"])
    }
}

/// What a lazy JSON value hangs off: the event's `data` or the outputs.
#[derive(Debug, Clone)]
enum Root {
    Event(Arc<crate::codec::Event>),
    Outputs(Arc<JsonMap>),
}

/// One step down a JSON value: a member's name or an item's index.
#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A node of a JSON tree: the outputs map itself, or a value in it or in `data`.
enum Node<'a> {
    Map(&'a JsonMap),
    Json(&'a serde_json::Value),
}

impl<'a> Node<'a> {
    fn child(self, seg: &Seg) -> Option<Node<'a>> {
        use serde_json::Value as J;
        let map = match self {
            Node::Map(m) => m,
            Node::Json(J::Object(m)) => m,
            Node::Json(J::Array(items)) => {
                return match seg {
                    Seg::Index(i) => items.get(*i).map(Node::Json),
                    Seg::Key(_) => None,
                }
            }
            Node::Json(_) => return None,
        };
        match seg {
            Seg::Key(k) => map.get(k).map(Node::Json),
            Seg::Index(_) => None,
        }
    }
}

/// The JSON object or array at `path` under `root`, whose members are converted only when
/// read: a condition on `outputs.classify.json.label` looks up one string instead of
/// converting every step's output for every event.
#[derive(Debug)]
struct LazyJson {
    root: Root,
    path: Vec<Seg>,
}

impl LazyJson {
    fn node(&self) -> Option<Node<'_>> {
        let start = match &self.root {
            Root::Event(e) => Node::Json(&e.data),
            Root::Outputs(o) => Node::Map(o),
        };
        self.path
            .iter()
            .try_fold(start, |node, seg| node.child(seg))
    }
}

/// The value at `path` under `root`: objects and arrays stay lazy, scalars are converted.
fn lazy(root: Root, path: Vec<Seg>) -> Value {
    let node = LazyJson { root, path };
    match node.node() {
        Some(Node::Json(scalar)) if !is_container(scalar) => scalar_value(scalar),
        Some(_) => Value::from_object(node),
        None => Value::UNDEFINED,
    }
}

fn is_container(json: &serde_json::Value) -> bool {
    matches!(
        json,
        serde_json::Value::Object(_) | serde_json::Value::Array(_)
    )
}

/// A JSON scalar as a template value, converted directly.
fn scalar_value(json: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match json {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (_, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(text) => Value::from(text.as_str()),
        _ => Value::from(minijinja::value::Serde(json)),
    }
}

impl Object for LazyJson {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        match self.node() {
            Some(Node::Json(serde_json::Value::Array(_))) => ObjectRepr::Seq,
            _ => ObjectRepr::Map,
        }
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        use serde_json::Value as J;
        // The member, and the step to it (an index into an array, else a name).
        let (child, index) = match self.node()? {
            Node::Json(J::Array(items)) => {
                let i = key.as_usize()?;
                (items.get(i)?, Some(i))
            }
            Node::Map(m) | Node::Json(J::Object(m)) => (m.get(key.as_str()?)?, None),
            Node::Json(_) => return None,
        };
        if !is_container(child) {
            return Some(scalar_value(child));
        }
        let seg = match index {
            Some(i) => Seg::Index(i),
            None => Seg::Key(key.as_str()?.to_string()),
        };
        let mut path = Vec::with_capacity(self.path.len() + 1);
        path.extend(self.path.iter().cloned());
        path.push(seg);
        Some(Value::from_object(LazyJson {
            root: self.root.clone(),
            path,
        }))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let keys =
            |m: &JsonMap| Enumerator::Values(m.keys().map(|k| Value::from(k.as_str())).collect());
        match self.node() {
            Some(Node::Map(m)) | Some(Node::Json(serde_json::Value::Object(m))) => keys(m),
            Some(Node::Json(serde_json::Value::Array(items))) => Enumerator::Seq(items.len()),
            _ => Enumerator::Empty,
        }
    }
}

/// A step's `when` condition: a minijinja expression over `event`, `data` and `outputs`,
/// compiled once at start-up. Undefined names are strict: a condition that reads a field the
/// event lacks fails to evaluate (write `data.x is defined and ...` to allow it).
pub struct Condition {
    key: String,
    source: String,
    expr: minijinja::Expression<'static, 'static>,
}

/// The one environment conditions compile in (strict undefined, no templates).
fn expression_env() -> &'static minijinja::Environment<'static> {
    static ENV: std::sync::OnceLock<minijinja::Environment<'static>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env
    })
}

impl Condition {
    /// Compiles `source`; a syntax error fails at start-up naming `key`.
    pub fn new(key: &str, source: &str) -> Result<Condition, ConfigError> {
        let expr = expression_env()
            .compile_expression_owned(source.to_string())
            .map_err(|e| ConfigError::invalid(key, format!("condition error: {e}")))?;
        Ok(Condition {
            key: key.to_string(),
            source: source.to_string(),
            expr,
        })
    }

    /// Its configuration key (`steps.<step>.when`, `pipelines.<pipeline>.steps.<step>.when`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the condition holds for an event. The error says what went wrong (an
    /// undefined name, a type error), never a value.
    pub fn holds(&self, ctx: &EventContext) -> Result<bool, String> {
        let value = self
            .expr
            .eval(Templates::vars(ctx))
            .map_err(|e| e.kind().to_string())?;
        if value.is_undefined() {
            return Err(ErrorKind::UndefinedError.to_string());
        }
        Ok(value.is_true())
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

/// An event context with `data` as its payload, for unit tests.
#[cfg(test)]
pub(crate) fn test_context(data: Json) -> EventContext {
    EventContext {
        record: std::sync::Arc::new(rdkafka::message::OwnedMessage::new(
            None,
            None,
            "t".into(),
            rdkafka::message::Timestamp::NotAvailable,
            0,
            0,
            Some(rdkafka::message::OwnedHeaders::new()),
        )),
        event: std::sync::Arc::new(crate::codec::Event {
            id: "e-1".into(),
            source: "/webhooks/blog".into(),
            event_type: "comment".into(),
            time: None,
            data: data.into(),
        }),
        dedup_key: "test|1".into(),
        outputs: Default::default(),
        share: Default::default(),
        pipeline: "default".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(data: Json) -> EventContext {
        test_context(data)
    }

    struct Slack(Templates);

    fn slack(text: &str, escape: bool) -> Slack {
        let escape = if escape { Escape::Slack } else { Escape::None };
        Slack(Templates::new("s", &[("text", text)], escape).unwrap())
    }

    impl Slack {
        fn try_render(&self, c: &EventContext) -> Result<String, String> {
            self.0.render("text", c)
        }
        fn render(&self, c: &EventContext) -> String {
            self.try_render(c).unwrap()
        }
    }

    #[test]
    fn templates_read_nested_outputs_arrays_and_whole_values_through_the_lazy_view() {
        let mut c = ctx(
            json!({"tags": ["a", "b"], "n": 1.5, "big": 18446744073709551615u64, "nested": {"x": null}}),
        );
        std::sync::Arc::make_mut(&mut c.outputs).insert(
            "classify".into(),
            json!({"json": {"label": "neg", "scores": [0.1, 0.9]}}),
        );
        let source = "{{ outputs.classify.json.label }} {{ outputs.classify.json.scores[1] }} \
                      {{ data.tags[0] }}{{ data.tags|length }} {{ data.n }} {{ data.big }} \
                      {{ data.nested.x is none }} {{ data|tojson }} \
                      {% for k in outputs %}{{ k }}{% endfor %} {{ event.time is none }} \
                      {{ event.type }} {{ outputs.classify|tojson }}";
        let t = Templates::new("t", &[("a", source)], Escape::None).unwrap();
        assert_eq!(
            t.render("a", &c).unwrap(),
            "neg 0.9 a2 1.5 18446744073709551615 True \
             {\"big\": 18446744073709551615, \"n\": 1.5, \"nested\": {\"x\": null}, \"tags\": [\"a\", \"b\"]} \
             classify True comment {\"json\": {\"label\": \"neg\", \"scores\": [0.1, 0.9]}}"
        );
        for missing in [
            "{{ outputs.classify.json.nope }}",
            "{{ outputs.other }}",
            "{{ data.tags[5] }}",
            "{{ data.n.deeper }}",
        ] {
            let t = Templates::new("t", &[("a", missing)], Escape::None).unwrap();
            assert!(t.render("a", &c).is_err(), "{missing} is undefined");
        }
    }

    #[test]
    fn event_text_in_a_slack_message_cannot_mention_or_link() {
        let mut c = ctx(json!({"text": "<!channel> urgent & <https://evil.example|click>"}));
        std::sync::Arc::make_mut(&mut c.outputs)
            .insert("llm".into(), json!({"label": "<@U999> is to blame"}));
        let text = "<@U123> new comment: {{ data.text }} ({{ outputs.llm.label }})";
        let out = slack(text, true).render(&c);
        assert_eq!(
            out,
            "<@U123> new comment: &lt;!channel&gt; urgent &amp; \
             &lt;https://evil.example|click&gt; (&lt;@U999&gt; is to blame)"
        );
        // Opt-outs: one value with |safe, or the whole template.
        let out = slack("{{ data.text | safe }}", true).render(&c);
        assert_eq!(out, "<!channel> urgent & <https://evil.example|click>");
        let block = "{% autoescape false %}{{ data.text }}{% endautoescape %} {{ data.text }}";
        let out = slack(block, true).render(&c);
        assert_eq!(
            out,
            "<!channel> urgent & <https://evil.example|click> \
             &lt;!channel&gt; urgent &amp; &lt;https://evil.example|click&gt;"
        );
        let out = slack("{{ data.text }}", false).render(&c);
        assert_eq!(out, "<!channel> urgent & <https://evil.example|click>");
        // Non-string values render as before; a missing field is still an error.
        let c = ctx(json!({"n": 3, "ok": true, "list": [1, 2]}));
        let values = "{{ data.n }} {{ data.ok }} {{ data.list }}";
        let render = |escape| slack(values, escape).render(&c);
        assert_eq!(render(true), render(false));
        assert!(slack("{{ data.missing }}", true).try_render(&c).is_err());
    }

    #[test]
    fn a_template_error_names_its_step_and_key() {
        let err = Templates::new("alert", &[("text", "{{ unclosed")], Escape::Slack)
            .err()
            .unwrap();
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "steps.alert.text"),
            "{err}"
        );
    }

    #[test]
    fn a_condition_holds_fails_or_refuses_a_missing_field() {
        let c = ctx(serde_json::json!({"text": "hi", "score": 7}));
        let holds = |expr: &str| Condition::new("steps[0].when", expr).unwrap().holds(&c);
        assert_eq!(holds("data.score > 5"), Ok(true));
        assert_eq!(
            holds("data.text == \"bye\" or event.type == \"other\""),
            Ok(false)
        );
        assert_eq!(holds("data.missing is defined and data.missing"), Ok(false));
        for missing in [
            "data.missing",
            "data.missing == 1",
            "outputs.classify.json.label == \"x\"",
        ] {
            let err = holds(missing).expect_err(missing);
            assert!(err.contains("undefined"), "{missing}: {err}");
        }
        let refused = Condition::new("steps[3].when", "data.score >")
            .err()
            .unwrap();
        assert!(refused.to_string().contains("steps[3].when"), "{refused}");
    }

    #[test]
    fn lazy_payload_variables_render_like_the_payload_itself() {
        let templates = [
            "{{ data.user.name }}|{{ data.items[1] }}|{{ data.items | length }}",
            "{% for k in data %}{{ k }},{% endfor %}|{{ data.user.tags | join('-') }}",
            "{{ data.missing is defined }}|{{ data.n * 2 }}|{{ data | tojson }}|{{ data }}",
            "{{ data | length }}|{{ data.user }}|{{ data.items | last }}",
        ];
        for payload in [
            json!({"user": {"name": "ann", "tags": ["a", "b"]}, "items": [1, 2, 3], "n": 2.5}),
            json!([{"user": {"name": "bo", "tags": []}, "items": [4], "n": 1}, 7]),
        ] {
            let c = ctx(payload.clone());
            let eager = minijinja::context! {
                data => minijinja::Value::from(minijinja::value::Serde(&payload)),
            };
            for (n, source) in templates.iter().enumerate() {
                let source = if payload.is_array() {
                    source
                        .replace("data.", "data[0].")
                        .replace("data |", "data[0] |")
                } else {
                    source.to_string()
                };
                let t = Templates::new("s", &[("t", &source)], Escape::None).unwrap();
                assert_eq!(
                    t.render("t", &c),
                    t.render_with("t", &eager),
                    "template {n}: {source}"
                );
            }
        }
    }
}

//! Side-effect steps: where results leave Spillway. Also the registry of every step type
//! (the sinks and the LLM step): one line each in [`step_types!`](crate::step_types) below.
//!
//! A step type is a config struct (serde, `deny_unknown_fields`) that implements
//! [`crate::pipeline::StepKind`] (its name, its rules, how to build its step) next to its
//! code. Adding a sink touches its own file and one line here: `<Variant>(<config type>) in mod
//! <file>` declares the module and registers the type under `type = "<variant in snake_case>"`.

crate::step_types! {
    /// HTTP POST of the event to a URL (the generic webhook sink).
    Webhook(webhook::WebhookConfig) in mod webhook,
    /// A call to an LLM provider; its answer is passed on to the following steps.
    Llm(crate::llm::config::LlmStepConfig),
    /// A Slack message: `chat.postMessage` with a bot token, or an incoming webhook.
    Slack(slack::SlackConfig) in mod slack,
    /// A result record on a Kafka topic, written in a transaction with the journal entry.
    Kafka(kafka::KafkaSinkConfig) in mod kafka,
    /// Picks one of several routes for the event; steps with `route = "<case>"` run for it.
    Route(crate::route::RouteConfig),
}

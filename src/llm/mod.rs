//! The LLM stage. So far: the provider simulator (`spillway mock-llm`) that tests and local
//! load tests run against. The client, admission control and breaker come with issue 3.

pub mod simulator;

//! Spillway: event-driven LLM pipelines on Kafka.
//!
//! The library holds every service and the command line ([`cli`]); `src/main.rs` only parses
//! the arguments and calls [`cli::main`], which loads configuration, starts logging and runs
//! the command. See `ARCHITECTURE.md` for the map.

pub mod cli;
pub mod codec;
pub mod config;
pub mod fair;
pub mod fault;
pub mod ingress;
pub mod journal;
pub mod kafka;
pub mod llm;
pub mod outbound;
pub mod pipeline;
pub mod processor;
pub mod route;
pub mod shutdown;
pub mod signing;
pub mod sink;
pub mod step;
pub mod telemetry;
pub mod template;

//! Side-effect steps: where results leave Spillway.

pub mod webhook;

use std::sync::Arc;

use crate::config::{ConfigError, StepConfig};
use crate::processor::step::{Pipeline, Step};

/// Builds the configured chain of steps.
pub fn build_pipeline(steps: &[StepConfig]) -> Result<Pipeline, ConfigError> {
    steps
        .iter()
        .map(|s| -> Result<Arc<dyn Step>, ConfigError> {
            match s {
                StepConfig::Webhook(w) => Ok(Arc::new(webhook::WebhookSink::new(w)?)),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Into::into)
}

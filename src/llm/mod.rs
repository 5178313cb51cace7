//! The LLM stage.
//!
//! * [`client`]: one provider account over HTTP (OpenAI-compatible or Anthropic), one request
//!   per call, every outcome classified.
//! * [`limit`]: admission control per account: `Retry-After` deadlines, refundable token
//!   buckets, a governor request limiter.
//! * [`breaker`]: the circuit breaker per account; it closes the processor's gate.
//! * [`prompt`]: templates and output validation. [`step`]: the step that ties them together.
//! * [`budget`]: spend budgets per day or month, reserved before each call, shared by
//!   replicas through a compacted topic.

pub mod breaker;
pub mod budget;
pub mod client;
pub mod config;
pub mod limit;
pub mod prompt;
pub mod step;

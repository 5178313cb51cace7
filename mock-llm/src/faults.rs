//! Faults: the kinds the simulator injects, and the `--script` and `--faults` parsers.

use super::*;
use serde::Serialize;
use std::collections::VecDeque;

/// An injected behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Answer normally.
    Ok,
    /// 500 internal error.
    ServerError,
    /// 529 overloaded.
    Overloaded,
    /// Never answer.
    Hang,
    /// 429 `insufficient_quota`.
    Quota,
    /// 400 context window exceeded.
    Overflow,
    /// 200 with a truncated JSON body.
    Malformed,
    /// 429 rate limit with `retry-after` of `--retry-after-ms`.
    RateLimit,
    /// 200 whose answer text is not JSON (bad structured output).
    Invalid,
}

impl Fault {
    pub(crate) fn parse(s: &str) -> Result<Fault, SimulatorError> {
        Ok(match s.trim() {
            "ok" => Fault::Ok,
            "500" => Fault::ServerError,
            "529" => Fault::Overloaded,
            "hang" => Fault::Hang,
            "quota" => Fault::Quota,
            "overflow" => Fault::Overflow,
            "malformed" => Fault::Malformed,
            "429" => Fault::RateLimit,
            "invalid" => Fault::Invalid,
            other => return Err(SimulatorError::BadFault(other.to_string())),
        })
    }
}

pub(crate) fn parse_script(s: &str) -> Result<VecDeque<Fault>, SimulatorError> {
    s.split(',')
        .filter(|e| !e.trim().is_empty())
        .map(Fault::parse)
        .collect()
}

pub(crate) fn parse_rates(s: &str) -> Result<Vec<(Fault, f64)>, SimulatorError> {
    s.split(',')
        .filter(|e| !e.trim().is_empty())
        .map(|entry| {
            let (kind, rate) = entry
                .split_once('=')
                .ok_or_else(|| SimulatorError::BadFault(entry.to_string()))?;
            let rate: f64 = rate
                .trim()
                .parse()
                .map_err(|_| SimulatorError::BadFault(entry.to_string()))?;
            if !(0.0..=1.0).contains(&rate) {
                return Err(SimulatorError::BadFault(entry.to_string()));
            }
            Ok((Fault::parse(kind)?, rate))
        })
        .collect()
}

//! The LLM step: render the prompt, pick the first provider of the fallback chain whose
//! breaker lets a request through, wait for admission, send one request, check the answer
//! (with repair requests for invalid structured output), and pass the result on.
//!
//! Retries belong to the processor's worker: this step sends at most one request per provider
//! per run and answers with a classified [`StepError`]. Rate limits and open breakers answer
//! [`Action::Defer`](crate::step::Action::Defer): the event waits without using up
//! attempts, and is never dead-lettered for it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::select_all;
use serde_json::{json, Value as Json};
use tracing::Instrument;

use crate::llm::budget::{Budgets, Charge, Scope};

use super::breaker::Breaker;
use super::client::{CallError, ChatRequest, Completion, ErrorClass, Message, Provider, Role};
use super::limit::Admission;
use super::prompt::{OutputCheck, Prompt};
use crate::config::ConfigError;
use crate::llm::config::LlmConfig;
use crate::llm::config::LlmStepConfig;
use crate::llm::config::PriceConfig;
use crate::processor::gate::Gate;
use crate::step::{Attempt, BoxFuture, EventContext, Spend, Step, StepError, StepOutput};
use crate::telemetry::Metrics;

/// One provider account: its client, admission control and breaker, shared by every step.
pub struct Account {
    /// HTTP client of the account.
    pub provider: Provider,
    /// Rate limits.
    pub admission: Admission,
    /// Health.
    pub breaker: Arc<Breaker>,
}

/// The accounts of `llm.providers`, built once per processor.
pub struct Accounts {
    accounts: BTreeMap<String, Arc<Account>>,
    /// The spend budgets every LLM step reserves against, if configured.
    budgets: Option<Arc<Budgets>>,
}

impl Accounts {
    /// Builds every configured provider account.
    pub fn new(
        config: &LlmConfig,
        gate: &Gate,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let mut accounts = BTreeMap::new();
        for (name, p) in &config.providers {
            accounts.insert(
                name.clone(),
                Arc::new(Account {
                    provider: Provider::new(name, p)?,
                    admission: Admission::new(p),
                    breaker: Breaker::new(
                        name,
                        config.breaker.clone(),
                        gate.clone(),
                        metrics.clone(),
                    ),
                }),
            );
        }
        let budgets = (config.budget.as_ref()).map(|b| Budgets::new(b, metrics));
        Ok(Accounts { accounts, budgets })
    }

    /// The same accounts, reserving against `budgets` (connected to their topic) instead.
    pub fn with_budgets(mut self, budgets: Option<Arc<Budgets>>) -> Self {
        self.budgets = budgets;
        self
    }

    fn get(&self, name: &str, key: String) -> Result<Arc<Account>, ConfigError> {
        self.accounts
            .get(name)
            .cloned()
            .ok_or_else(|| ConfigError::Invalid {
                key,
                message: format!("`{name}` is not defined in llm.providers"),
            })
    }
}

struct Target {
    account: Arc<Account>,
    model: String,
    price: Option<PriceConfig>,
}

/// A configured LLM step.
pub struct LlmStep {
    name: String,
    chain: Vec<Target>,
    prompt: Prompt,
    output: OutputCheck,
    repair_attempts: u32,
    max_tokens: u32,
    temperature: Option<f64>,
    metrics: Arc<Metrics>,
    budgets: Option<Arc<Budgets>>,
}

/// Rough prompt size: one token per four characters plus a few per message. Admission
/// reserves this and settles with the provider's count afterwards.
fn estimate_tokens(system: Option<&str>, messages: &[Message]) -> u64 {
    let chars: usize = system.map_or(0, |s| s.chars().count())
        + messages
            .iter()
            .map(|m| m.content.chars().count())
            .sum::<usize>();
    (chars as u64).div_ceil(4) + 4 * (messages.len() as u64 + 1)
}

impl LlmStep {
    /// Builds the step and registers its chain with the gate: while every provider of the
    /// chain is open, intake pauses.
    pub fn new(
        config: &LlmStepConfig,
        llm: &LlmConfig,
        accounts: &Accounts,
        gate: &Gate,
        metrics: &Arc<Metrics>,
    ) -> Result<LlmStep, ConfigError> {
        let key = |k: &str| format!("steps.{}.{k}", config.name);
        let mut chain = vec![Target {
            account: accounts.get(&config.provider, key("provider"))?,
            model: config.model.clone(),
            price: llm.prices.get(&config.model).cloned(),
        }];
        for (i, f) in config.fallback.iter().enumerate() {
            chain.push(Target {
                account: accounts.get(&f.provider, key(&format!("fallback[{i}].provider")))?,
                model: f.model.clone(),
                price: llm.prices.get(&f.model).cloned(),
            });
        }
        // A USD budget needs a price for every model it may pay for.
        let budgets = accounts.budgets.clone();
        if let Some(b) = &budgets {
            if b.limits().iter().any(|l| l.may_cover_step(&config.name)) {
                for (i, t) in chain.iter().enumerate() {
                    if t.price.is_none() {
                        return Err(ConfigError::invalid(
                            if i == 0 {
                                key("model")
                            } else {
                                key(&format!("fallback[{}].model", i - 1))
                            },
                            format!(
                                "a USD budget covers this step, but llm.prices has no price \
                                 for {}",
                                t.model
                            ),
                        ));
                    }
                }
            }
        }
        let breakers: Vec<Arc<Breaker>> = chain.iter().map(|t| t.account.breaker.clone()).collect();
        gate.add_check(move || breakers.iter().any(|b| !b.is_open()));
        Ok(LlmStep {
            name: config.name.clone(),
            chain,
            prompt: Prompt::new(&config.name, config.system.as_deref(), &config.user)?,
            output: OutputCheck::new(&config.name, &config.output)?,
            repair_attempts: config.output.repair_attempts,
            max_tokens: config.max_tokens,
            temperature: config.temperature,
            metrics: metrics.clone(),
            budgets,
        })
    }

    async fn run_once(
        &self,
        ctx: &EventContext,
        attempt: Attempt,
        spend: &mut Spend,
    ) -> Result<Json, StepError> {
        let (system, user) = self
            .prompt
            .render(ctx)
            .map_err(|e| StepError::deterministic("llm_template_error", e))?;
        let mut messages = vec![Message {
            role: Role::User,
            content: user,
        }];
        let mut repairs = 0;
        loop {
            let (completion, target) = self
                .call(system.as_deref(), &messages, ctx, attempt, spend)
                .await?;
            match self.output.check(&completion.text) {
                Ok(value) => {
                    let mut out = json!({
                        "text": completion.text,
                        "model": target.model,
                        "provider": target.account.provider.name(),
                        "usage": {
                            "input_tokens": completion.input_tokens,
                            "output_tokens": completion.output_tokens,
                        },
                        "repairs": repairs,
                    });
                    if let Some(value) = value {
                        out["json"] = value;
                    }
                    return Ok(out);
                }
                Err(invalid) if repairs < self.repair_attempts => {
                    repairs += 1;
                    self.metrics
                        .llm
                        .repairs
                        .with_label_values(&[&target.model])
                        .inc();
                    tracing::info!(
                        step = %self.name,
                        repair = repairs,
                        problem = %invalid.for_humans,
                        "invalid output; asking for a repair"
                    );
                    messages.push(Message {
                        role: Role::Assistant,
                        content: completion.text,
                    });
                    messages.push(Message {
                        role: Role::User,
                        content: format!(
                            "Your answer was not accepted: {}. Answer again with only the \
                             corrected JSON, nothing else.",
                            invalid.for_model
                        ),
                    });
                }
                Err(invalid) => {
                    return Err(StepError::deterministic(
                        "llm_invalid_output",
                        format!("{} after {repairs} repair requests", invalid.for_humans),
                    ))
                }
            }
        }
    }

    /// One request to the first provider of the chain that takes it.
    async fn call(
        &self,
        system: Option<&str>,
        messages: &[Message],
        ctx: &EventContext,
        attempt: Attempt,
        spend: &mut Spend,
    ) -> Result<(Completion, &Target), StepError> {
        let estimate = estimate_tokens(system, messages);
        let worst = self.worst_case(estimate);
        // The worst case, at the dearest price of the chain, is reserved before any provider
        // is tried; the answer settles it.
        let budget = match &self.budgets {
            Some(b) => {
                let scope = Scope {
                    pipeline: &ctx.pipeline,
                    source: &ctx.event.source,
                    step: &self.name,
                };
                b.reserve(scope, worst).await?
            }
            None => None,
        };
        // What failed attempts may have been billed for: a request that timed out or whose
        // answer broke off may still be charged, so it counts at the worst case reserved.
        let mut maybe_billed = Charge::default();
        let share = &ctx.share;
        let mut last: Option<StepError> = None;
        let m = &self.metrics.llm;
        for (i, target) in self.chain.iter().enumerate() {
            let account = &target.account;
            // A provider under a Retry-After hold is skipped while a later one can take the
            // request now; otherwise its admission waits out the hold.
            let later_ready = || {
                self.chain[i + 1..].iter().any(|t| {
                    t.account.breaker.available() && t.account.admission.held_until().is_none()
                })
            };
            if account.admission.held_until().is_some() && later_ready() {
                continue;
            }
            let Some(permit) = account.breaker.try_acquire() else {
                continue;
            };
            if i > 0 {
                m.fallbacks.with_label_values(&[&target.model]).inc();
                tracing::info!(
                    step = %self.name,
                    provider = account.provider.name(),
                    model = %target.model,
                    "primary unavailable; using fallback"
                );
            }
            let waited = Instant::now();
            let reservation = account
                .admission
                .acquire(share, estimate, u64::from(self.max_tokens))
                .await;
            m.admission_wait
                .with_label_values(&[&target.model])
                .observe(waited.elapsed().as_secs_f64());
            let request = ChatRequest {
                model: &target.model,
                system,
                messages,
                max_tokens: self.max_tokens,
                temperature: self.temperature,
                json: self.output.wants_json(),
            };
            let started = Instant::now();
            let span =
                tracing::info_span!("llm_call", model = %target.model, attempt = attempt.number);
            let (result, headers) = account.provider.complete(&request).instrument(span).await;
            reservation.observe(&headers);
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => e.code(),
            };
            m.request_duration
                .with_label_values(&[&target.model, outcome])
                .observe(started.elapsed().as_secs_f64());
            let err = match result {
                Ok(c) => {
                    reservation.settle(c.input_tokens, c.output_tokens);
                    permit.success();
                    let cost = self.account_spend(target, &c, spend);
                    if let Some(b) = budget {
                        let actual = Charge {
                            usd: cost,
                            tokens: c.input_tokens + c.output_tokens,
                        };
                        b.settle(actual.plus(maybe_billed));
                    }
                    return Ok((c, target));
                }
                Err(e) => e,
            };
            drop(reservation);
            let message = format!("{}: {err}", account.provider.name());
            match err.class() {
                ErrorClass::RateLimited => {
                    m.rate_limited.with_label_values(&[&target.model]).inc();
                    let after = headers.retry_after.unwrap_or(Duration::from_secs(1));
                    account.admission.hold(after);
                    drop(permit);
                    last = Some(StepError::defer(err.code(), message, Some(after)));
                }
                ErrorClass::Transient => {
                    // A request that timed out or whose answer broke off may have run and been
                    // billed; a refused connection or a 5xx was not. At most the one worst case
                    // reserved is charged for the call's failed attempts.
                    if matches!(err, CallError::Timeout | CallError::Malformed(_)) {
                        maybe_billed = worst;
                    }
                    if let Some(after) = headers.retry_after {
                        account.admission.hold(after);
                    }
                    permit.failure();
                    last = Some(match headers.retry_after {
                        Some(after) => StepError::retry_after(err.code(), message, after),
                        None => StepError::transient(err.code(), message),
                    });
                }
                ErrorClass::Fatal => {
                    permit.trip();
                    let reason = match err {
                        CallError::Quota(_) => "insufficient_quota",
                        CallError::Redirect(_) => "redirect",
                        _ => "auth",
                    };
                    m.alerts
                        .with_label_values(&[account.provider.name(), reason])
                        .inc();
                    tracing::error!(
                        provider = account.provider.name(),
                        reason,
                        "ALERT: provider account unusable until a human acts; breaker opened"
                    );
                    last = Some(StepError::defer(err.code(), message, None));
                }
                ErrorClass::Deterministic => {
                    permit.success();
                    if let Some(b) = budget {
                        b.settle_failed(maybe_billed);
                    }
                    return Err(StepError::deterministic(err.code(), message));
                }
            }
        }
        if let Some(b) = budget {
            b.settle_failed(maybe_billed);
        }
        let chain_down = !self.chain.iter().any(|t| t.account.breaker.available());
        Err(match last {
            None => StepError::defer(
                "llm_breaker_open",
                "every provider of the chain is unavailable (breaker open)",
                None,
            ),
            // The failure that opened the last breaker is not the event's fault: wait for a
            // provider instead of using up attempts.
            Some(e) if chain_down => StepError::defer(e.code, e.message, None),
            Some(e) => e,
        })
    }

    /// What a call of `estimate` prompt tokens may cost at most: `max_tokens` of output at the
    /// dearest model of the chain.
    fn worst_case(&self, estimate: u64) -> Charge {
        let output = u64::from(self.max_tokens);
        let usd = (self.chain.iter())
            .filter_map(|t| t.price.as_ref())
            .map(|p| {
                (estimate as f64 * p.input_usd_per_mtok + output as f64 * p.output_usd_per_mtok)
                    / 1e6
            })
            .fold(0.0, f64::max);
        Charge {
            usd,
            tokens: estimate + output,
        }
    }

    /// Counts an answered call's tokens and cost; returns the cost in USD.
    fn account_spend(&self, target: &Target, c: &Completion, spend: &mut Spend) -> f64 {
        let m = &self.metrics.llm;
        m.tokens
            .with_label_values(&[&target.model, "input"])
            .inc_by(c.input_tokens);
        m.tokens
            .with_label_values(&[&target.model, "output"])
            .inc_by(c.output_tokens);
        let cost = target.price.as_ref().map_or(0.0, |p| {
            (c.input_tokens as f64 * p.input_usd_per_mtok
                + c.output_tokens as f64 * p.output_usd_per_mtok)
                / 1e6
        });
        m.cost_usd.with_label_values(&[&target.model]).inc_by(cost);
        *spend += Spend {
            calls: 1,
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
            cost_usd: cost,
        };
        cost
    }
}

impl Step for LlmStep {
    fn name(&self) -> &str {
        &self.name
    }

    fn run<'a>(
        &'a self,
        ctx: &'a EventContext,
        attempt: Attempt,
    ) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let mut spend = Spend::default();
            match self.run_once(ctx, attempt, &mut spend).await {
                Ok(value) => Ok(StepOutput::value(value).with_spend(spend)),
                Err(e) => Err(e.with_spend(spend)),
            }
        })
    }

    /// Ready when some provider of the chain would let a request through.
    fn ready(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut changes: Vec<_> = self
                .chain
                .iter()
                .map(|t| t.account.breaker.subscribe())
                .collect();
            while !self.chain.iter().any(|t| t.account.breaker.available()) {
                let waits = changes.iter_mut().map(|rx| Box::pin(rx.changed()));
                let _ = select_all(waits).await;
            }
        })
    }
}

//! Spend budgets (`[llm.budget]`): caps on what LLM calls may cost per UTC day or month, in USD
//! (from `[llm.prices]`) or tokens, for a pipeline, a source (`ce_source`) or a step.
//!
//! * **Before the call.** An LLM step reserves its worst case (the prompt estimate plus
//!   `max_tokens`, at the dearest price of its chain) against every budget that covers the
//!   event. A reservation that does not fit answers [`Action::Wait`](crate::step::Action::Wait):
//!   the event waits, never dropped, without holding an in-flight slot, and tries again every
//!   `recheck_ms` and at the period's roll-over. The answer's usage settles the reservation
//!   (the difference comes back); a call that got no answer gives it all back.
//! * **Shared and durable.** Each instance writes its own running total per budget and period
//!   to a compacted topic (`llm.budget.topic`, key `<budget>|<period>|<instance>`), and a
//!   reservation is durable there before its call is sent. Every instance follows the topic
//!   and sums the other instances' latest totals with its own, so replicas share a budget and
//!   a restarted instance starts from what was spent, including reservations in flight at a
//!   crash (counted at their worst case). Overshoot is bounded by the reservations other
//!   instances made that this one had not read yet: at most their in-flight calls' worst case.
//! * **Bounded.** Totals of past periods are forgotten as periods roll over; the topic deletes
//!   records after 62 days (`cleanup.policy=compact,delete`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::codec::civil_from_days;
use crate::config::ConfigError;
use crate::kafka::KafkaConfig;
use crate::step::StepError;
use crate::telemetry::Metrics;

/// `[llm.budget]`: the spend topic and the budgets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Compacted topic of each instance's spend per budget and period, which every instance
    /// sums. Created (one partition, `compact,delete`, 62 days) where missing.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// How often an event waiting on a spent budget checks again (a raise after a restart,
    /// refunds of settled calls), in milliseconds; the period's roll-over wakes it too.
    #[serde(default = "default_recheck_ms")]
    pub recheck_ms: u64,
    /// How long a call waits for its reservation to be durable on the topic before it is
    /// deferred (`budget_unavailable`), in milliseconds.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// The budgets. A call must fit in every one that covers it.
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
}

/// One budget (`[[llm.budget.limits]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Its name: the `budget` label of its metrics and part of its records' keys.
    pub name: String,
    /// `day` or `month`, in UTC.
    pub period: Period,
    /// The cap in USD, from `[llm.prices]`. Exactly one of `usd` and `tokens`.
    pub usd: Option<f64>,
    /// The cap in tokens (input plus output).
    pub tokens: Option<u64>,
    /// Only events of this pipeline (`default` for top-level `[[steps]]`); all when absent.
    pub pipeline: Option<String>,
    /// Only events of this source (the `ce_source`, e.g. `/webhooks/campaign`).
    pub source: Option<String>,
    /// Only calls of this step.
    pub step: Option<String>,
}

/// A budget's period, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// From 00:00 UTC to the next.
    Day,
    /// From the first of the month, 00:00 UTC, to the next first.
    Month,
}

fn default_topic() -> String {
    "spillway.budget".into()
}

fn default_recheck_ms() -> u64 {
    5_000
}

fn default_write_timeout_ms() -> u64 {
    5_000
}

/// How long the spend topic keeps records: this month's and last month's, whole.
pub const RETENTION_MS: u64 = 62 * 86_400_000;

impl BudgetConfig {
    /// Names, caps and timings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.topic.trim().is_empty() {
            return Err(ConfigError::invalid(
                "llm.budget.topic",
                "must not be empty",
            ));
        }
        crate::config::duration_ms("llm.budget.recheck_ms", self.recheck_ms, 10)?;
        crate::config::duration_ms("llm.budget.write_timeout_ms", self.write_timeout_ms, 10)?;
        let mut seen = std::collections::HashSet::new();
        for l in &self.limits {
            let key = |k: &str| format!("llm.budget.limits.{}.{k}", l.name);
            let valid = !l.name.is_empty()
                && l.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                return Err(ConfigError::invalid(
                    "llm.budget.limits.name",
                    format!("{:?}: use letters, digits, '-' and '_'", l.name),
                ));
            }
            if !seen.insert(&l.name) {
                return Err(ConfigError::invalid(key("name"), "is used by two budgets"));
            }
            match (l.usd, l.tokens) {
                (Some(usd), None) if usd.is_finite() && usd > 0.0 => {}
                (None, Some(tokens)) if tokens > 0 => {}
                (Some(_), None) => return Err(ConfigError::invalid(key("usd"), "must be above 0")),
                (None, Some(_)) => {
                    return Err(ConfigError::invalid(key("tokens"), "must be above 0"))
                }
                _ => {
                    return Err(ConfigError::invalid(
                        key("usd"),
                        "set exactly one of usd and tokens",
                    ))
                }
            }
        }
        Ok(())
    }
}

/// What one call costs (or may cost at worst).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    /// USD, from `[llm.prices]`.
    pub usd: f64,
    /// Input plus output tokens.
    pub tokens: u64,
}

impl Charge {
    /// The sum of both.
    pub fn plus(mut self, other: Charge) -> Charge {
        self.add(other);
        self
    }

    fn add(&mut self, other: Charge) {
        self.usd += other.usd;
        self.tokens += other.tokens;
    }

    fn sub(&mut self, other: Charge) {
        self.usd = (self.usd - other.usd).max(0.0);
        self.tokens = self.tokens.saturating_sub(other.tokens);
    }
}

/// Which event and step a call is for, to find the budgets that cover it.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The pipeline's name (`default` for top-level `[[steps]]`).
    pub pipeline: &'a str,
    /// The event's `ce_source`.
    pub source: &'a str,
    /// The step's name.
    pub step: &'a str,
}

impl LimitConfig {
    fn covers(&self, s: Scope<'_>) -> bool {
        self.pipeline.as_deref().is_none_or(|p| p == s.pipeline)
            && self.source.as_deref().is_none_or(|p| p == s.source)
            && self.step.as_deref().is_none_or(|p| p == s.step)
    }

    fn cap(&self) -> f64 {
        self.usd.unwrap_or(self.tokens.unwrap_or(0) as f64)
    }

    fn amount(&self, c: Charge) -> f64 {
        if self.usd.is_some() {
            c.usd
        } else {
            c.tokens as f64
        }
    }

    /// Whether a USD budget may cover `step`.
    pub fn may_cover_step(&self, step: &str) -> bool {
        self.usd.is_some() && self.step.as_deref().is_none_or(|s| s == step)
    }
}

/// The period `now_ms` falls in (`2026-12-07` or `2026-12`) and when the next one starts.
pub fn period_of(period: Period, now_ms: i64) -> (String, i64) {
    const DAY_MS: i64 = 86_400_000;
    let days = now_ms.div_euclid(DAY_MS);
    let (y, m, d) = civil_from_days(days);
    match period {
        Period::Day => (format!("{y:04}-{m:02}-{d:02}"), (days + 1) * DAY_MS),
        Period::Month => {
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (
                format!("{y:04}-{m:02}"),
                days_from_civil(ny, nm, 1) * DAY_MS,
            )
        }
    }
}

/// Day number of a proleptic Gregorian date, after Howard Hinnant's `days_from_civil`.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The clock budgets run on: the wall clock, shifted in tests (`fault::clock_offset_ms`).
fn now_ms() -> i64 {
    crate::telemetry::now_ms() as i64 + crate::fault::clock_offset_ms()
}

/// One record of the spend topic: an instance's total for a budget and period.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    budget: String,
    period: String,
    instance: String,
    usd: f64,
    tokens: u64,
}

#[derive(Default)]
struct State {
    /// This instance's totals by (budget index, period), reservations included.
    own: HashMap<(usize, String), Charge>,
    /// Totals changed since they were last written.
    dirty: Vec<(usize, String)>,
    /// Other instances' latest totals, by record key.
    others: HashMap<String, Record>,
    /// Bumped by every change of `own`.
    version: u64,
    /// The period in which each budget (by index) last refused a reservation, until one fits
    /// again: the budget is exhausted while that period lasts.
    refused: HashMap<usize, String>,
}

/// The budgets of one process: its own spend, the others' as read from the topic, and the
/// writer and follower that keep them in step.
pub struct Budgets {
    config: BudgetConfig,
    instance: String,
    state: Mutex<State>,
    changed: Arc<Notify>,
    /// The highest `version` durable on the topic.
    flushed: watch::Sender<u64>,
    connected: AtomicBool,
    metrics: Arc<Metrics>,
}

/// A reservation against the budgets covering one call. Settle it with the answer's cost;
/// dropped unsettled (no answer), it is given back.
pub struct Reserved {
    budgets: Arc<Budgets>,
    entries: Vec<(usize, String)>,
    worst: Charge,
    settled: bool,
}

impl Reserved {
    /// Settles a call that got no answer: what it may have been billed (`maybe_billed`, a
    /// timed-out or failed request the provider may have run) is charged, the rest comes back.
    pub fn settle_failed(self, maybe_billed: Charge) {
        if maybe_billed != Charge::default() {
            self.settle(maybe_billed);
        }
    }

    /// The call cost `actual`: the rest of the reservation comes back.
    pub fn settle(mut self, actual: Charge) {
        self.settled = true;
        self.budgets.adjust(&self.entries, self.worst, actual);
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if !self.settled {
            self.budgets
                .adjust(&self.entries, self.worst, Charge::default());
        }
    }
}

impl Budgets {
    /// Budgets from config; [`Budgets::connect`] joins them to the topic before any call.
    pub fn new(config: &BudgetConfig, metrics: &Arc<Metrics>) -> Arc<Budgets> {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "spillway".into());
        let instance = format!("{host}-{}-{}", std::process::id(), now_ms());
        for l in &config.limits {
            metrics
                .budget_limit
                .with_label_values(&[&l.name])
                .set(l.cap());
        }
        Arc::new(Budgets {
            config: config.clone(),
            instance,
            state: Mutex::new(State::default()),
            changed: Arc::new(Notify::new()),
            flushed: watch::channel(0).0,
            connected: AtomicBool::new(false),
            metrics: metrics.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain totals; a panic elsewhere cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any budget covers `scope`.
    pub fn covers(&self, scope: Scope<'_>) -> bool {
        self.config.limits.iter().any(|l| l.covers(scope))
    }

    /// The configured budgets.
    pub fn limits(&self) -> &[LimitConfig] {
        &self.config.limits
    }

    /// Reserves `worst` against every budget covering `scope` and waits until the reservation
    /// is durable. A budget without room answers `Wait` until its next check.
    pub async fn reserve(
        self: &Arc<Self>,
        scope: Scope<'_>,
        worst: Charge,
    ) -> Result<Option<Reserved>, StepError> {
        if !self.connected.load(Ordering::Acquire) {
            // A processor started without `pipeline::start` (which connects the budgets):
            // no call may go unaccounted, so none goes at all.
            return Err(StepError::fatal(
                "budget_not_connected",
                "spend budgets are configured but not connected to their topic",
            ));
        }
        let now = now_ms();
        let version = {
            let mut s = self.lock();
            let mut entries = Vec::new();
            for (i, l) in self.config.limits.iter().enumerate() {
                if !l.covers(scope) {
                    continue;
                }
                if l.amount(worst) > l.cap() {
                    return Err(StepError::deterministic(
                        "budget_too_small",
                        format!(
                            "one call may cost {} and budget {} allows {} a period: it could \
                             never run",
                            l.amount(worst),
                            l.name,
                            l.cap()
                        ),
                    ));
                }
                let (period, next_ms) = period_of(l.period, now);
                let spent = self.spent(&s, i, &period);
                if spent + l.amount(worst) > l.cap() {
                    s.refused.insert(i, period.clone());
                    self.publish(&s);
                    let until = Duration::from_millis((next_ms - now).max(1) as u64);
                    let after = until.min(Duration::from_millis(self.config.recheck_ms));
                    return Err(StepError::wait(
                        "budget_exhausted",
                        format!(
                            "budget {} has {:.6} of {} left this {} ({period}); waiting",
                            l.name,
                            (l.cap() - spent).max(0.0),
                            l.cap(),
                            if l.period == Period::Day {
                                "day"
                            } else {
                                "month"
                            },
                        ),
                        after,
                    ));
                }
                entries.push((i, period));
            }
            if entries.is_empty() {
                return Ok(None);
            }
            for e in &entries {
                s.own.entry(e.clone()).or_default().add(worst);
                s.dirty.push(e.clone());
                s.refused.remove(&e.0);
            }
            s.version += 1;
            self.publish(&s);
            let reserved = Reserved {
                budgets: self.clone(),
                entries,
                worst,
                settled: false,
            };
            (s.version, reserved)
        };
        let (version, reserved) = version;
        self.changed.notify_one();
        let mut flushed = self.flushed.subscribe();
        let durable = tokio::time::timeout(
            Duration::from_millis(self.config.write_timeout_ms),
            flushed.wait_for(|v| *v >= version),
        )
        .await;
        match durable {
            Ok(Ok(_)) => Ok(Some(reserved)),
            _ => Err(StepError::defer(
                "budget_unavailable",
                format!(
                    "the spend topic {} did not take the reservation within {} ms",
                    self.config.topic, self.config.write_timeout_ms
                ),
                Some(Duration::from_millis(self.config.recheck_ms)),
            )),
        }
    }

    /// What every instance spent on budget `i` in `period`, this one's reservations included.
    fn spent(&self, s: &State, i: usize, period: &str) -> f64 {
        let l = &self.config.limits[i];
        let own = s
            .own
            .get(&(i, period.to_string()))
            .copied()
            .unwrap_or_default();
        let others: f64 = (s.others.values())
            .filter(|r| r.budget == l.name && r.period == period)
            .map(|r| {
                l.amount(Charge {
                    usd: r.usd,
                    tokens: r.tokens,
                })
            })
            .sum();
        l.amount(own) + others
    }

    fn adjust(&self, entries: &[(usize, String)], reserved: Charge, actual: Charge) {
        {
            let mut s = self.lock();
            for e in entries {
                let c = s.own.entry(e.clone()).or_default();
                c.sub(reserved);
                c.add(actual);
                s.dirty.push(e.clone());
            }
            s.version += 1;
            self.publish(&s);
        }
        self.changed.notify_one();
    }

    /// Updates the gauges of the current periods, and forgets totals of past ones.
    fn publish(&self, s: &State) {
        let now = now_ms();
        for (i, l) in self.config.limits.iter().enumerate() {
            let (period, _) = period_of(l.period, now);
            let spent = self.spent(s, i, &period);
            self.metrics
                .budget_spent
                .with_label_values(&[&l.name])
                .set(spent);
            let exhausted = s.refused.get(&i) == Some(&period);
            self.metrics
                .budget_exhausted
                .with_label_values(&[&l.name])
                .set(if exhausted { 1.0 } else { 0.0 });
        }
    }

    /// Drops totals of periods that are over: the others' at once, this instance's once they
    /// are written (a settlement may still land in the period it reserved in).
    fn forget_past(&self, s: &mut State) {
        let now = now_ms();
        let current: Vec<String> = (self.config.limits.iter())
            .map(|l| period_of(l.period, now).0)
            .collect();
        let names: HashMap<&str, usize> = (self.config.limits.iter().enumerate())
            .map(|(i, l)| (l.name.as_str(), i))
            .collect();
        s.others.retain(|_, r| {
            names
                .get(r.budget.as_str())
                .is_some_and(|i| current[*i] == r.period)
        });
        let dirty = s.dirty.clone();
        s.own
            .retain(|(i, p), _| current[*i] == *p || dirty.iter().any(|(j, q)| j == i && q == p));
    }

    /// Totals held in memory: this instance's and the others' (for tests of the bound).
    pub fn held(&self) -> usize {
        let s = self.lock();
        s.own.len() + s.others.len()
    }

    /// Creates the topic where missing, reads every instance's totals from it, then starts
    /// the writer (this instance's totals) and the follower (everyone else's).
    pub async fn connect(
        self: &Arc<Self>,
        kafka: &KafkaConfig,
    ) -> Result<(), rdkafka::error::KafkaError> {
        // A processor without the right to create topics finds the topic made by an operator.
        if let Err(e) = crate::kafka::ensure_budget_topic(kafka, &self.config.topic).await {
            tracing::warn!(topic = %self.config.topic, error = %e, "could not create the spend topic; expecting it to exist");
        }
        let producer: FutureProducer = crate::kafka::producer_config(kafka)
            .map_err(|e| rdkafka::error::KafkaError::ClientCreation(e.to_string()))?
            .create()?;
        let mut cc = crate::kafka::base_config(kafka)
            .map_err(|e| rdkafka::error::KafkaError::ClientCreation(e.to_string()))?;
        cc.set("group.id", format!("spillway-budget-{}", self.instance))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "50");
        let consumer: BaseConsumer = cc.create()?;
        let md = consumer.fetch_metadata(Some(&self.config.topic), Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        let mut ends = Vec::new();
        for t in md.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(&self.config.topic, p.id(), Offset::Beginning)?;
                let (low, high) = consumer.fetch_watermarks(
                    &self.config.topic,
                    p.id(),
                    Duration::from_secs(10),
                )?;
                // A partition that retention emptied (low = high) has nothing to read.
                if low < high {
                    ends.push((p.id(), high));
                }
            }
        }
        if tpl.count() == 0 {
            return Err(rdkafka::error::KafkaError::ClientCreation(format!(
                "the spend topic {} does not exist; create it with one partition, \
                 cleanup.policy=compact,delete and retention.ms={RETENTION_MS}",
                self.config.topic
            )));
        }
        consumer.assign(&tpl)?;
        // Restore: every record up to the end as of now, before any reservation.
        let me = self.clone();
        let restored = tokio::task::spawn_blocking({
            let me = me.clone();
            move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                let mut next: HashMap<i32, i64> = HashMap::new();
                while ends
                    .iter()
                    .any(|(p, high)| next.get(p).copied().unwrap_or(0) < *high)
                {
                    if std::time::Instant::now() > deadline {
                        return Err(consumer);
                    }
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                        next.insert(m.partition(), m.offset() + 1);
                        me.take_in(&m);
                    }
                }
                Ok(consumer)
            }
        })
        .await
        .map_err(|e| rdkafka::error::KafkaError::ClientCreation(e.to_string()))?;
        let consumer = restored.map_err(|_| {
            rdkafka::error::KafkaError::ClientCreation(format!(
                "could not read the spend topic {} to its end within 60 s",
                self.config.topic
            ))
        })?;
        {
            let mut s = self.lock();
            self.forget_past(&mut s);
            self.publish(&s);
        }
        self.connected.store(true, Ordering::Release);
        // The follower (other instances' totals as they come) and the writer (this instance's
        // changed totals, then `flushed`) hold the budgets only while they work on them, so
        // they stop within a second once the steps that use them are gone.
        let weak = Arc::downgrade(&me);
        let changed = me.changed.clone();
        drop(me);
        std::thread::Builder::new()
            .name("spillway-budget".into())
            .spawn({
                let weak = weak.clone();
                move || loop {
                    let polled = consumer.poll(Duration::from_millis(100));
                    let Some(me) = weak.upgrade() else {
                        break;
                    };
                    match polled {
                        Some(Ok(m)) => me.take_in(&m),
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "reading the spend topic");
                            me.metrics
                                .kafka_errors
                                .with_label_values(&["budget_read"])
                                .inc();
                            drop(me);
                            std::thread::sleep(Duration::from_millis(500));
                        }
                        None => {}
                    }
                }
            })
            .map_err(|e| rdkafka::error::KafkaError::ClientCreation(e.to_string()))?;
        tokio::spawn(async move {
            loop {
                let _ = tokio::time::timeout(Duration::from_secs(1), changed.notified()).await;
                let Some(me) = weak.upgrade() else {
                    break;
                };
                me.write(&producer).await;
            }
        });
        Ok(())
    }

    /// Writes every changed total until one write covers the latest version.
    async fn write(&self, producer: &FutureProducer) {
        loop {
            let (version, records) = {
                let mut s = self.lock();
                let mut dirty = std::mem::take(&mut s.dirty);
                dirty.sort();
                dirty.dedup();
                let records: Vec<(String, Record)> = dirty
                    .iter()
                    .map(|(i, period)| {
                        let c = s
                            .own
                            .get(&(*i, period.clone()))
                            .copied()
                            .unwrap_or_default();
                        let budget = self.config.limits[*i].name.clone();
                        let key = format!("{budget}|{period}|{}", self.instance);
                        (
                            key,
                            Record {
                                budget,
                                period: period.clone(),
                                instance: self.instance.clone(),
                                usd: c.usd,
                                tokens: c.tokens,
                            },
                        )
                    })
                    .collect();
                (s.version, records)
            };
            if records.is_empty() {
                self.flushed.send_if_modified(|v| {
                    let newer = *v < version;
                    *v = (*v).max(version);
                    newer
                });
                return;
            }
            let sends = records.iter().map(|(key, r)| {
                let value = serde_json::to_vec(r).unwrap_or_default();
                async move {
                    producer
                        .send(
                            FutureRecord::to(&self.config.topic)
                                .key(key)
                                .payload(&value),
                            Duration::from_secs(5),
                        )
                        .await
                }
            });
            let results = futures_util::future::join_all(sends).await;
            if results.iter().any(|r| r.is_err()) {
                // Written again on the next try; reservations wait meanwhile.
                tracing::warn!(topic = %self.config.topic, "writing budget spend failed; retrying");
                self.metrics
                    .kafka_errors
                    .with_label_values(&["budget_write"])
                    .inc();
                {
                    let mut s = self.lock();
                    for (_, r) in &records {
                        if let Some(i) =
                            (self.config.limits.iter()).position(|l| l.name == r.budget)
                        {
                            s.dirty.push((i, r.period.clone()));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            self.flushed.send_if_modified(|v| {
                let newer = *v < version;
                *v = (*v).max(version);
                newer
            });
            let mut s = self.lock();
            self.forget_past(&mut s);
            if s.dirty.is_empty() {
                return;
            }
            drop(s);
        }
    }

    /// Takes in one record of the topic: another instance's total (this instance's own
    /// records come back too, and are ignored).
    fn take_in(&self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(Ok(key)) = m.key_view::<str>() else {
            return;
        };
        let mut s = self.lock();
        match m.payload().map(serde_json::from_slice::<Record>) {
            Some(Ok(r)) if r.instance != self.instance => {
                s.others.insert(key.to_string(), r);
            }
            Some(Ok(_)) => return,
            None => {
                s.others.remove(key);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "ignoring an unreadable spend record");
                return;
            }
        }
        self.forget_past(&mut s);
        self.publish(&s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reservation_not_durable_within_the_write_timeout_defers_and_is_given_back() {
        let config = BudgetConfig {
            topic: default_topic(),
            recheck_ms: 200,
            write_timeout_ms: 5_000,
            limits: vec![LimitConfig {
                name: "t".into(),
                period: Period::Day,
                usd: None,
                tokens: Some(1_000),
                pipeline: None,
                source: None,
                step: None,
            }],
        };
        let b = Budgets::new(&config, &Metrics::new());
        // Connected, but no writer runs: nothing ever becomes durable.
        b.connected.store(true, Ordering::Release);
        let scope = Scope {
            pipeline: "default",
            source: "/webhooks/blog",
            step: "classify",
        };
        let worst = Charge {
            usd: 0.0,
            tokens: 400,
        };
        let started = tokio::time::Instant::now();
        let err = match b.reserve(scope, worst).await {
            Err(e) => e,
            Ok(_) => panic!("a reservation nobody wrote was taken as durable"),
        };
        assert_eq!(err.code, "budget_unavailable");
        assert!(matches!(err.action, crate::step::Action::Defer { .. }));
        assert!(started.elapsed() >= Duration::from_millis(5_000));
        let (period, _) = period_of(Period::Day, now_ms());
        assert_eq!(
            b.spent(&b.lock(), 0, &period),
            0.0,
            "the reservation was given back"
        );
    }

    #[test]
    fn totals_of_past_periods_are_forgotten() {
        let limit = |name: &str, period, usd, tokens| LimitConfig {
            name: name.into(),
            period,
            usd,
            tokens,
            pipeline: None,
            source: None,
            step: None,
        };
        let config = BudgetConfig {
            topic: default_topic(),
            recheck_ms: default_recheck_ms(),
            write_timeout_ms: default_write_timeout_ms(),
            limits: vec![
                limit("d", Period::Day, None, Some(10)),
                limit("m", Period::Month, Some(1.0), None),
            ],
        };
        config.validate().unwrap();
        let b = Budgets::new(&config, &Metrics::new());
        let now = now_ms();
        let (today, _) = period_of(Period::Day, now);
        let (month, _) = period_of(Period::Month, now);
        let (yesterday, _) = period_of(Period::Day, now - 86_400_000);
        let record = |budget: &str, period: &str, instance: &str| Record {
            budget: budget.into(),
            period: period.into(),
            instance: instance.into(),
            usd: 0.5,
            tokens: 4,
        };
        {
            let mut s = b.lock();
            // A day's worth of restarts' records, then the current ones.
            for i in 0..1_000 {
                let r = record("d", &yesterday, &format!("old-{i}"));
                s.others.insert(format!("d|{yesterday}|old-{i}"), r);
            }
            s.others
                .insert(format!("d|{today}|a"), record("d", &today, "a"));
            s.others
                .insert(format!("m|{month}|a"), record("m", &month, "a"));
            s.others.insert("gone|x|a".into(), record("gone", "x", "a"));
            s.own.insert(
                (0, yesterday.clone()),
                Charge {
                    usd: 0.0,
                    tokens: 3,
                },
            );
            s.own.insert(
                (0, today.clone()),
                Charge {
                    usd: 0.0,
                    tokens: 3,
                },
            );
            b.forget_past(&mut s);
            assert_eq!(b.spent(&s, 0, &today), 7.0);
            assert_eq!(b.spent(&s, 1, &month), 0.5);
        }
        assert_eq!(b.held(), 3, "only the current periods' totals are kept");
    }

    #[test]
    fn periods_are_utc_days_and_months_with_their_roll_over() {
        // 2026-12-31T23:59:59.999Z and the next millisecond.
        let last = days_from_civil(2027, 1, 1) * 86_400_000 - 1;
        assert_eq!(
            period_of(Period::Day, last),
            ("2026-12-31".to_string(), last + 1)
        );
        assert_eq!(
            period_of(Period::Month, last),
            ("2026-12".to_string(), last + 1)
        );
        assert_eq!(period_of(Period::Day, last + 1).0, "2027-01-01");
        assert_eq!(period_of(Period::Month, last + 1).0, "2027-01");
        // A leap day, and the epoch.
        let leap = days_from_civil(2028, 2, 29) * 86_400_000 + 5;
        assert_eq!(period_of(Period::Day, leap).0, "2028-02-29");
        assert_eq!(
            period_of(Period::Month, leap).1,
            days_from_civil(2028, 3, 1) * 86_400_000
        );
        assert_eq!(period_of(Period::Day, 0).0, "1970-01-01");
        for day in [-1_000, 0, 10_957, 20_454, 100_000] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }
}

//! `load-test`: a spike against a running stack, and a verdict a user can act on.
//!
//! It drives a profile through the ingress: a steady source at `--steady-rate` events per
//! second for the whole run, and a spike of `--spike-events` from another source sent as fast
//! as the ingress takes them once `--spike-after-secs` have passed; a share of upstream
//! duplicates (the same delivery sent again, which the ingress must answer 2xx without a
//! second record) and of poison events (no `text`, which the pipeline's prompt cannot render,
//! so the processor dead-letters them). Then it reads the results back (`read_committed` from
//! the result topic, and the DLQ) until every accepted event is accounted for or
//! `--drain-secs` pass, and prints the verdict: sent, accepted, results, dead letters, lost,
//! duplicated, each source's end-to-end latency percentiles during the spike (from the send
//! to the result's `processed_at`), and the provider's 429s (`--simulator`). It exits 1 when
//! anything was lost or duplicated.
//!
//! It takes every endpoint from flags, so the same command runs against `docker compose up`
//! (see the README) and against local processes (`load-tests/spike-local.sh`). Everything it
//! sends is bounded (`--steady-rate` × `--duration-secs` plus `--spike-events`) and it stops
//! by itself.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use rdkafka::Message;
use spillway::ingress::auth::{Scheme, Secret};

#[derive(Parser, Clone)]
struct Args {
    /// The ingress's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8088")]
    ingress: String,
    /// Kafka bootstrap servers (to read the results and the DLQ).
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The result topic (the Kafka sink's).
    #[arg(long, default_value = "spillway.results")]
    results: String,
    /// The DLQ topic.
    #[arg(long, default_value = "spillway.dlq")]
    dlq: String,
    /// The provider simulator's base URL, for its 429 count (omit for a real provider).
    #[arg(long)]
    simulator: Option<String>,
    /// The steady source: its ingress source name and its `whsec_` secret.
    #[arg(long, default_value = "blog")]
    steady_source: String,
    #[arg(long, env = "STEADY_WEBHOOK_SECRET")]
    steady_secret: String,
    /// Steady events per second, for the whole run.
    #[arg(long, default_value_t = 2.0)]
    steady_rate: f64,
    /// The spike's source and secret.
    #[arg(long, default_value = "campaign")]
    spike_source: String,
    #[arg(long, env = "SPIKE_WEBHOOK_SECRET")]
    spike_secret: String,
    /// Events in the spike.
    #[arg(long, default_value_t = 10_000)]
    spike_events: u64,
    /// When the spike starts, in seconds after the steady source.
    #[arg(long, default_value_t = 10)]
    spike_after_secs: u64,
    /// Concurrent requests of the spike's sender.
    #[arg(long, default_value_t = 32)]
    spike_concurrency: usize,
    /// How long the steady source sends, in seconds.
    #[arg(long, default_value_t = 240)]
    duration_secs: u64,
    /// Share of events sent twice (the same delivery: the ingress must not produce it again).
    #[arg(long, default_value_t = 0.01)]
    duplicates: f64,
    /// Share of events without `text` (the processor dead-letters them).
    #[arg(long, default_value_t = 0.005)]
    poison: f64,
    /// How long to wait after the last send for every result, in seconds.
    #[arg(long, default_value_t = 600)]
    drain_secs: u64,
    /// The processor's /metrics (e.g. http://127.0.0.1:9464/metrics): its spend budgets are
    /// printed, and events waiting on a spent budget are told apart from lost ones.
    #[arg(long)]
    processor_metrics: Option<String>,
    /// The processor's consumer group: events waiting on a spent budget must still be
    /// uncommitted (its lag on `--input-topic`), or they count as lost.
    #[arg(long, default_value = "spillway-compose")]
    group: String,
    /// The topic the ingress writes the events to.
    #[arg(long, default_value = "spillway.events")]
    input_topic: String,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// One event the generator sent.
#[derive(Clone)]
struct Sent {
    source: &'static str,
    sent_ms: i64,
    poison: bool,
    in_spike: bool,
}

/// What the senders did, by load-test id (`lt-<run>-<source>-<n>`).
#[derive(Default)]
struct Ledger {
    sent: HashMap<String, Sent>,
    accepted: HashSet<String>,
    refused: HashMap<u16, u64>,
    resent: u64,
    resent_accepted: u64,
}

/// Sends event `n` of `source` (and, for the duplicate share, the same delivery again).
#[allow(clippy::too_many_arguments)]
async fn send_one(
    client: &reqwest::Client,
    args: &Args,
    run: &str,
    source: &'static str,
    secret: &Secret,
    n: u64,
    in_spike: bool,
    ledger: &Mutex<Ledger>,
) {
    let id = format!("lt-{run}-{source}-{n}");
    // Every event is decided by its number, so a rerun sends the same profile.
    // Each choice hashes the number with its own salt (splitmix64), so poison and duplicates
    // are independent.
    let pick = |share: f64, salt: u64| {
        let mut z =
            (n ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % 10_000) < (share * 10_000.0) as u64
    };
    let poison = pick(args.poison, 17);
    let body = if poison {
        serde_json::json!({ "lt": id, "post": "/load" })
    } else {
        serde_json::json!({ "lt": id, "post": "/load", "text": format!("{source} comment {n}") })
    }
    .to_string();
    let url = format!(
        "{}/webhooks/{}",
        args.ingress,
        if source == "steady" {
            &args.steady_source
        } else {
            &args.spike_source
        }
    );
    let sent = Sent {
        source,
        sent_ms: now_ms(),
        poison,
        in_spike,
    };
    ledger.lock().unwrap().sent.insert(id.clone(), sent);
    let status = spillway_load_tests::deliver_signed(client, &url, secret, &id, &body).await;
    {
        let mut l = ledger.lock().unwrap();
        if (200..300).contains(&status) {
            l.accepted.insert(id.clone());
        } else {
            *l.refused.entry(status).or_default() += 1;
        }
    }
    if pick(args.duplicates, 91) {
        let again = spillway_load_tests::deliver_signed(client, &url, secret, &id, &body).await;
        let mut l = ledger.lock().unwrap();
        l.resent += 1;
        if (200..300).contains(&again) {
            l.resent_accepted += 1;
        }
    }
}

/// What `read_lt_ids` read: (load-test id, `processed_at`) of each result, (id, None) of
/// each dead letter, and whether every partition was read to its end.
struct Read {
    ids: Vec<(String, Option<i64>)>,
    complete: bool,
}

/// Every record of `topic` up to its end (two minutes at most).
fn read_lt_ids(brokers: &str, topic: &str) -> Read {
    let mut ids = Vec::new();
    let complete =
        spillway_load_tests::read_committed_to_end(brokers, topic, Duration::from_secs(120), |m| {
            ids.extend(lt_id(m))
        });
    Read { ids, complete }
}

/// A record's load-test id and, for a result, its `processed_at`.
fn lt_id(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<(String, Option<i64>)> {
    // A result: {"data": {"lt": ..}, "processed_at": ..}, as JSON or as Avro
    // (`format = "avro"`, schemas/result.avsc). A dead letter: the original record (Avro from
    // the ingress), whose `ce_id` header is `<source>:<lt id>`.
    let v = (m.payload()).and_then(|p| {
        serde_json::from_slice::<serde_json::Value>(p)
            .ok()
            .or_else(|| avro_result(p))
    });
    if let Some(lt) = v.as_ref().and_then(|v| v["data"]["lt"].as_str()) {
        let at = v.as_ref().and_then(|v| v["processed_at"].as_i64());
        return Some((lt.to_string(), at));
    }
    let ce_id = m.headers().and_then(|h| {
        use rdkafka::message::Headers;
        (h.iter())
            .find(|h| h.key == "ce_id")
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    })?;
    let (_, lt) = ce_id.split_once(':')?;
    lt.starts_with("lt-").then(|| (lt.to_string(), None))
}

/// A Confluent-framed Avro result (schemas/result.avsc) as `{"data": .., "processed_at": ..}`.
fn avro_result(bytes: &[u8]) -> Option<serde_json::Value> {
    use apache_avro::types::Value;
    static SCHEMA: std::sync::OnceLock<apache_avro::Schema> = std::sync::OnceLock::new();
    let schema = SCHEMA.get_or_init(|| {
        apache_avro::Schema::parse_str(include_str!("../../schemas/result.avsc"))
            .expect("the result schema parses")
    });
    if bytes.len() < 5 || bytes[0] != 0 {
        return None;
    }
    let mut datum = &bytes[5..];
    let value = apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .and_then(|reader| reader.read_value(&mut datum))
        .ok()?;
    let Value::Record(fields) = value else {
        return None;
    };
    let (mut data, mut at) = (serde_json::Value::Null, None);
    for (name, field) in fields {
        match (name.as_str(), field) {
            ("data", Value::String(text)) => data = serde_json::from_str(&text).ok()?,
            ("processed_at", Value::TimestampMillis(ms) | Value::Long(ms)) => at = Some(ms),
            _ => {}
        }
    }
    Some(serde_json::json!({ "data": data, "processed_at": at }))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let run = format!("{:x}", now_ms());
    let steady = Arc::new(
        Secret::new(&Scheme::StandardWebhooks, &args.steady_secret).expect("steady secret"),
    );
    let spike =
        Arc::new(Secret::new(&Scheme::StandardWebhooks, &args.spike_secret).expect("spike secret"));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.spike_concurrency + 8)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let started = Instant::now();
    println!(
        "load-test {run}: steady {} at {}/s for {} s; spike of {} from {} after {} s; {:.1} % duplicates, {:.1} % poison",
        args.steady_source, args.steady_rate, args.duration_secs, args.spike_events, args.spike_source,
        args.spike_after_secs, args.duplicates * 100.0, args.poison * 100.0
    );

    // The steady source: one event every 1/rate seconds, each on its own task (open loop).
    let steady_task = {
        let (client, args, ledger, secret, run) = (
            client.clone(),
            args.clone(),
            ledger.clone(),
            steady.clone(),
            run.clone(),
        );
        tokio::spawn(async move {
            let every = Duration::from_secs_f64(1.0 / args.steady_rate.max(0.001));
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let total = (args.steady_rate * args.duration_secs as f64) as u64;
            let spike_window = Duration::from_secs(args.spike_after_secs);
            let mut sends = tokio::task::JoinSet::new();
            for n in 0..total {
                tick.tick().await;
                let in_spike = started.elapsed() >= spike_window;
                let (client, args, ledger, secret, run) = (
                    client.clone(),
                    args.clone(),
                    ledger.clone(),
                    secret.clone(),
                    run.clone(),
                );
                sends.spawn(async move {
                    send_one(
                        &client, &args, &run, "steady", &secret, n, in_spike, &ledger,
                    )
                    .await
                });
            }
            while sends.join_next().await.is_some() {}
        })
    };
    // The spike: as fast as the ingress takes it, `spike_concurrency` at a time.
    let spike_task = {
        let (client, args, ledger, secret, run) = (
            client.clone(),
            args.clone(),
            ledger.clone(),
            spike.clone(),
            run.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(args.spike_after_secs)).await;
            let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let workers: Vec<_> = (0..args.spike_concurrency.max(1))
                .map(|_| {
                    let (client, args, ledger, secret, run, next) = (
                        client.clone(),
                        args.clone(),
                        ledger.clone(),
                        secret.clone(),
                        run.clone(),
                        next.clone(),
                    );
                    tokio::spawn(async move {
                        loop {
                            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if n >= args.spike_events {
                                return;
                            }
                            send_one(&client, &args, &run, "spike", &secret, n, true, &ledger)
                                .await;
                        }
                    })
                })
                .collect();
            for w in workers {
                w.await.expect("spike sender");
            }
            Instant::now()
        })
    };
    let spike_sent_at = spike_task.await.expect("spike");
    steady_task.await.expect("steady");
    let sent_secs = started.elapsed().as_secs_f64();
    println!(
        "sent in {sent_secs:.0} s (the spike's last event at {:.0} s); reading results",
        (spike_sent_at - started).as_secs_f64()
    );

    // Read back until every accepted event is a result or a dead letter, or the drain ends.
    let (expected_results, expected_dead): (HashSet<String>, HashSet<String>) = {
        let l = ledger.lock().unwrap();
        let ours = |poison: bool| -> HashSet<String> {
            l.accepted
                .iter()
                .filter(|id| l.sent[*id].poison == poison)
                .cloned()
                .collect()
        };
        (ours(false), ours(true))
    };
    let drain_until = Instant::now() + Duration::from_secs(args.drain_secs);
    let (mut results, mut dead, mut complete);
    // With a spent budget, the events behind it wait for the period's roll-over: the drain
    // stops once nothing has moved for 30 s while a budget is exhausted.
    let mut stalled = (usize::MAX, Instant::now());
    loop {
        let (brokers, r, d) = (args.brokers.clone(), args.results.clone(), args.dlq.clone());
        let (r, d) = tokio::task::spawn_blocking(move || {
            (read_lt_ids(&brokers, &r), read_lt_ids(&brokers, &d))
        })
        .await
        .expect("reader");
        (results, dead, complete) = (r.ids, d.ids, r.complete && d.complete);
        let found: HashSet<&String> = results
            .iter()
            .map(|r| &r.0)
            .chain(dead.iter().map(|d| &d.0))
            .collect();
        let missing = expected_results
            .iter()
            .chain(&expected_dead)
            .filter(|id| !found.contains(id))
            .count();
        if missing == 0 || Instant::now() > drain_until {
            break;
        }
        if missing != stalled.0 {
            stalled = (missing, Instant::now());
        } else if stalled.1.elapsed() > Duration::from_secs(30)
            && budgets(args.processor_metrics.as_deref())
                .await
                .iter()
                .any(|b| b.exhausted)
        {
            println!("  {missing} events wait on a spent budget; nothing moved for 30 s");
            break;
        }
        println!("  {missing} accepted events not yet a result or a dead letter; waiting");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let provider = match &args.simulator {
        None => None,
        Some(sim) => {
            async {
                let stats: serde_json::Value = reqwest::get(format!("{sim}/stats"))
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                Some((
                    stats["received"].as_f64().unwrap_or(0.0),
                    stats["rate_limited"].as_f64().unwrap_or(0.0),
                ))
            }
            .await
        }
    };
    let budget_figures = budgets(args.processor_metrics.as_deref()).await;
    let lag = if budget_figures.iter().any(|b| b.exhausted) {
        let (brokers, group, topic) = (
            args.brokers.clone(),
            args.group.clone(),
            args.input_topic.clone(),
        );
        tokio::task::spawn_blocking(move || group_lag(&brokers, &group, &topic))
            .await
            .expect("lag reader")
    } else {
        0
    };
    let l = ledger.lock().unwrap();
    let mine = |id: &String| l.sent.contains_key(id);
    let result_ids: Vec<&(String, Option<i64>)> = results.iter().filter(|r| mine(&r.0)).collect();
    let dead_ids: Vec<&(String, Option<i64>)> = dead.iter().filter(|d| mine(&d.0)).collect();
    let distinct_results: HashSet<&String> = result_ids.iter().map(|r| &r.0).collect();
    let distinct_dead: HashSet<&String> = dead_ids.iter().map(|d| &d.0).collect();
    let missing: Vec<&String> = (expected_results.iter())
        .filter(|id| !distinct_results.contains(id))
        .chain(
            expected_dead
                .iter()
                .filter(|id| !distinct_dead.contains(id)),
        )
        .collect();
    // Only the spike's source has a budget (spike-local.sh's BUDGET_USD, the compose config):
    // its events behind a spent budget are not lost while their offsets are uncommitted, so
    // at most the group's lag of them wait. A missing steady event is always lost.
    let spike_missing = missing
        .iter()
        .filter(|id| l.sent[**id].source == "spike")
        .count();
    let waiting = spike_missing.min(lag as usize);
    let lost = missing.len() - waiting;
    // Results commit in a transaction with the journal: a second one is a duplicate effect.
    // The DLQ is at-least-once (a record dead-lettered again after a restart): shown apart.
    let duplicated = result_ids.len() - distinct_results.len();
    let dead_twice = dead_ids.len() - distinct_dead.len();
    let refused = l.sent.len() - l.accepted.len();
    let misrouted = expected_dead
        .iter()
        .filter(|id| distinct_results.contains(id))
        .count()
        + expected_results
            .iter()
            .filter(|id| distinct_dead.contains(id))
            .count();

    println!("\n# Verdict");
    println!("| figure | value |");
    println!("|---|---|");
    println!("| sent (distinct events) | {} |", l.sent.len());
    println!("| accepted (2xx) | {} |", l.accepted.len());
    println!("| refused, by status | {:?} |", l.refused);
    println!(
        "| upstream duplicates sent, answered 2xx | {} / {} |",
        l.resent, l.resent_accepted
    );
    println!(
        "| results (read_committed) | {} records, {} distinct |",
        result_ids.len(),
        distinct_results.len()
    );
    println!(
        "| dead letters (poison) | {} records, {} distinct, {} expected ({dead_twice} written twice) |",
        dead_ids.len(),
        distinct_dead.len(),
        expected_dead.len()
    );
    println!("| **refused** (not 2xx after retries) | **{refused}** |");
    if !budget_figures.is_empty() {
        println!("| waiting on a spent budget (uncommitted: group lag {lag}) | {waiting} |");
    }
    println!("| **lost** | **{lost}** |");
    println!("| **duplicated** | **{duplicated}** |");
    println!("| in the wrong place (a result for poison or the reverse) | {misrouted} |");
    // The spike lasts from its first send to its last result (its backlog drained).
    let spike_start = l
        .sent
        .values()
        .filter(|s| s.source == "spike")
        .map(|s| s.sent_ms)
        .min();
    let spike_end = (result_ids.iter())
        .filter(|(id, _)| l.sent[id].source == "spike")
        .filter_map(|(_, at)| *at)
        .max();
    println!("\nEnd-to-end latency (send to result), seconds, of events sent during the spike:");
    println!("| source | events | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    for source in ["steady", "spike"] {
        let mut lat: Vec<f64> = result_ids
            .iter()
            .filter_map(|(id, at)| {
                let s = &l.sent[id];
                let during = spike_start.is_some_and(|t| s.sent_ms >= t)
                    && spike_end.is_some_and(|t| s.sent_ms <= t);
                (s.source == source && s.in_spike && during)
                    .then_some(((*at)? - s.sent_ms) as f64 / 1000.0)
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        let name = if source == "steady" {
            &args.steady_source
        } else {
            &args.spike_source
        };
        println!(
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            lat.len(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN)
        );
    }
    if let Some((received, limited)) = provider {
        println!(
            "\nProvider: {received} requests, {limited} answered 429 ({:.3} %)",
            if received > 0.0 {
                limited * 100.0 / received
            } else {
                0.0
            }
        );
    }
    if !budget_figures.is_empty() {
        println!("\nBudgets (the processor's view: every replica's spend this period):");
        println!("| budget | limit | spent | exhausted | overshoot |");
        println!("|---|---|---|---|---|");
        for b in &budget_figures {
            println!(
                "| {} | {} | {:.6} | {} | {:.6} |",
                b.name,
                b.limit,
                b.spent,
                b.exhausted,
                (b.spent - b.limit).max(0.0)
            );
        }
    }
    if !complete {
        println!("\nthe result topic or the DLQ was not read to its end within two minutes");
    }
    let ok = refused == 0 && lost == 0 && duplicated == 0 && misrouted == 0 && complete;
    println!(
        "\nverdict: {}",
        if ok {
            "PASS (nothing lost, nothing duplicated)"
        } else {
            "FAIL"
        }
    );
    if !ok {
        std::process::exit(1);
    }
}

/// One spend budget as the processor reports it.
struct Budget {
    name: String,
    limit: f64,
    spent: f64,
    exhausted: bool,
}

/// The processor's budgets from its /metrics, or none.
async fn budgets(url: Option<&str>) -> Vec<Budget> {
    let Some(url) = url else {
        return Vec::new();
    };
    let Ok(text) = async { reqwest::get(url).await?.text().await }.await else {
        return Vec::new();
    };
    let value = |metric: &str, name: &str| -> f64 {
        let series = format!("{metric}{{budget=\"{name}\"}} ");
        (text.lines())
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let names: Vec<String> = (text.lines())
        .filter_map(|l| l.strip_prefix("spillway_budget_limit{budget=\""))
        .filter_map(|l| l.split('"').next())
        .map(str::to_string)
        .collect();
    names
        .into_iter()
        .map(|name| Budget {
            limit: value("spillway_budget_limit", &name),
            spent: value("spillway_budget_spent", &name),
            exhausted: value("spillway_budget_exhausted", &name) >= 1.0,
            name,
        })
        .collect()
}

/// Records of `topic` past `group`'s committed offsets.
fn group_lag(brokers: &str, group: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = match rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(c) => c,
        Err(_) => return 0,
    };
    let timeout = Duration::from_secs(10);
    let Ok(md) = consumer.fetch_metadata(Some(topic), timeout) else {
        return 0;
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }
    let Ok(committed) = consumer.committed_offsets(tpl, timeout) else {
        return 0;
    };
    committed
        .elements()
        .iter()
        .map(|e| {
            let (low, high) = consumer
                .fetch_watermarks(topic, e.partition(), timeout)
                .unwrap_or((0, 0));
            let at = e.offset().to_raw().filter(|o| *o >= 0).unwrap_or(low);
            (high - at).max(0)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_avro_result_is_read_with_the_result_schema() {
        use apache_avro::types::Value;
        let schema =
            apache_avro::Schema::parse_str(include_str!("../../schemas/result.avsc")).unwrap();
        let s = |v: &str| Value::String(v.into());
        let record = Value::Record(vec![
            (
                "dedup_key".into(),
                s("/webhooks/campaign|campaign:lt-1-spike-7"),
            ),
            ("id".into(), s("campaign:lt-1-spike-7")),
            ("source".into(), s("/webhooks/campaign")),
            ("type".into(), s("com.example.campaign.reply")),
            ("input_topic".into(), s("spillway.events")),
            ("input_partition".into(), Value::Int(3)),
            ("input_offset".into(), Value::Long(42)),
            (
                "processed_at".into(),
                Value::TimestampMillis(1_700_000_000_123),
            ),
            ("outputs".into(), s("{}")),
            (
                "data".into(),
                s(r#"{"lt":"lt-1-spike-7","text":"spike comment 7"}"#),
            ),
        ]);
        let mut framed = vec![0, 0, 0, 0, 9];
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value(&mut framed, record)
            .unwrap();
        let v = avro_result(&framed).expect("decodes");
        assert_eq!(v["data"]["lt"], "lt-1-spike-7");
        assert_eq!(v["processed_at"], 1_700_000_000_123i64);
        assert!(avro_result(b"{\"not\":\"avro\"}").is_none());
    }
}

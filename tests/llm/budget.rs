//! Spend budgets: an exhausted budget makes events wait (never dropped) and they resume at the
//! period's roll-over; replicas share one budget through the spend topic; spend survives a
//! SIGKILL.

use std::collections::HashSet;

use super::*;

/// The clock budgets run on is process-wide (`fault::set_clock_offset_ms`): the tests that
/// run processors in this process take turns.
static CLOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Puts the budgets' clock back to the wall clock when the test ends, passed or not.
struct WallClock;

impl Drop for WallClock {
    fn drop(&mut self) {
        spillway::fault::set_clock_offset_ms(0);
    }
}

/// `[llm.budget]` on `topic` with one budget, `daily`, of `tokens` per UTC day.
fn budget(topic: &str, tokens: u64) -> String {
    format!(
        "[llm.budget]\ntopic = \"{topic}\"\nrecheck_ms = 200\n\
         [[llm.budget.limits]]\nname = \"daily\"\nperiod = \"day\"\ntokens = {tokens}\n"
    )
}

fn gauge(m: &str, series: &str) -> f64 {
    metric_value(m, series).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_daily_budget_defers_events_pauses_and_resumes_at_the_roll_over_with_nothing_lost(
) {
    let _clock = CLOCK.lock().await;
    let _wall = WallClock;
    let (broker, topic, dlq, group) = setup(1).await;
    let spend = unique("spend");
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (sink, posts) = recording_sink().await;
    // Each call reserves its prompt estimate plus 64 tokens; 600 a day take about six.
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        "",
        &format!(
            "{}\n{}\n[processor]\nmax_buffered_per_partition = 2\n",
            provider("primary", "openai", &sim, ""),
            budget(&spend, 600)
        ),
    );
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..40).map(|i| text_rec(&format!("k{i}"), &format!("comment {i}"))),
    )
    .await;
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    // The budget runs out: the rest wait (none dead-lettered), and once 20 offsets wait behind
    // the first waiting one (10 × max_buffered_per_partition) the partition pauses.
    wait_until_async(
        "the budget runs out and intake pauses",
        Duration::from_secs(60),
        || async {
            let m = metrics(addr).await;
            gauge(&m, "spillway_budget_exhausted{budget=\"daily\"}") == 1.0
                && gauge(&m, "spillway_paused_partitions") >= 1.0
                && gauge(&m, "spillway_budget_waiting_events") >= 1.0
        },
    )
    .await;
    let m = metrics(addr).await;
    let before = posts.len();
    assert!(
        (1..40).contains(&before),
        "{before} posted before the budget ran out"
    );
    let spent = gauge(&m, "spillway_budget_spent{budget=\"daily\"}");
    assert!(
        spent <= 600.0,
        "spent {spent} of 600: reservations never exceed the cap"
    );
    assert_eq!(metric_sum(&m, "spillway_dlq_records_total"), 0.0);
    assert!(metric_sum(&m, "spillway_events_total") < 40.0);
    assert!(
        metric_sum(
            &m,
            "spillway_step_deferrals_total{pipeline=\"default\",reason=\"budget_exhausted\""
        ) >= 1.0,
        "waits are counted"
    );
    // `spillway status` says so.
    let config = Config::from_toml(&toml).unwrap();
    let url = format!("http://{addr}/metrics");
    let status = tokio::task::block_in_place(|| {
        spillway::cli::status::gather(&config, Some(&url)).expect("status")
    });
    let b = &status.budgets[0];
    assert_eq!(
        (b.name.as_str(), b.limit, b.unit),
        ("daily", 600.0, "tokens")
    );
    assert_eq!(b.exhausted, Some(true));
    assert!(b.spent.is_some_and(|s| s > 0.0 && s <= 600.0), "{b:?}");
    assert!(status.to_string().contains("budget daily:"), "{status}");
    // Nothing moves while the day lasts: the calls already answered are posted, then none
    // follows within five rechecks.
    let calls = sim.stats().await.completed;
    wait_until(
        "the answered calls are posted",
        Duration::from_secs(10),
        || posts.len() as u64 >= calls,
    )
    .await;
    let before = posts.len();
    let waits = |m: &str| {
        metric_sum(
            m,
            "spillway_step_deferrals_total{pipeline=\"default\",reason=\"budget_exhausted\"",
        )
    };
    let rechecks = waits(&metrics(addr).await);
    wait_until_async("five more rechecks", Duration::from_secs(30), || async {
        waits(&metrics(addr).await) >= rechecks + 5.0
    })
    .await;
    assert_eq!(posts.len(), before);
    assert_eq!(
        sim.stats().await.completed,
        calls,
        "no call while the budget is spent"
    );

    // The clock reaches the next UTC day: the waiting events run until the new day's 600
    // tokens run out too, and so on each day until every event is done.
    let day = 86_400_000i64;
    let mut days = 0;
    while posts.len() < 40 {
        days += 1;
        assert!(
            days <= 20,
            "events stopped moving after {} posts",
            posts.len()
        );
        let now = spillway::telemetry::now_ms() as i64 + spillway::fault::clock_offset_ms();
        let before = posts.len();
        spillway::fault::set_clock_offset_ms(
            spillway::fault::clock_offset_ms() + (now / day + 1) * day - now + 1_000,
        );
        wait_until(
            "the new day's budget runs waiting events",
            Duration::from_secs(30),
            || posts.len() > before,
        )
        .await;
        wait_until_async(
            "that day's budget runs out, or every event is done",
            Duration::from_secs(30),
            || async {
                posts.len() >= 40
                    || gauge(
                        &metrics(addr).await,
                        "spillway_budget_exhausted{budget=\"daily\"}",
                    ) == 1.0
            },
        )
        .await;
    }
    assert!(
        days >= 2,
        "the budget held each day to a few events ({days} days)"
    );
    spillway::fault::set_clock_offset_ms(0);
    let mut texts = posts.texts();
    texts.sort();
    texts.dedup();
    assert_eq!(
        texts.len(),
        40,
        "every event posted once: nothing lost, nothing twice"
    );
    assert_eq!(posts.len(), 40);
    wait_until_async("intake resumes", Duration::from_secs(30), || async {
        gauge(&metrics(addr).await, "spillway_paused_partitions") == 0.0
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let offsets = blocking(|| committed(&broker.bootstrap(), &group, &topic, 1));
    assert_eq!(
        offsets.get(&0),
        Some(&40),
        "the group committed every offset"
    );
}

/// `p`'s `/metrics` once `ready` holds for it; after 60 s panics with its log.
async fn scraped_when(p: &SpillwayProc, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(m) = p.try_scrape().await.filter(|m| ready(m)) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}; log:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The tokens every answer of the simulator used, input and output.
async fn tokens_used(sim: &Sim) -> u64 {
    let s = sim.stats().await;
    s.input_tokens + s.output_tokens
}

/// The most one call reserves here: its prompt estimate (under 40 tokens for these prompts)
/// plus `max_tokens` (64).
const WORST_CALL: f64 = 104.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_a_budget_overshoot_by_no_more_than_their_in_flight_reservations() {
    let _clock = CLOCK.lock().await;
    let (broker, topic, dlq, group) = setup(4).await;
    let spend = unique("spend");
    // Calls take 100 ms, so each replica has its 4 slots' reservations in flight most of the
    // time while the other reads them.
    let sim = Sim::start(|c| c.latency_ms = 100).await;
    let (sink, posts) = recording_sink().await;
    const CAP: f64 = 3_000.0;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        "",
        &format!(
            "{}\n{}\n[processor]\nmax_in_flight = 4\n",
            provider("primary", "openai", &sim, ""),
            budget(&spend, CAP as u64)
        ),
    );
    let stop = CancellationToken::new();
    let (a, task_a) = start_configured(&toml, stop.clone()).await;
    let (b, task_b) = start_configured(&toml, stop.clone()).await;
    wait_until_async(
        "both replicas have partitions",
        Duration::from_secs(60),
        || async {
            let assigned = |m: &str| gauge(m, "spillway_assigned_partitions");
            assigned(&metrics(a).await) >= 1.0 && assigned(&metrics(b).await) >= 1.0
        },
    )
    .await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..300).map(|i| text_rec(&format!("k{i}"), &format!("comment {i}"))),
    )
    .await;
    wait_until_async(
        "both replicas run out of the shared budget",
        Duration::from_secs(90),
        || async {
            let (ma, mb) = (metrics(a).await, metrics(b).await);
            [&ma, &mb].iter().all(|m| {
                gauge(m, "spillway_budget_exhausted{budget=\"daily\"}") == 1.0
                    && gauge(m, "spillway_budget_waiting_events") >= 1.0
            })
        },
    )
    .await;
    // Calls in flight finish: every task left on either replica waits on the budget.
    wait_until_async("no call is in flight", Duration::from_secs(30), || async {
        let idle = |m: &str| {
            gauge(m, "spillway_inflight_events") == gauge(m, "spillway_budget_waiting_events")
        };
        idle(&metrics(a).await) && idle(&metrics(b).await)
    })
    .await;
    let used = tokens_used(&sim).await as f64;
    let (ma, mb) = (metrics(a).await, metrics(b).await);
    let finished = |m: &str| metric_sum(m, "spillway_events_total");
    assert!(
        finished(&ma) >= 1.0 && finished(&mb) >= 1.0,
        "both replicas spent from the budget: {} and {}",
        finished(&ma),
        finished(&mb)
    );
    // Each replica's reservations fit what it had read of the other's; what it had not read
    // yet is at most the other's reservations in flight: 4 slots each.
    let bound = CAP + 2.0 * 4.0 * WORST_CALL;
    assert!(
        used <= bound,
        "the providers were paid for {used} tokens; the budget is {CAP} plus at most {} in flight",
        bound - CAP
    );
    assert!(used >= CAP / 2.0, "the budget was used ({used} of {CAP})");
    // Both replicas see the same total, which is what the provider counted.
    wait_until_async(
        "the replicas agree on the spend",
        Duration::from_secs(10),
        || async {
            let spent = |m: &str| gauge(m, "spillway_budget_spent{budget=\"daily\"}");
            let (sa, sb) = (spent(&metrics(a).await), spent(&metrics(b).await));
            (sa - used).abs() < 1.0 && (sb - used).abs() < 1.0
        },
    )
    .await;
    assert!(posts.len() < 300, "the events past the budget wait");
    stop.cancel();
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_survives_a_sigkill_and_restart_and_a_raised_budget_resumes_the_waiting_events() {
    let (broker, topic, dlq, group) = setup(1).await;
    let spend = unique("spend");
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (sink, posts) = recording_sink().await;
    const CAP: u64 = 1_500;
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        "",
        &format!(
            "{}\n{}",
            provider("primary", "openai", &sim, ""),
            budget(&spend, CAP)
        ),
    );
    produce_all(
        &broker.bootstrap(),
        &topic,
        (0..15).map(|i| text_rec(&format!("k{i}"), &format!("comment {i}"))),
    )
    .await;
    let mut first = SpillwayProc::spawn(&toml);
    first
        .wait_finished(15, "the first run finishes its events")
        .await;
    let spent_before = gauge(
        &first.try_scrape().await.unwrap_or_default(),
        "spillway_budget_spent{budget=\"daily\"}",
    );
    let used_before = tokens_used(&sim).await;
    assert!(
        spent_before >= used_before as f64,
        "{spent_before} < {used_before}"
    );
    first.kill9();
    // A new instance starts from every instance's spend on the topic.
    let second = SpillwayProc::spawn(&toml);
    let spent = "spillway_budget_spent{budget=\"daily\"}";
    let m = scraped_when(&second, "the restarted processor reports its budget", |m| {
        gauge(m, spent) >= 0.0
    })
    .await;
    let spent_after = gauge(&m, spent);
    assert!(
        spent_after >= used_before as f64,
        "the restarted instance counts the {used_before} tokens spent before the kill: {spent_after}"
    );
    produce_all(
        &broker.bootstrap(),
        &topic,
        (15..60).map(|i| text_rec(&format!("k{i}"), &format!("comment {i}"))),
    )
    .await;
    scraped_when(&second, "the budget runs out in the second run", |m| {
        gauge(m, "spillway_budget_exhausted{budget=\"daily\"}") == 1.0
            && gauge(m, "spillway_budget_waiting_events") >= 1.0
    })
    .await;
    // One instance's reservations never pass the cap; an answer may use a few more prompt
    // tokens than estimated, never a whole call's worth.
    let used = tokens_used(&sim).await;
    assert!(
        used as f64 <= CAP as f64 + WORST_CALL,
        "{used} tokens paid across the kill, against a budget of {CAP}"
    );
    assert!(posts.len() < 60, "the events past the budget wait");
    drop(second);
    // A restart with a higher budget runs the events that waited: none was lost.
    let raised = toml.replace(&format!("tokens = {CAP}"), "tokens = 100000");
    let third = SpillwayProc::spawn(&raised);
    let distinct = || posts.texts().into_iter().collect::<HashSet<_>>().len();
    third
        .wait_until("the waiting events run", Duration::from_secs(60), || {
            distinct() >= 60
        })
        .await;
    assert_eq!(
        distinct(),
        60,
        "every event posted, after the budget was raised"
    );
}

/// Events of `source` with ids `<tag>-<i>` and texts `<tag> <i>`.
fn sourced(source: &str, tag: &str, range: std::ops::Range<usize>) -> Vec<Rec> {
    range
        .map(|i| {
            let (id, text) = (format!("{tag}-{i}"), format!("{tag} {i}"));
            cloud_event(&id, source, "com.example.comment", &text)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_budget_is_spent_waits_while_other_sources_go_on() {
    let _clock = CLOCK.lock().await;
    let (broker, topic, dlq, group) = setup(2).await;
    let spend = unique("spend");
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (sink, posts) = recording_sink().await;
    // The campaign's 600 tokens a day run out after a few of its 100 events; the blog has no
    // budget. Four slots: a campaign holding them while it waits would starve the blog.
    let toml = pipeline_toml(
        &broker,
        (&topic, &dlq, &group),
        sink,
        "",
        &format!(
            "{}\n[llm.budget]\ntopic = \"{spend}\"\nrecheck_ms = 200\n\
             [[llm.budget.limits]]\nname = \"campaign\"\nperiod = \"day\"\ntokens = 600\n\
             source = \"/webhooks/campaign\"\n[processor]\nmax_in_flight = 4\n",
            provider("primary", "openai", &sim, ""),
        ),
    );
    produce_all(
        &broker.bootstrap(),
        &topic,
        sourced("/webhooks/campaign", "campaign", 0..100),
    )
    .await;
    let stop = CancellationToken::new();
    let (addr, task) = start_configured(&toml, stop.clone()).await;
    wait_until_async(
        "the campaign's budget runs out",
        Duration::from_secs(60),
        || async {
            gauge(
                &metrics(addr).await,
                "spillway_budget_exhausted{budget=\"campaign\"}",
            ) == 1.0
        },
    )
    .await;
    produce_all(
        &broker.bootstrap(),
        &topic,
        sourced("/webhooks/blog", "blog", 0..20),
    )
    .await;
    let blog_posted = || {
        (posts.texts().iter())
            .filter(|t| t.starts_with("blog"))
            .count()
    };
    wait_until(
        "every blog event is posted",
        Duration::from_secs(60),
        || blog_posted() == 20,
    )
    .await;
    let m = metrics(addr).await;
    let waiting = gauge(&m, "spillway_budget_waiting_events");
    // Only the campaign events dispatched before the first one waited are parked; the source
    // is held after that, so the waiting tasks never pile up.
    assert!(
        (1.0..=4.0).contains(&waiting),
        "{waiting} campaign events parked"
    );
    let campaign_posted = posts.len() - 20;
    assert!(
        campaign_posted < 100,
        "{campaign_posted} campaign events posted"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

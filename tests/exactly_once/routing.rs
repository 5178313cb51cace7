//! Decisions survive a crash: a skipped step and a route are journaled, so a redelivered event
//! decides as it did before the crash, even after the condition or the route's template
//! changed, and its effect happens once, at the destination it was routed to.

use super::*;
use spillway_mock_llm::label_for;

const EVENTS: u64 = 12;
const CRASH_AT: u64 = 5;

/// One partition and one event in flight, so events pass the crash point in order: when the
/// process kills itself at the `CRASH_AT`th, exactly events `0..CRASH_AT` have their decision
/// journaled.
fn decision_toml(broker: &Broker, n: &Names, sim: &Sim, steps: &str) -> String {
    classify_then(broker, n, sim, 1, steps)
}

async fn one_partition(broker: &Broker, prefix: &str) -> Names {
    let n = new_names(prefix);
    for t in [&n.topic, &n.dlq, &n.journal] {
        create_topic(&broker.bootstrap(), t, 1).await;
    }
    produce_all(
        &broker.bootstrap(),
        &n.topic,
        (0..EVENTS).map(|i| comment("k", &format!("evt-{i}"), i)),
    )
    .await;
    n
}

fn key(i: u64) -> String {
    format!("/test|evt-{i}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_step_stays_skipped_for_a_redelivered_event_even_after_its_condition_changes() {
    let broker = Broker::start_exclusive();
    let n = one_partition(&broker, "skip").await;
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let (alert_sink, alerts) = receiver().await;
    let (notify_sink, notified) = receiver().await;
    let config = |when: &str| {
        let steps = webhook("alert", alert_sink, &format!("when = '{when}'"))
            + &webhook("notify", notify_sink, "");
        decision_toml(&broker, &n, &sim, &steps)
    };
    // Killed right after the CRASH_AT-th skip of `alert` is durable, before `notify` runs.
    let fault = format!("after_journal:alert:{CRASH_AT}");
    crash_at(&config("data.text == \"never\""), &fault);
    assert_eq!(alerts.raw(), 0, "the condition was false for every event");

    // Restart with a condition that now holds for every event: nothing was committed, so every
    // event is redelivered, and those whose skip is journaled must not be alerted.
    let mut p = SpillwayProc::spawn(&config("true"));
    p.wait_finished(EVENTS, &fault).await;
    p.terminate();
    let alerted = alerts.effects();
    for i in 0..CRASH_AT {
        assert!(
            !alerted.contains_key(&key(i)),
            "evt-{i}: its skip was journaled before the crash, yet it was alerted after the \
             condition changed"
        );
    }
    for i in CRASH_AT..EVENTS {
        assert_eq!(
            alerted.get(&key(i)),
            Some(&1),
            "evt-{i}: decided after the restart, under the new condition"
        );
    }
    let notifications = notified.effects();
    assert_eq!(notifications.len() as u64, EVENTS, "every event notified");
    assert!(notifications.values().all(|c| *c == 1), "{notifications:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_between_the_route_decision_and_its_effect_posts_once_where_it_was_routed() {
    let broker = Broker::start_exclusive();
    let n = one_partition(&broker, "route").await;
    let sim = Sim::start(|c| c.latency_ms = 5).await;
    let mut sinks = HashMap::new();
    let mut receivers = HashMap::new();
    for label in ["negative", "positive", "neutral"] {
        let (addr, r) = receiver().await;
        sinks.insert(label, addr);
        receivers.insert(label, r);
    }
    let config = |value: &str| {
        let mut steps = format!(
            "[[steps]]\ntype = \"route\"\nvalue = '{value}'\n\
             cases = [\"negative\", \"positive\"]\ndefault = \"neutral\"\n\n"
        );
        for label in ["negative", "positive", "neutral"] {
            steps += &webhook(
                &format!("to_{label}"),
                sinks[label],
                &format!("route = \"{label}\""),
            );
        }
        decision_toml(&broker, &n, &sim, &steps)
    };
    let labels: Vec<&str> = (0..EVENTS)
        .map(|i| label_for(&format!("Comment: comment evt-{i}")))
        .collect();
    // The crash catches the first event past the second that is not routed to `positive`:
    // its decision is durable and its post not made, and the new route would send it to
    // `positive` if the decision were taken again.
    let crash_at_event = (2..EVENTS as usize)
        .find(|&i| labels[i] != "positive")
        .unwrap_or_else(|| panic!("every label is positive: {labels:?}"));
    let crash_after = crash_at_event as u64 + 1;
    // Killed right after that event's route decision is durable, before its post.
    let fault = format!("after_journal:route:{crash_after}");
    crash_at(&config("{{ outputs.classify.json.label }}"), &fault);

    // Restart with a route that would now send every event to `positive`.
    let mut p = SpillwayProc::spawn(&config("positive"));
    p.wait_finished(EVENTS, &fault).await;
    p.terminate();
    for i in 0..EVENTS {
        let expected = if i < crash_after {
            labels[i as usize]
        } else {
            "positive"
        };
        for (label, r) in &receivers {
            let posts = r.effects().get(&key(i)).copied().unwrap_or(0);
            let want = u64::from(*label == expected);
            assert_eq!(
                posts, want,
                "evt-{i} (routed to {expected}): {posts} side effects at {label}"
            );
        }
    }
}

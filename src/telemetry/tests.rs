//! Unit tests of the telemetry module.

use super::*;

#[test]
fn metrics_render_with_spillway_prefix_and_units() {
    let m = Metrics::new();
    m.events
        .with_label_values(&["default", "t", "succeeded"])
        .inc();
    m.consumer_lag.with_label_values(&["t", "0"]).set(5);
    let text = m.render();
    assert!(text.contains(
        "spillway_events_total{outcome=\"succeeded\",pipeline=\"default\",topic=\"t\"} 1"
    ));
    assert!(text.contains("spillway_consumer_lag{partition=\"0\",topic=\"t\"} 5"));
    m.forget_partition("t", 0);
    assert!(!m.render().contains("spillway_consumer_lag{"));
}

#[test]
fn liveness_follows_progress_not_readiness() {
    let h = Health::new(Duration::from_millis(50));
    assert!(h.is_live());
    assert!(!h.is_ready());
    h.last_progress_ms.store(0, Ordering::Relaxed);
    assert!(!h.is_live());
    h.progress();
    assert!(h.is_live());
}

#[test]
fn source_labels_stop_at_their_bound_and_the_rest_count_as_other() {
    let m = Metrics::new();
    let class = |i: usize| -> std::sync::Arc<str> { format!("/webhooks/s{i}").into() };
    for i in 0..MAX_SOURCE_LABELS + 8 {
        let label = m.source_label(&class(i));
        let want = if i < MAX_SOURCE_LABELS {
            format!("/webhooks/s{i}")
        } else {
            "other".into()
        };
        assert_eq!(&*label, want);
        m.source_end_to_end
            .with_label_values(&[&*label])
            .observe(0.1);
    }
    // A source seen before the bound keeps its label; no class at all is `all`.
    assert_eq!(&*m.source_label(&class(3)), "/webhooks/s3");
    assert_eq!(&*m.source_label(&"".into()), "all");
    let series = m
        .render()
        .lines()
        .filter(|l| l.starts_with("spillway_source_end_to_end_seconds_count"))
        .count();
    assert_eq!(series, MAX_SOURCE_LABELS + 1);
}

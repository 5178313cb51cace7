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

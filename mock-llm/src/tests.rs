//! Unit tests of the simulator's parsing and buckets.

use super::*;

#[test]
fn bucket_refills_continuously_and_caps_at_a_minute() {
    let t0 = Instant::now();
    let mut b = Bucket::new(600, 60_000, t0); // 10 per second
    b.take(600.0);
    assert_eq!(b.wait_for(10.0), Duration::from_secs(1));
    b.refill(t0 + Duration::from_millis(500));
    assert_eq!(b.remaining(), 5);
    b.refill(t0 + Duration::from_secs(3600));
    assert_eq!(b.remaining(), 600, "never more than one minute's worth");
}

#[test]
fn fault_specs_parse_and_reject_garbage() {
    assert_eq!(
        parse_script("500, ok,hang").unwrap(),
        VecDeque::from([Fault::ServerError, Fault::Ok, Fault::Hang])
    );
    assert_eq!(
        parse_rates("529=0.5").unwrap(),
        vec![(Fault::Overloaded, 0.5)]
    );
    assert!(parse_rates("529=2").is_err());
    assert!(parse_script("teapot").is_err());
}

#[test]
fn answers_are_deterministic_with_exact_token_counts() {
    assert_eq!(label_for("great post!"), label_for("great post!"));
    let a = answer("x", 5, false);
    assert_eq!(
        a.split_whitespace().count(),
        6,
        "label: X plus four fillers"
    );
    assert!(answer("x", 1, true).starts_with(r#"{"label":"#));
}

//! Backoff for transient errors: exponential with full jitter, never sooner than a
//! server-given `Retry-After`.

use std::time::Duration;

use rand::Rng;

use crate::processor::config::RetryConfig;

/// Delay before retry number `retry` (1 for the first retry).
///
/// Full jitter (AWS architecture blog): uniform in `[0, min(max, initial * 2^(retry-1))]`,
/// which spreads a burst of failures out instead of synchronising the retries. A server-given
/// `retry_after` is a floor: the delay is never shorter.
pub fn backoff(
    retry: u32,
    config: &RetryConfig,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Duration {
    let exp = retry.saturating_sub(1).min(32);
    let cap = config
        .initial_backoff_ms
        .saturating_mul(1u64 << exp)
        .min(config.max_backoff_ms);
    let jittered = Duration::from_millis(rng.random_range(0..=cap));
    match retry_after {
        Some(floor) => jittered.max(floor),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn cfg() -> RetryConfig {
        RetryConfig {
            max_attempts: 10,
            initial_backoff_ms: 100,
            max_backoff_ms: 1_000,
        }
    }

    #[test]
    fn backoff_stays_within_the_doubling_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        for retry in 1..12 {
            let cap = (100u64 << (retry - 1)).min(1_000);
            for _ in 0..200 {
                let d = backoff(retry, &cfg(), None, &mut rng);
                assert!(
                    d <= Duration::from_millis(cap),
                    "retry {retry}: {d:?} > {cap}"
                );
            }
        }
    }

    #[test]
    fn backoff_is_jittered() {
        let mut rng = StdRng::seed_from_u64(1);
        let samples: std::collections::BTreeSet<_> = (0..50)
            .map(|_| backoff(4, &cfg(), None, &mut rng))
            .collect();
        assert!(samples.len() > 10, "full jitter spreads retries out");
    }

    #[test]
    fn retry_after_is_a_floor() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..100 {
            let d = backoff(1, &cfg(), Some(Duration::from_secs(7)), &mut rng);
            assert!(d >= Duration::from_secs(7));
        }
    }
}

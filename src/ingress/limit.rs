//! Request rate limits of the ingress: a cheap per-IP limit before authentication and a
//! per-source limit after it, both governor GCRA limiters. A refusal carries the time until
//! the next request would be allowed, for the 429's `Retry-After`.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A rate such as `10/min`, `5/s` or `1000/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per period (also the burst).
    pub count: NonZeroU32,
    /// The period.
    pub per: Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        Rate::parse(text)
    }
}

impl Rate {
    /// Parses `<count>/<s|sec|second|min|minute|h|hour>`.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("`{text}` is not a rate like 10/min, 5/s or 1000/h");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let count = NonZeroU32::new(count).ok_or_else(bad)?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3_600),
            _ => return Err(bad()),
        };
        Ok(Rate { count, per })
    }

    fn quota(self) -> Quota {
        // `count` cells replenished evenly over `per`, all of them available as a burst.
        Quota::with_period(self.per / self.count.get())
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(self.count)
    }
}

/// Per-source limits, each source with its own rate.
pub struct SourceLimits {
    limiters: HashMap<String, DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

impl SourceLimits {
    /// One limiter per `(source, rate)`; sources without a rate are unlimited.
    pub fn new<'a>(rates: impl IntoIterator<Item = (&'a str, Rate)>) -> Self {
        SourceLimits {
            limiters: rates
                .into_iter()
                .map(|(s, r)| (s.to_string(), RateLimiter::direct(r.quota())))
                .collect(),
            clock: DefaultClock::default(),
        }
    }

    /// `Ok` if `source` may send a request now, else how long until it may.
    pub fn check(&self, source: &str) -> Result<(), Duration> {
        match self.limiters.get(source) {
            None => Ok(()),
            Some(l) => l
                .check()
                .map_err(|not_until| not_until.wait_time_from(self.clock.now())),
        }
    }
}

/// A limit per client IP, applied before any authentication work. Its memory is bounded:
/// idle keys are forgotten every `sweep_every` checks.
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    clock: DefaultClock,
    checks: std::sync::atomic::AtomicU64,
    sweep_every: u64,
}

/// The per-IP limit.
pub type IpLimit = KeyedLimit<IpAddr>;

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// A keyed limiter at `rate` per key.
    pub fn new(rate: Rate) -> Self {
        KeyedLimit {
            limiter: RateLimiter::keyed(rate.quota()),
            clock: DefaultClock::default(),
            checks: std::sync::atomic::AtomicU64::new(0),
            sweep_every: 10_000,
        }
    }

    /// `Ok` if `key` may send a request now, else how long until it may.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let n = self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % self.sweep_every == self.sweep_every - 1 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Keys currently remembered (tests and diagnostics).
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// The per-IP limit's key for a client address: an IPv4 address as is (also when it arrives
/// IPv4-mapped), an IPv6 address by its /64 prefix, since one host usually holds a whole /64
/// and could otherwise mint a fresh key, and a fresh allowance, per request.
pub fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_garbage_is_refused() {
        let r = Rate::parse("10/min").unwrap();
        assert_eq!((r.count.get(), r.per), (10, Duration::from_secs(60)));
        assert_eq!(Rate::parse(" 5 / s ").unwrap().per, Duration::from_secs(1));
        for bad in ["", "10", "0/min", "x/min", "10/fortnight", "-1/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_flood_from_one_source_is_refused_for_that_source_only() {
        let limits = SourceLimits::new([
            ("blog", Rate::parse("10/min").unwrap()),
            ("stripe", Rate::parse("10/min").unwrap()),
        ]);
        for _ in 0..10 {
            assert!(limits.check("blog").is_ok());
        }
        let wait = limits.check("blog").unwrap_err();
        // One request per 6 s comes back.
        assert!(
            wait > Duration::from_secs(5) && wait <= Duration::from_secs(6),
            "{wait:?}"
        );
        assert_eq!(retry_after_secs(wait), 6);
        assert!(
            limits.check("stripe").is_ok(),
            "other sources are not affected"
        );
        assert!(limits.check("unlimited").is_ok());
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_slash_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(client_key(v4), v4);
    }

    #[test]
    fn the_ip_limit_is_per_address() {
        let limit = IpLimit::new(Rate::parse("2/s").unwrap());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(limit.check(&a).is_ok());
        assert!(limit.check(&a).is_ok());
        assert!(limit.check(&a).is_err());
        assert!(limit.check(&b).is_ok());
        assert_eq!(limit.len(), 2);
    }
}

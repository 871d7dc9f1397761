//! Login throttling: failed logins from one client address beyond
//! `auth_failure_limit` a minute are answered after a delay that doubles
//! from 100 ms up to `auth_failure_max_delay`.
//!
//! Each address has a leaky bucket: a failure adds one, and the bucket drains
//! at `auth_failure_limit` a minute. While it holds more than the limit, the
//! failure's answer waits `100 ms × 2^(excess − 1)`, capped. So a client that
//! mistypes a password a few times never waits, and one that guesses at
//! speed waits longer and longer, while every other address is answered at
//! once. Successful logins neither fill nor empty the bucket: a guesser
//! cannot reset its count by logging in with an account of its own.
//!
//! The wait is a tokio sleep in the session's own task (no runtime thread
//! is held), and it counts against `timeouts.auth` like the exchange itself.
//!
//! IPv6 clients are counted per /64, the block one host usually holds:
//! counting single addresses would let one host rotate through billions.
//! The map is capped ([`CAPACITY`]): when it is full, drained buckets are
//! dropped, then the least recently filled eighth.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses tracked at once (about 3 MB at most).
pub(crate) const CAPACITY: usize = 65_536;

/// The delay of the first failure over the limit; each next one doubles it.
const FIRST_DELAY: Duration = Duration::from_millis(100);

/// The limit is per this period.
const PERIOD: Duration = Duration::from_secs(60);

/// Who a bucket belongs to: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    V4(u32),
    V6(u64),
}

impl Key {
    fn of(addr: IpAddr) -> Key {
        match addr.to_canonical() {
            IpAddr::V4(a) => Key::V4(a.into()),
            IpAddr::V6(a) => Key::V6((u128::from(a) >> 64) as u64),
        }
    }
}

/// One address's recent failures.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Failures not yet drained, as of `at`.
    level: f64,
    /// When `level` was last updated.
    at: Instant,
}

impl Bucket {
    /// The level at `now`, drained at `limit` a [`PERIOD`].
    fn level_at(&self, now: Instant, limit: u32) -> f64 {
        let drained = now.saturating_duration_since(self.at).as_secs_f64() / PERIOD.as_secs_f64()
            * f64::from(limit);
        (self.level - drained).max(0.0)
    }
}

/// Failed logins per client address, shared by every session.
#[derive(Debug)]
pub(crate) struct LoginThrottle {
    buckets: Mutex<HashMap<Key, Bucket>>,
    capacity: usize,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle::with_capacity(CAPACITY)
    }
}

impl LoginThrottle {
    /// A throttle tracking at most `capacity` addresses.
    pub(crate) fn with_capacity(capacity: usize) -> LoginThrottle {
        LoginThrottle {
            buckets: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// Record a failed login from `addr` at `now`; returns how long its
    /// answer waits (zero within the limit, or when `limit` is 0: off).
    pub(crate) fn failed(
        &self,
        addr: IpAddr,
        limit: u32,
        max_delay: Duration,
        now: Instant,
    ) -> Duration {
        if limit == 0 {
            return Duration::ZERO;
        }
        let key = Key::of(addr);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(&key) && buckets.len() >= self.capacity {
            buckets.retain(|_, b| b.level_at(now, limit) > 0.0);
            if buckets.len() >= self.capacity {
                // Still full of live buckets: drop the least recently filled
                // eighth at once, so that these scans happen once per that
                // many new addresses, not for each.
                let mut ats: Vec<Instant> = buckets.values().map(|b| b.at).collect();
                let k = (ats.len() / 8).max(1) - 1;
                let cutoff = *ats.select_nth_unstable(k).1;
                buckets.retain(|_, b| b.at > cutoff);
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            level: 0.0,
            at: now,
        });
        bucket.level = bucket.level_at(now, limit) + 1.0;
        bucket.at = now;
        let excess = bucket.level - f64::from(limit);
        if excess <= 0.0 {
            return Duration::ZERO;
        }
        // `excess` is at least 1 here, up to rounding of the drain.
        let doublings = (excess.ceil() as u32).saturating_sub(1).min(31);
        FIRST_DELAY
            .checked_mul(1 << doublings)
            .unwrap_or(max_delay)
            .min(max_delay)
    }

    /// Addresses tracked now (for tests and diagnostics).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(5);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn failures_beyond_the_limit_wait_longer_and_longer_up_to_the_cap() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let delays: Vec<Duration> = (0..12).map(|_| t.failed(a, 3, MAX, now)).collect();
        assert_eq!(
            delays,
            [0, 0, 0, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000].map(ms)
        );
        // Another address is not slowed.
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(t.failed(b, 3, MAX, now), Duration::ZERO);
    }

    #[test]
    fn the_bucket_drains_at_the_limit_per_minute() {
        let t = LoginThrottle::default();
        let start = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(t.failed(a, 10, MAX, start), Duration::ZERO);
        }
        assert_eq!(t.failed(a, 10, MAX, start), ms(100));
        // Twelve seconds drain two failures: the next two are free again.
        let later = start + Duration::from_secs(12);
        assert_eq!(t.failed(a, 10, MAX, later), Duration::ZERO);
        assert_eq!(t.failed(a, 10, MAX, later), ms(100));
        // Ten failures a minute, steadily, never wait.
        let t = LoginThrottle::default();
        for i in 0..100 {
            let at = start + Duration::from_secs(6 * i);
            assert_eq!(t.failed(a, 10, MAX, at), Duration::ZERO, "failure {i}");
        }
    }

    #[test]
    fn a_limit_of_zero_turns_throttling_off() {
        let t = LoginThrottle::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..100 {
            assert_eq!(t.failed(a, 0, MAX, Instant::now()), Duration::ZERO);
        }
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..3u16 {
            let a = IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, i]);
            t.failed(a, 2, MAX, now);
        }
        let same_64 = IpAddr::from([0x2001, 0xdb8, 0, 1, 9, 9, 9, 9]);
        assert_eq!(t.failed(same_64, 2, MAX, now), ms(200));
        let other_64 = IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]);
        assert_eq!(t.failed(other_64, 2, MAX, now), Duration::ZERO);
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        t.failed(v4, 1, MAX, now);
        assert_eq!(t.failed(mapped, 1, MAX, now), ms(100));
    }

    #[test]
    fn memory_is_capped_drained_buckets_go_first() {
        let t = LoginThrottle::with_capacity(4);
        let start = Instant::now();
        let addr = |i: u8| IpAddr::from([10, 0, 0, i]);
        // Address 1 fails often; 2..4 once each, a minute earlier.
        for i in 2..=4 {
            t.failed(addr(i), 10, MAX, start);
        }
        let now = start + Duration::from_secs(30);
        for _ in 0..10 {
            t.failed(addr(1), 10, MAX, now);
        }
        assert_eq!(t.tracked(), 4);
        // Full: a new address drops the drained buckets, not address 1's.
        t.failed(addr(5), 10, MAX, now);
        assert!(t.tracked() <= 4);
        assert_eq!(t.failed(addr(1), 10, MAX, now), ms(100));
        // Full of live buckets: the least recently filled goes.
        for i in 6..=20 {
            t.failed(addr(i), 10, MAX, now + Duration::from_secs(u64::from(i)));
            assert!(t.tracked() <= 4);
        }
    }
}

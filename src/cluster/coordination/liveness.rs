//! Whether the watch still delivers: every heartbeat this instance writes
//! (each third of the lease TTL, `peers.rs`) is under the watched prefix,
//! so its event must come back through the watch. One that has not come
//! back a lease TTL after etcd acknowledged it means the watch stream is
//! stuck (a member that answers calls but no longer streams, a stream left
//! on a dead connection): the session then ends and the next one connects
//! to the next member, reads the state afresh and watches from there.
//!
//! Without this a follower's only sign of a broken watch would be a failed
//! call; a watch can fail silently while renewals still succeed.

use std::time::{Duration, Instant};

/// The oldest write not yet seen back through the watch.
#[derive(Debug, Default)]
pub(super) struct Echo {
    /// Revision and acknowledgement time of that write.
    pending: Option<(i64, Instant)>,
    /// Highest revision the watch delivered.
    seen: i64,
}

impl Echo {
    /// A write under the watched prefix acknowledged at revision `rev` at
    /// `at`: the watch must deliver it. While an older one is awaited, that
    /// older one is what counts.
    pub(super) fn sent(&mut self, rev: i64, at: Instant) {
        if rev > self.seen && self.pending.is_none() {
            self.pending = Some((rev, at));
        }
    }

    /// The watch delivered everything up to revision `rev`.
    pub(super) fn seen(&mut self, rev: i64) {
        self.seen = self.seen.max(rev);
        if self.pending.is_some_and(|(r, _)| r <= self.seen) {
            self.pending = None;
        }
    }

    /// How long the awaited write has been missing, if longer than `limit`.
    pub(super) fn stalled(&self, now: Instant, limit: Duration) -> Option<Duration> {
        let (_, at) = self.pending?;
        let waited = now.saturating_duration_since(at);
        (waited > limit).then_some(waited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(2);

    #[test]
    fn a_write_seen_back_is_not_awaited() {
        let t0 = Instant::now();
        let mut e = Echo::default();
        e.sent(10, t0);
        assert_eq!(e.stalled(t0 + TTL * 2, TTL), Some(TTL * 2));
        e.seen(12);
        assert_eq!(e.stalled(t0 + TTL * 3, TTL), None);
    }

    #[test]
    fn a_write_missing_longer_than_the_limit_is_a_stall() {
        let t0 = Instant::now();
        let mut e = Echo::default();
        e.seen(5);
        e.sent(10, t0);
        // Later writes do not restart the clock of the oldest one.
        e.sent(11, t0 + TTL);
        assert_eq!(e.stalled(t0 + TTL, TTL), None);
        e.seen(9);
        assert_eq!(
            e.stalled(t0 + TTL + Duration::from_millis(1), TTL),
            Some(TTL + Duration::from_millis(1))
        );
    }

    #[test]
    fn a_write_older_than_what_was_seen_is_not_awaited() {
        let t0 = Instant::now();
        let mut e = Echo::default();
        e.seen(20);
        e.sent(15, t0);
        assert_eq!(e.stalled(t0 + TTL * 5, TTL), None);
    }
}

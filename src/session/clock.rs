//! The session's clock, read at most once per relay turn.
//!
//! A transaction under transaction pooling needs the time for several things
//! (the pool's "given back a moment ago" test, the query-duration metric, the
//! idle stamp of the connection it gives back), and a relay turn runs in well
//! under a microsecond, so one reading serves the whole turn. The relay forgets
//! the reading after every await, so no reading outlives the turn it was taken in.

use std::time::Instant;

/// `Instant::now()`, cached until [`TurnClock::tick`].
#[derive(Debug, Default)]
pub(crate) struct TurnClock(Option<Instant>);

impl TurnClock {
    /// The time of this turn (read on first use).
    pub(crate) fn now(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }

    /// A new turn: the next [`now`](Self::now) reads the clock again.
    pub(crate) fn tick(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_reading_per_turn() {
        let mut c = TurnClock::default();
        let a = c.now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(c.now(), a, "the same turn sees the same time");
        c.tick();
        assert!(c.now() > a, "a new turn reads the clock again");
    }
}

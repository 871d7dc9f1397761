//! The lag curve: how replication lag lowers a standby's read weight.
//!
//! A standby's effective weight is `weight × f_b(lag bytes) × f_t(lag seconds)`
//! with `f(x) = 1 / (1 + (x / half)²)`: 1 at zero lag, ½ at the half-weight lag,
//! ⅕ at twice it, ≈0.01 at ten times it — continuous and falling, so load slides
//! away from a standby as it falls behind instead of flapping at a threshold.
//! Above `delay_threshold` (bytes) or `delay_threshold_by_time` the weight is 0:
//! the standby gets no reads at all. A half-weight of 0 disables that factor; a
//! threshold of 0 disables that cut-off. Unknown lag (no replication check yet,
//! or the primary could not be asked) counts as no lag.
//!
//! Weights are relative: when every standby lags equally their shares do not
//! change; only differences between standbys (and the primary, when it takes
//! reads) move load.

use std::time::Duration;

use crate::config::SrCheck;

/// The knobs of the curve, copied from `[sr_check]` each round (so a reload
/// applies at the next round) and published in every snapshot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LagPolicy {
    /// Byte lag above which a standby gets weight 0; 0 = no limit.
    pub(crate) delay_threshold_bytes: u64,
    /// Time lag above which a standby gets weight 0; zero = no limit.
    pub(crate) delay_threshold_time: Duration,
    /// Byte lag that halves the weight; 0 = bytes do not lower the weight.
    pub(crate) half_weight_lag_bytes: u64,
    /// Time lag that halves the weight; zero = time does not lower the weight.
    pub(crate) half_weight_lag: Duration,
    /// Move a session whose standby crossed a threshold to another standby
    /// (rather than to the primary): pgpool's `prefer_lower_delay_standby`.
    pub(crate) prefer_lower_delay_standby: bool,
}

impl Default for LagPolicy {
    fn default() -> Self {
        LagPolicy::from(&SrCheck::default())
    }
}

impl From<&SrCheck> for LagPolicy {
    fn from(c: &SrCheck) -> Self {
        LagPolicy {
            delay_threshold_bytes: c.delay_threshold,
            delay_threshold_time: c.delay_threshold_by_time,
            half_weight_lag_bytes: c.half_weight_lag_bytes,
            half_weight_lag: c.half_weight_lag,
            prefer_lower_delay_standby: c.prefer_lower_delay_standby,
        }
    }
}

impl LagPolicy {
    /// Whether replication delay is judged in time (pgpool shows
    /// `replication_delay` in seconds then).
    pub(crate) fn by_time(&self) -> bool {
        !self.delay_threshold_time.is_zero()
    }

    /// The factor (0..=1) a standby's weight is multiplied by for its lag.
    pub(crate) fn factor(&self, lag_bytes: Option<u64>, lag_seconds: Option<f64>) -> f64 {
        let mut f = 1.0;
        if let Some(b) = lag_bytes {
            if self.delay_threshold_bytes > 0 && b > self.delay_threshold_bytes {
                return 0.0;
            }
            f *= half_curve(b as f64, self.half_weight_lag_bytes as f64);
        }
        if let Some(s) = lag_seconds {
            let s = if s.is_finite() { s.max(0.0) } else { f64::MAX };
            if !self.delay_threshold_time.is_zero() && s > self.delay_threshold_time.as_secs_f64() {
                return 0.0;
            }
            f *= half_curve(s, self.half_weight_lag.as_secs_f64());
        }
        f
    }
}

/// `1 / (1 + (x / half)²)`, or 1 when `half` is 0 (factor disabled).
fn half_curve(x: f64, half: f64) -> f64 {
    if half <= 0.0 {
        return 1.0;
    }
    let r = x / half;
    1.0 / (1.0 + r * r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LagPolicy {
        LagPolicy {
            delay_threshold_bytes: 0,
            delay_threshold_time: Duration::ZERO,
            half_weight_lag_bytes: 1000,
            half_weight_lag: Duration::from_secs(2),
            prefer_lower_delay_standby: true,
        }
    }

    #[test]
    fn one_at_zero_half_at_half_falling_continuously() {
        let p = policy();
        assert_eq!(p.factor(Some(0), Some(0.0)), 1.0);
        assert_eq!(p.factor(None, None), 1.0);
        assert!((p.factor(Some(1000), None) - 0.5).abs() < 1e-12);
        assert!((p.factor(None, Some(2.0)) - 0.5).abs() < 1e-12);
        assert!((p.factor(Some(2000), None) - 0.2).abs() < 1e-12);
        // Both dimensions multiply.
        assert!((p.factor(Some(1000), Some(2.0)) - 0.25).abs() < 1e-12);
        // Monotonic and continuous: small steps make small changes.
        let mut prev = 1.0;
        for b in (0..100_000).step_by(10) {
            let f = p.factor(Some(b), None);
            assert!(f <= prev && prev - f < 0.01, "at {b}: {prev} -> {f}");
            prev = f;
        }
        assert!(prev < 0.001);
    }

    #[test]
    fn thresholds_cut_to_zero_and_zero_knobs_disable() {
        let mut p = policy();
        p.delay_threshold_bytes = 5000;
        p.delay_threshold_time = Duration::from_secs(10);
        assert!(p.factor(Some(5000), None) > 0.0);
        assert_eq!(p.factor(Some(5001), None), 0.0);
        assert!(p.factor(None, Some(10.0)) > 0.0);
        assert_eq!(p.factor(None, Some(10.5)), 0.0);
        assert_eq!(p.factor(None, Some(f64::INFINITY)), 0.0);
        assert!(p.by_time());

        p.half_weight_lag_bytes = 0;
        p.half_weight_lag = Duration::ZERO;
        assert_eq!(p.factor(Some(4999), Some(9.0)), 1.0);
        p.delay_threshold_bytes = 0;
        p.delay_threshold_time = Duration::ZERO;
        assert_eq!(p.factor(Some(u64::MAX), Some(1e9)), 1.0);
        assert!(!p.by_time());
    }
}

//! Metrics of client logins: `pgpilot_auth_failures_delayed_total`.

use prometheus::{IntCounter, Registry};

use super::{opts, reg};

/// Counters of client authentication.
pub struct AuthMetrics {
    /// `pgpilot_auth_failures_delayed_total`.
    delayed: IntCounter,
}

impl AuthMetrics {
    pub(super) fn new(r: &Registry) -> AuthMetrics {
        AuthMetrics {
            delayed: reg(
                r,
                IntCounter::with_opts(opts(
                    "pgpilot_auth_failures_delayed_total",
                    "Failed logins answered after a delay: their address was over auth_failure_limit.",
                ))
                .expect("valid metric"),
            ),
        }
    }

    /// A failed login's answer is being delayed.
    pub(crate) fn failure_delayed(&self) {
        self.delayed.inc();
    }

    /// Failed logins delayed so far.
    pub fn failures_delayed(&self) -> u64 {
        self.delayed.get()
    }
}

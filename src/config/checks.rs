//! The `[health_check]`, `[sr_check]` and `[metrics]` sections: how pgpilot
//! watches the nodes and how it is watched.

use std::time::Duration;

use serde::Deserialize;

use super::units::{byte_size, duration};

/// Per-node health checks: every `period` a new connection as the `[monitor]`
/// role runs `SELECT pg_is_in_recovery()` within `timeout`; a failure is retried
/// `max_retries` times `retry_delay` apart before the node is declared down.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    /// Time between two checks of a node (a session error triggers one sooner).
    #[serde(deserialize_with = "duration")]
    pub period: Duration,
    /// Limit for one attempt: connect + log in + query.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Failed attempts retried before the verdict `down` (hysteresis: one lost
    /// packet must not take a node out of service).
    pub max_retries: u32,
    /// Pause between retries.
    #[serde(deserialize_with = "duration")]
    pub retry_delay: Duration,
    /// How long a check's connection is reused before a new one replaces it.
    /// A new connection per check costs the node a backend start-up (a fork,
    /// milliseconds of CPU); renewing it this often still proves the node
    /// accepts connections. 0 = a new connection for every check (pgpool-II).
    #[serde(deserialize_with = "duration")]
    pub connection_lifetime: Duration,
    /// Re-admit a standby that was down once it is healthy again and streams
    /// from the current primary. Off: it stays down until `ATTACH NODE n`.
    pub auto_failback: bool,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
            max_retries: 2,
            retry_delay: Duration::from_secs(1),
            connection_lifetime: Duration::from_secs(30),
            auto_failback: true,
        }
    }
}

/// Replication checks (pgpool's `sr_check`) and the lag-weighted balancing curve.
///
/// A standby's effective read weight is `weight × f(bytes) × f(seconds)` with
/// `f(x) = 1 / (1 + (x / half)²)` (1 at zero lag, ½ at the half-weight lag,
/// falling smoothly), and 0 above either threshold. A half-weight of 0 turns
/// that factor off; a threshold of 0 turns that cut-off off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SrCheck {
    /// Time between two rounds; 0 turns replication checks off (lag unknown,
    /// configured weights used as they are).
    #[serde(deserialize_with = "duration")]
    pub period: Duration,
    /// Limit for one node's queries in a round (including reconnecting).
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// A standby more than this many bytes of WAL behind gets no reads; 0 = no limit.
    #[serde(deserialize_with = "byte_size")]
    pub delay_threshold: u64,
    /// A standby more than this far behind in time gets no reads; 0 = no limit.
    #[serde(deserialize_with = "duration")]
    pub delay_threshold_by_time: Duration,
    /// Byte lag at which a standby's weight is halved; 0 = bytes do not lower weights.
    #[serde(deserialize_with = "byte_size")]
    pub half_weight_lag_bytes: u64,
    /// Time lag at which a standby's weight is halved; 0 = time does not lower weights.
    #[serde(deserialize_with = "duration")]
    pub half_weight_lag: Duration,
    /// When a session's standby crosses a threshold, move its reads to another
    /// standby (lower lag preferred) rather than straight to the primary.
    pub prefer_lower_delay_standby: bool,
}

impl Default for SrCheck {
    fn default() -> Self {
        SrCheck {
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            delay_threshold: 0,
            delay_threshold_by_time: Duration::from_secs(10),
            half_weight_lag_bytes: 16 << 20,
            half_weight_lag: Duration::from_secs(1),
            prefer_lower_delay_standby: true,
        }
    }
}

/// The HTTP endpoint for Prometheus and load balancers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address:port serving `/metrics` and `/healthz`; empty = off.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9930".into(),
        }
    }
}

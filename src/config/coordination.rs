//! The `[coordination]` section and `cluster_name`: several pgpilots in
//! front of one cluster agree through etcd (see `cluster::coordination`).

use std::time::Duration;

use serde::Deserialize;

use super::units::duration;
use super::{ConfigError, invalid};

/// `[coordination]`: off while `etcd_endpoints` is empty.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Coordination {
    /// etcd client URLs (`http://host:2379`); empty: coordination is off and
    /// this instance decides alone.
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this cluster's keys; empty: `/pgpilot/<cluster_name>`.
    pub prefix: String,
    /// TTL of the instance's lease: a leader that stops renewing it loses
    /// leadership this long after its last renewal (whole seconds, ≥ 2 s).
    #[serde(deserialize_with = "duration")]
    pub lease_ttl: Duration,
    /// This instance's name among its peers; empty: the `host:port` it
    /// listens on.
    pub instance_name: String,
    /// The `host:port` peers reach this instance's client port at (forwarded
    /// cancel requests); empty: the address it listens on.
    pub advertise_address: String,
}

impl Default for Coordination {
    fn default() -> Self {
        Coordination {
            etcd_endpoints: Vec::new(),
            prefix: String::new(),
            lease_ttl: Duration::from_secs(5),
            instance_name: String::new(),
            advertise_address: String::new(),
        }
    }
}

impl Coordination {
    /// Whether coordination through etcd is on.
    pub fn enabled(&self) -> bool {
        !self.etcd_endpoints.is_empty()
    }

    /// The key prefix (without a trailing `/`).
    pub fn prefix_for(&self, cluster_name: &str) -> String {
        let p = if self.prefix.is_empty() {
            format!("/pgpilot/{cluster_name}")
        } else {
            self.prefix.clone()
        };
        p.trim_end_matches('/').to_string()
    }

    /// The lease TTL in whole seconds (what etcd takes).
    pub fn ttl_seconds(&self) -> i64 {
        self.lease_ttl.as_secs().max(2) as i64
    }

    pub(super) fn validate(&self, cluster_name: &str) -> Result<(), ConfigError> {
        if cluster_name.is_empty() || cluster_name.contains('/') {
            return Err(invalid(
                "cluster_name",
                "must be non-empty and contain no `/`",
            ));
        }
        if !self.enabled() {
            return Ok(());
        }
        for (i, e) in self.etcd_endpoints.iter().enumerate() {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() < 10 {
                return Err(invalid(
                    format!("coordination.etcd_endpoints[{i}]"),
                    format!("{e:?} is not an URL such as http://127.0.0.1:2379"),
                ));
            }
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl.subsec_nanos() != 0 {
            return Err(invalid(
                "coordination.lease_ttl",
                "must be whole seconds, at least 2s",
            ));
        }
        if !self.prefix.is_empty() && !self.prefix.starts_with('/') {
            return Err(invalid("coordination.prefix", "must start with `/`"));
        }
        if !self.advertise_address.is_empty()
            && self
                .advertise_address
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(invalid(
                "coordination.advertise_address",
                format!("{:?} is not address:port", self.advertise_address),
            ));
        }
        Ok(())
    }
}

pub(super) fn default_cluster_name() -> String {
    "default".into()
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn with(section: &str) -> Result<Config, super::ConfigError> {
        Config::from_toml(&format!("{section}\n[[backends]]\nhost = \"127.0.0.1\"\n"))
    }

    #[test]
    fn off_by_default_with_the_documented_defaults() {
        let c = with("").unwrap();
        assert!(!c.coordination.enabled());
        assert_eq!(
            c.coordination.prefix_for(&c.cluster_name),
            "/pgpilot/default"
        );
        assert_eq!(c.coordination.ttl_seconds(), 5);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (section, key) in [
            (
                "[coordination]\netcd_endpoints = [\"localhost:2379\"]",
                "coordination.etcd_endpoints[0]",
            ),
            (
                "[coordination]\netcd_endpoints = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"1s\"",
                "coordination.lease_ttl",
            ),
            (
                "[coordination]\netcd_endpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"x\"",
                "coordination.prefix",
            ),
            ("cluster_name = \"a/b\"", "cluster_name"),
        ] {
            let e = with(section).unwrap_err().to_string();
            assert!(e.contains(key), "{section}: {e}");
        }
        let c = with("cluster_name = \"main\"\n[coordination]\netcd_endpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/x/\"").unwrap();
        assert!(c.coordination.enabled());
        assert_eq!(c.coordination.prefix_for(&c.cluster_name), "/x");
    }
}

//! The `[patroni]` section: `failover.mode = "patroni"` follows a
//! Patroni-managed cluster (see `cluster::patroni`): the primary is
//! Patroni's leader key in etcd, `PROMOTE NODE` is a Patroni switchover.

use std::time::Duration;

use serde::Deserialize;

use super::units::duration;
use super::{ConfigError, FailoverMode, invalid};

/// `[patroni]`: read only with `failover.mode = "patroni"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Patroni {
    /// Patroni's `scope` (its cluster name).
    pub scope: String,
    /// Patroni's `namespace` (its key prefix in etcd).
    pub namespace: String,
    /// etcd client URLs of Patroni's etcd (v3 API); empty: the
    /// `[coordination] etcd_endpoints`.
    pub etcd_endpoints: Vec<String>,
    /// Patroni REST API base URLs (`http://host:8008`), tried in order for
    /// a switchover when the leader's own `api_url` (from its member key)
    /// does not answer.
    pub rest_urls: Vec<String>,
    /// Limit for one etcd call, and for connecting to a REST API.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// How long `PROMOTE NODE` waits for Patroni's answer to
    /// `POST /switchover` (Patroni answers once the switchover is over).
    #[serde(deserialize_with = "duration")]
    pub switchover_timeout: Duration,
}

impl Default for Patroni {
    fn default() -> Self {
        Patroni {
            scope: String::new(),
            namespace: "/service".into(),
            etcd_endpoints: Vec::new(),
            rest_urls: Vec::new(),
            timeout: Duration::from_secs(2),
            switchover_timeout: Duration::from_secs(60),
        }
    }
}

impl Patroni {
    /// The prefix of the cluster's keys: `<namespace>/<scope>` (no trailing `/`).
    pub fn prefix(&self) -> String {
        format!(
            "{}/{}",
            self.namespace.trim_end_matches('/'),
            self.scope.trim_matches('/')
        )
    }
}

impl super::Config {
    /// The etcd endpoints Patroni mode reads: `[patroni]`'s, else
    /// `[coordination]`'s.
    pub fn patroni_etcd_endpoints(&self) -> &[String] {
        if self.patroni.etcd_endpoints.is_empty() {
            &self.coordination.etcd_endpoints
        } else {
            &self.patroni.etcd_endpoints
        }
    }

    /// Check `[patroni]` (only with `failover.mode = "patroni"`).
    pub(super) fn validate_patroni(&self) -> Result<(), ConfigError> {
        let p = &self.patroni;
        if self.failover.mode != FailoverMode::Patroni {
            return Ok(());
        }
        if p.scope.trim().is_empty() || p.scope.contains('/') {
            return Err(invalid(
                "patroni.scope",
                "failover.mode = \"patroni\" needs Patroni's scope (its cluster name, no `/`)",
            ));
        }
        if !p.namespace.starts_with('/') {
            return Err(invalid("patroni.namespace", "must start with `/`"));
        }
        if self.patroni_etcd_endpoints().is_empty() {
            return Err(invalid(
                "patroni.etcd_endpoints",
                "failover.mode = \"patroni\" needs Patroni's etcd: set patroni.etcd_endpoints (or [coordination] etcd_endpoints)",
            ));
        }
        for (i, e) in p.etcd_endpoints.iter().enumerate() {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() < 10 {
                return Err(invalid(
                    format!("patroni.etcd_endpoints[{i}]"),
                    format!("{e:?} is not an URL such as http://127.0.0.1:2379"),
                ));
            }
        }
        for (i, u) in p.rest_urls.iter().enumerate() {
            let rest = u.strip_prefix("http://").unwrap_or_default();
            if rest.is_empty() || rest.starts_with('/') {
                return Err(invalid(
                    format!("patroni.rest_urls[{i}]"),
                    format!(
                        "{u:?} is not a plain http URL such as http://127.0.0.1:8008 (https is not supported)"
                    ),
                ));
            }
        }
        for (key, d) in [
            ("patroni.timeout", p.timeout),
            ("patroni.switchover_timeout", p.switchover_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    fn with(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!(
            "[[backends]]\nhost = \"127.0.0.1\"\nport = 5432\n{extra}"
        ))
    }

    #[test]
    fn defaults_and_prefix() {
        let c = with("[failover]\nmode = \"patroni\"\n[patroni]\nscope = \"pg\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]").unwrap();
        assert_eq!(c.failover.mode, FailoverMode::Patroni);
        assert_eq!(c.patroni.prefix(), "/service/pg");
        assert_eq!(c.patroni.timeout, Duration::from_secs(2));
        assert_eq!(c.patroni.switchover_timeout, Duration::from_secs(60));
        // The endpoints default to [coordination]'s.
        let c = with("[failover]\nmode = \"patroni\"\n[patroni]\nscope = \"pg\"\nnamespace = \"/db/\"\n[coordination]\netcd_endpoints = [\"http://127.0.0.1:2379\"]").unwrap();
        assert_eq!(c.patroni_etcd_endpoints(), ["http://127.0.0.1:2379"]);
        assert_eq!(c.patroni.prefix(), "/db/pg");
        // Without patroni mode the section is not required.
        with("").unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let base = "[failover]\nmode = \"patroni\"\n[patroni]\n";
        let ep = "etcd_endpoints = [\"http://127.0.0.1:2379\"]\n";
        for (extra, key) in [
            (format!("{base}{ep}"), "patroni.scope"),
            (
                "[failover]\nmode = \"patroni\"".to_string(),
                "patroni.scope",
            ),
            (format!("{base}scope = \"pg\""), "patroni.etcd_endpoints"),
            (
                format!("{base}scope = \"pg\"\netcd_endpoints = [\"localhost\"]"),
                "patroni.etcd_endpoints[0]",
            ),
            (
                format!("{base}scope = \"pg\"\n{ep}namespace = \"service\""),
                "patroni.namespace",
            ),
            (
                format!("{base}scope = \"pg\"\n{ep}rest_urls = [\"https://h:8008\"]"),
                "patroni.rest_urls[0]",
            ),
            (
                format!("{base}scope = \"pg\"\n{ep}timeout = 0"),
                "patroni.timeout",
            ),
            (format!("{base}scope = \"pg\"\n{ep}bogus = 1"), "bogus"),
        ] {
            let e = with(&extra).unwrap_err().to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
    }
}

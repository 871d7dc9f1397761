//! The keys that decide who may try to log in, and how fast: `hba_file`,
//! `auth_failure_limit` and `auth_failure_max_delay` (top level), and the
//! `[auth_query]` section (checked in `auth_query`).
//!
//! The rules file is read as part of loading the configuration, so a reload
//! (SIGHUP) re-reads it, `pgpilot check` validates it, and a broken file
//! fails the whole load: the running configuration, rules included, stays.

use std::sync::Arc;
use std::time::Duration;

use super::hba::HbaRules;
use super::{Config, ConfigError, invalid};

pub(super) fn default_auth_failure_limit() -> u32 {
    10
}

pub(super) fn default_auth_failure_max_delay() -> Duration {
    Duration::from_secs(5)
}

impl Config {
    /// Check the access keys and read `hba_file` into [`Config::hba`].
    pub(super) fn validate_access(&mut self) -> Result<(), ConfigError> {
        if self.auth_failure_limit > 0 && self.auth_failure_max_delay < Duration::from_millis(100) {
            return Err(invalid(
                "auth_failure_max_delay",
                "must be at least 100ms (the first delay); turn throttling off with auth_failure_limit = 0",
            ));
        }
        self.auth_query.validate()?;
        self.hba = match &self.hba_file {
            None => None,
            Some(p) if p.as_os_str().is_empty() => {
                return Err(invalid(
                    "hba_file",
                    "must not be empty (leave the key out to let every listed user in from anywhere)",
                ));
            }
            Some(p) => Some(Arc::new(HbaRules::load(p)?)),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::hba::{Method, Peer};

    const BASE: &str = r#"
        listen = "127.0.0.1:9999"
        [[backends]]
        host = "127.0.0.1"
        [[users]]
        name = "app"
        password = "secret"
        auth = "md5"
    "#;

    #[test]
    fn defaults_and_checked_values() {
        let c = Config::from_toml(BASE).unwrap();
        assert_eq!(c.auth_failure_limit, 10);
        assert_eq!(c.auth_failure_max_delay, Duration::from_secs(5));
        assert!(c.hba.is_none());
        let e =
            Config::from_toml(&format!("auth_failure_max_delay = \"10ms\"\n{BASE}")).unwrap_err();
        assert!(e.to_string().contains("`auth_failure_max_delay`"), "{e}");
        let c = Config::from_toml(&format!(
            "auth_failure_limit = 0\nauth_failure_max_delay = 0\n{BASE}"
        ))
        .unwrap();
        assert_eq!(c.auth_failure_limit, 0);
        let e = Config::from_toml(&format!("hba_file = \"\"\n{BASE}")).unwrap_err();
        assert!(e.to_string().contains("`hba_file`"), "{e}");
    }

    #[test]
    fn hba_file_is_read_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hba.conf"), "host all all 10.0.0.0/8 md5\n").unwrap();
        let conf = dir.path().join("pgpilot.toml");
        std::fs::write(&conf, format!("hba_file = \"hba.conf\"\n{BASE}")).unwrap();
        let c = Config::load(&conf).unwrap();
        let peer = Peer {
            addr: "10.1.1.1".parse().unwrap(),
            tls: false,
            user: "app",
            database: "app",
        };
        let rules = c.hba.as_ref().expect("rules loaded");
        assert_eq!(rules.lookup(&peer).map(|v| v.method), Some(Method::Md5));
        // Under hba rules an md5 user also gets a SCRAM verifier: a
        // scram-sha-256 line may apply to it.
        assert!(c.users[0].verifier.is_some());
        // A broken file fails the load and names the key, file and line.
        std::fs::write(
            dir.path().join("hba.conf"),
            "host all all all md5\nhost all all all ldap\n",
        )
        .unwrap();
        let e = Config::load(&conf).unwrap_err().to_string();
        assert!(e.contains("`hba_file`") && e.contains("line 2"), "{e}");
        std::fs::remove_file(dir.path().join("hba.conf")).unwrap();
        let e = Config::load(&conf).unwrap_err().to_string();
        assert!(e.contains("`hba_file`") && e.contains("hba.conf"), "{e}");
    }
}

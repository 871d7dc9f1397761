//! `[auth_query]`: users not listed in `[[users]]` looked up on the primary,
//! as the `[monitor]` role, by a query returning the role's stored password,
//! expiry and login right. The keys are checked here; the lookup and its
//! cache are `auth::query`.

use std::time::Duration;

use serde::Deserialize;

use super::units::duration;
use super::{ConfigError, invalid};

/// The default lookup: a `SECURITY DEFINER` function the README shows how
/// to create, so the monitor role needs no read access to `pg_authid`.
pub const DEFAULT_AUTH_QUERY: &str =
    "SELECT usename, passwd, valuntil, canlogin FROM pgpilot.get_auth($1)";

/// Looking up users on the primary.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthQuery {
    /// Look up users who are not in `[[users]]`; off by default.
    pub enabled: bool,
    /// SQL with `$1` = the user name, returning at most one row of four
    /// columns: role name, stored password (`rolpassword`), valid until
    /// (timestamptz or NULL), can log in (boolean).
    pub query: String,
    /// Database the lookup connects to; empty: `monitor.database`.
    pub database: String,
    /// How long a found role's answer is used before it is looked up again.
    #[serde(deserialize_with = "duration")]
    pub cache: Duration,
    /// How long "no such role" is remembered (shorter: a role just created
    /// should not wait long).
    #[serde(deserialize_with = "duration")]
    pub negative_cache: Duration,
}

impl Default for AuthQuery {
    fn default() -> Self {
        AuthQuery {
            enabled: false,
            query: DEFAULT_AUTH_QUERY.into(),
            database: String::new(),
            cache: Duration::from_secs(60),
            negative_cache: Duration::from_secs(5),
        }
    }
}

impl AuthQuery {
    /// Check the keys (also when disabled: a reload that enables them
    /// should not be the first to find a mistake).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.query.trim().is_empty() {
            return Err(invalid("auth_query.query", "must not be empty"));
        }
        if !self.query.contains("$1") {
            return Err(invalid("auth_query.query", "must take the user name as $1"));
        }
        if self.negative_cache > self.cache {
            return Err(invalid(
                "auth_query.negative_cache",
                "must not be longer than auth_query.cache",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = "[[backends]]\nhost = \"127.0.0.1\"\n";

    #[test]
    fn off_by_default_with_the_function_query() {
        let c = Config::from_toml(BASE).unwrap();
        assert!(!c.auth_query.enabled);
        assert_eq!(c.auth_query.query, super::DEFAULT_AUTH_QUERY);
        assert_eq!(c.auth_query.cache, std::time::Duration::from_secs(60));
        let c = Config::from_toml(&format!(
            "{BASE}[auth_query]\nenabled = true\ncache = \"2s\"\nnegative_cache = \"1s\"\ndatabase = \"auth\"\n"
        ))
        .unwrap();
        assert!(c.auth_query.enabled);
        assert_eq!(c.auth_query.database, "auth");
        for (extra, key) in [
            ("query = \"\"", "auth_query.query"),
            ("query = \"SELECT 1\"", "auth_query.query"),
            ("cache = \"1s\"\nnegative_cache = \"2s\"", "negative_cache"),
            ("bogus = 1", "bogus"),
        ] {
            let e = Config::from_toml(&format!("{BASE}[auth_query]\n{extra}\n")).unwrap_err();
            assert!(e.to_string().contains(key), "{extra}: {e}");
        }
    }
}

//! The `[failover]` section: how pgpilot replaces a failed primary, and the
//! per-backend keys that go with it (`no_failover`, `trigger_file`).
//!
//! Kept apart from `config.rs` so the failover schema and its checks read as
//! one piece; the keys are documented with their defaults in
//! `conf/pgpilot.toml`.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, byte_size, duration, invalid};

/// How a standby is promoted when pgpilot replaces a failed primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailoverMode {
    /// `SELECT pg_promote(wait => true, wait_seconds => …)` on the candidate,
    /// as the `[monitor]` role (superuser, or `GRANT EXECUTE ON FUNCTION
    /// pg_promote(boolean, integer)`).
    #[default]
    PgPromote,
    /// Create the candidate's `backends[].trigger_file` (PostgreSQL ≤ 15
    /// `promote_trigger_file`); pgpilot must see the node's file system.
    TriggerFile,
    /// Run `failover.command` through `sh -c` with pgpool's placeholders.
    Command,
    /// Promote nothing: another agent (Patroni …) does; pgpilot only waits
    /// for exactly one node to report `pg_is_in_recovery() = false`.
    None,
    /// Follow Patroni (`[patroni]`): the primary is Patroni's leader key;
    /// pgpilot never promotes, follows, fences or rejoins, and `PROMOTE
    /// NODE` is a Patroni switchover (see `cluster::patroni`).
    Patroni,
}

impl FailoverMode {
    /// The spelling used in the configuration file and in messages.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FailoverMode::PgPromote => "pg_promote",
            FailoverMode::TriggerFile => "trigger_file",
            FailoverMode::Command => "command",
            FailoverMode::None => "none",
            FailoverMode::Patroni => "patroni",
        }
    }
}

/// How a fenced old primary (or a diverged standby) is rejoined as a
/// standby of the current primary (`REJOIN NODE`, `auto_rejoin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RejoinMode {
    /// Never: an operator rebuilds it and runs `ATTACH NODE`.
    #[default]
    Off,
    /// pgpilot stops it, runs `pg_rewind` against the primary, configures it
    /// as a standby and starts it (its `data_directory` must be on
    /// pgpilot's host).
    PgRewind,
    /// Run `failover.rejoin_command` (pgpool's placeholders), then wait for
    /// it to stream.
    Command,
}

impl RejoinMode {
    /// The spelling used in the configuration file and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            RejoinMode::Off => "off",
            RejoinMode::PgRewind => "pg_rewind",
            RejoinMode::Command => "command",
        }
    }
}

/// `[failover]`: detection, promotion, following, client waits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Failover {
    /// How the chosen standby is promoted.
    pub mode: FailoverMode,
    /// pgpool's `failover_command` (mode `"command"`): run through `sh -c`
    /// with `%d %h %p %D %m %H %M %P %r %R %N %S %%` expanded, so existing
    /// failover.sh scripts work unchanged.
    pub command: String,
    /// pgpool's `follow_primary_command`: run once per remaining standby
    /// after a promotion, instead of pgpilot's built-in re-pointing
    /// (`ALTER SYSTEM SET primary_conninfo` + `pg_reload_conf()`).
    pub follow_primary_command: String,
    /// Declare the primary failed as soon as a session sees its connection
    /// refused or reset *and* a direct probe confirms it cannot be reached,
    /// instead of waiting for the health check's retries. Why: with a busy
    /// primary, sessions notice a crash within milliseconds.
    pub detect_on_session_error: bool,
    /// Refuse to promote a candidate more than this many bytes of WAL behind
    /// the failed primary's last known position (Patroni's
    /// `maximum_lag_on_failover`); 0 = no limit.
    #[serde(deserialize_with = "byte_size")]
    pub max_lag_bytes: u64,
    /// After a promotion, how long pgpilot waits for exactly one node to
    /// report not-in-recovery before it gives up on this failover.
    #[serde(deserialize_with = "duration")]
    pub search_primary_timeout: Duration,
    /// How long new connections and requests that need the primary wait for
    /// one while a failover is in progress (instead of `pool.acquire_timeout`).
    #[serde(deserialize_with = "duration")]
    pub client_wait_timeout: Duration,
    /// Limit for the promotion step: `pg_promote`'s `wait_seconds`, and how
    /// long `command` may run before it is killed.
    #[serde(deserialize_with = "duration")]
    pub promote_timeout: Duration,
    /// How long `follow_primary_command` may run, and how long a re-pointed
    /// standby has to stream from the new primary before it is marked down.
    #[serde(deserialize_with = "duration")]
    pub follow_timeout: Duration,
    /// `PROMOTE NODE` (switchover): how long to wait for in-flight
    /// transactions on the old primary, then for the target to catch up.
    #[serde(deserialize_with = "duration")]
    pub switchover_timeout: Duration,
    /// Drop a physical replication slot on the primary once it has been
    /// stale this long (inactive, and the `primary_slot_name` of no
    /// in-service standby), so a node that is gone does not make the primary
    /// keep WAL without bound; 0 = never (stale slots are only reported).
    #[serde(deserialize_with = "duration")]
    pub drop_stale_slots_after: Duration,
    /// How a fenced old primary is rejoined as a standby: `off` (an
    /// operator does it), `pg_rewind` or `command`.
    pub rejoin: RejoinMode,
    /// Rejoin a fenced old primary without an operator once it is reachable
    /// again (or found stopped with its data directory reachable).
    pub auto_rejoin: bool,
    /// `rejoin = "command"`: run through `sh -c` with pgpool's placeholders
    /// (`%d` the node to rejoin, `%m`/`%H`/`%r`/`%R` the primary), like
    /// pgpool's `recovery_1st_stage_command`; it must leave the node running
    /// as a standby of the primary.
    pub rejoin_command: String,
    /// Limit for a rejoin's steps: pg_rewind (or the command), then the
    /// node streaming from the primary.
    #[serde(deserialize_with = "duration")]
    pub rejoin_timeout: Duration,
    /// Where pg_ctl, pg_rewind and pg_controldata are; empty: the
    /// `/usr/lib/postgresql/<version>/bin` of the data directory's version,
    /// else `pg_config --bindir`, else `PATH`.
    pub pg_bindir: String,
    /// At start, with no primary but standbys that were streaming, promote
    /// the most advanced standby after `search_primary_timeout`.
    pub promote_at_start: bool,
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            mode: FailoverMode::PgPromote,
            command: String::new(),
            follow_primary_command: String::new(),
            detect_on_session_error: true,
            max_lag_bytes: 0,
            search_primary_timeout: Duration::from_secs(60),
            client_wait_timeout: Duration::from_secs(30),
            promote_timeout: Duration::from_secs(60),
            follow_timeout: Duration::from_secs(30),
            switchover_timeout: Duration::from_secs(30),
            drop_stale_slots_after: Duration::ZERO,
            rejoin: RejoinMode::Off,
            auto_rejoin: false,
            rejoin_command: String::new(),
            rejoin_timeout: Duration::from_secs(300),
            pg_bindir: String::new(),
            promote_at_start: false,
        }
    }
}

/// The placeholder letters pgpool defines for its hooks.
pub(crate) const PLACEHOLDERS: &str = "dhpDmHMPrRNS%";

/// The first `%x` in `command` whose `x` is not a pgpool placeholder.
fn bad_placeholder(command: &str) -> Option<String> {
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some(x) if PLACEHOLDERS.contains(x) => {}
                Some(x) => return Some(format!("%{x}")),
                None => return Some("%".into()),
            }
        }
    }
    None
}

impl super::Config {
    /// Check `[failover]` and the per-backend failover keys.
    pub(super) fn validate_failover(&self) -> Result<(), ConfigError> {
        let f = &self.failover;
        for (key, d) in [
            ("failover.search_primary_timeout", f.search_primary_timeout),
            ("failover.client_wait_timeout", f.client_wait_timeout),
            ("failover.promote_timeout", f.promote_timeout),
            ("failover.follow_timeout", f.follow_timeout),
            ("failover.switchover_timeout", f.switchover_timeout),
            ("failover.rejoin_timeout", f.rejoin_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if f.promote_timeout > Duration::from_secs(3600) {
            return Err(invalid("failover.promote_timeout", "must be at most 1h"));
        }
        for (key, cmd) in [
            ("failover.command", &f.command),
            ("failover.follow_primary_command", &f.follow_primary_command),
            ("failover.rejoin_command", &f.rejoin_command),
        ] {
            if let Some(p) = bad_placeholder(cmd) {
                return Err(invalid(
                    key,
                    format!(
                        "unknown placeholder {p:?}: use %d %h %p %D %m %H %M %P %r %R %N %S or %%"
                    ),
                ));
            }
        }
        if f.mode == FailoverMode::Command && f.command.trim().is_empty() {
            return Err(invalid(
                "failover.command",
                "mode = \"command\" needs a command (pgpool's failover_command)",
            ));
        }
        if f.rejoin == RejoinMode::Command && f.rejoin_command.trim().is_empty() {
            return Err(invalid(
                "failover.rejoin_command",
                "rejoin = \"command\" needs a command (like pgpool's recovery_1st_stage_command)",
            ));
        }
        if f.auto_rejoin && f.rejoin == RejoinMode::Off {
            return Err(invalid(
                "failover.auto_rejoin",
                "needs failover.rejoin = \"pg_rewind\" or \"command\"",
            ));
        }
        for (i, b) in self.backends.iter().enumerate() {
            let relative = !b.trigger_file.is_empty() && !b.trigger_file.starts_with('/');
            if relative && b.data_directory.is_empty() {
                return Err(invalid(
                    format!("backends[{i}].trigger_file"),
                    "a relative path needs backends[].data_directory (or give an absolute path)",
                ));
            }
            if f.mode == FailoverMode::TriggerFile && !b.no_failover && b.trigger_file.is_empty() {
                return Err(invalid(
                    format!("backends[{i}].trigger_file"),
                    "failover.mode = \"trigger_file\" needs the node's promote_trigger_file path (or no_failover = true)",
                ));
            }
        }
        Ok(())
    }
}

impl super::Backend {
    /// The trigger file as an absolute path (relative ones are under
    /// `data_directory`, as PostgreSQL resolves `promote_trigger_file`).
    pub fn trigger_path(&self) -> Option<std::path::PathBuf> {
        if self.trigger_file.is_empty() {
            return None;
        }
        let p = std::path::Path::new(&self.trigger_file);
        Some(if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::path::Path::new(&self.data_directory).join(p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    const BASE: &str = r#"
        [[backends]]
        host = "127.0.0.1"
        port = 5432
        data_directory = "/pg/0"
        [[backends]]
        host = "127.0.0.1"
        port = 5433
        data_directory = "/pg/1"
        trigger_file = "promote.trigger"
    "#;

    #[test]
    fn defaults() {
        let c = Config::from_toml(BASE).unwrap();
        let f = &c.failover;
        assert_eq!(f.mode, FailoverMode::PgPromote);
        assert!(f.detect_on_session_error);
        assert_eq!(f.max_lag_bytes, 0);
        assert_eq!(f.client_wait_timeout, Duration::from_secs(30));
        assert_eq!(f.drop_stale_slots_after, Duration::ZERO);
        assert_eq!(f.rejoin, RejoinMode::Off);
        assert!(!f.auto_rejoin && !f.promote_at_start);
        assert_eq!(f.rejoin_timeout, Duration::from_secs(300));
        assert!(!c.backends[0].no_failover);
        assert_eq!(c.backends[0].trigger_path(), None);
        assert_eq!(
            c.backends[1].trigger_path().unwrap(),
            std::path::Path::new("/pg/1/promote.trigger")
        );
    }

    #[test]
    fn values_are_checked_and_errors_name_the_key() {
        let c = Config::from_toml(&format!(
            "{BASE}\n[failover]\nmode = \"command\"\ncommand = \"/x/failover.sh %d %P %H %R %%\"\nmax_lag_bytes = \"16MB\"\ndrop_stale_slots_after = \"1h\""
        ))
        .unwrap();
        assert_eq!(c.failover.mode, FailoverMode::Command);
        assert_eq!(c.failover.drop_stale_slots_after, Duration::from_secs(3600));
        assert_eq!(c.failover.max_lag_bytes, 16 << 20);
        for (extra, key) in [
            ("[failover]\nmode = \"command\"", "failover.command"),
            ("[failover]\nmode = \"bogus\"", "mode"),
            ("[failover]\ncommand = \"x %q\"", "failover.command"),
            (
                "[failover]\nfollow_primary_command = \"x %\"",
                "failover.follow_primary_command",
            ),
            (
                "[failover]\nclient_wait_timeout = 0",
                "failover.client_wait_timeout",
            ),
            ("[failover]\nmax_lag_bytes = \"lots\"", "max_lag_bytes"),
            (
                "[failover]\ndrop_stale_slots_after = \"soon\"",
                "drop_stale_slots_after",
            ),
            (
                "[failover]\nmode = \"trigger_file\"",
                "backends[0].trigger_file",
            ),
            ("[failover]\nbogus = 1", "bogus"),
            (
                "[failover]\nrejoin = \"command\"",
                "failover.rejoin_command",
            ),
            ("[failover]\nauto_rejoin = true", "failover.auto_rejoin"),
            ("[failover]\nrejoin = \"rsync\"", "rejoin"),
            (
                "[failover]\nrejoin_command = \"r %x\"",
                "failover.rejoin_command",
            ),
        ] {
            let e = Config::from_toml(&format!("{BASE}\n{extra}")).unwrap_err();
            assert!(e.to_string().contains(key), "{extra}: {e}");
        }
        let no_dir = BASE.replace("data_directory = \"/pg/1\"", "");
        let e = Config::from_toml(&no_dir).unwrap_err();
        assert!(e.to_string().contains("backends[1].trigger_file"), "{e}");
        // no_failover nodes need no trigger file.
        let ok = BASE.replace("port = 5432", "port = 5432\nno_failover = true");
        Config::from_toml(&format!("{ok}\n[failover]\nmode = \"trigger_file\"")).unwrap();
    }
}

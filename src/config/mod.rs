//! Configuration: the TOML schema, defaults, and validation at load.
//!
//! Every key is documented in `conf/pgpilot.toml`. Unknown keys are rejected
//! (`deny_unknown_fields`) and every value is checked by [`Config::validate`],
//! whose errors name the offending key. Durations are written as `"500ms"`,
//! `"5s"`, `"2m"`, `"1h"`, or a bare number of seconds; `0` turns an optional
//! timeout off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use hba::{HbaError, HbaRules};

mod access;
mod auth_query;
mod checks;
mod coordination;
mod failover;
pub(crate) mod hba;
mod node_id;
mod patroni;
mod routing;
pub mod tls;
mod units;

pub use auth_query::{AuthQuery, DEFAULT_AUTH_QUERY};
pub use checks::{HealthCheck, MetricsConfig, SrCheck};
pub use coordination::Coordination;
pub use failover::{Failover, FailoverMode, RejoinMode};
pub use node_id::NodeId;
pub use patroni::Patroni;
pub use routing::{BalanceInTransaction, ConsistencyMode, Routing, UnknownFunctions};
use units::{byte_size, duration};
pub use units::{parse_byte_size, parse_duration};

/// A configuration that could not be loaded; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Path given on the command line.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// TOML syntax error, unknown key or wrong type (toml's message names the key).
    #[error("{0}")]
    Parse(String),
    /// A value is out of range or inconsistent.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// Dotted key path, e.g. `backends[1].port`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// `hba_file` could not be read or has a line pgpilot cannot use.
    #[error("invalid `hba_file`: {0}")]
    Hba(#[from] HbaError),
    /// A `[tls]` or `[backend_tls]` setting or file could not be used.
    #[error("invalid TLS settings: {0}")]
    Tls(String),
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address:port clients connect to.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Most client connections at once; the next gets SQLSTATE 53300.
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: usize,
    /// Largest message (bytes) accepted from a client; checked on the length prefix.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// Runtime worker threads; 0 = one per CPU core. Needs a restart to change.
    #[serde(default)]
    pub worker_threads: usize,
    /// Backend connection pool settings.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Network timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// The PostgreSQL nodes; `node_id` is the position in this list.
    pub backends: Vec<Backend>,
    /// Users allowed to connect through pgpilot.
    #[serde(default)]
    pub users: Vec<User>,
    /// Role used by pgpilot's own checks of the nodes.
    #[serde(default)]
    pub monitor: Monitor,
    /// Read/write routing.
    #[serde(default)]
    pub routing: Routing,
    /// Users allowed to run admin commands (`SHOW POOL_NODES` ...) on the client
    /// port; `"*"` allows every user. Empty (the default): nobody.
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Per-node health checks (reachability, role, hysteresis before `down`).
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Replication checks (LSNs, lag) and lag-weighted balancing.
    #[serde(default)]
    pub sr_check: SrCheck,
    /// Prometheus `/metrics` and `/healthz` over HTTP.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Replacing a failed primary: detection, promotion, following, client waits.
    #[serde(default)]
    pub failover: Failover,
    /// The cluster's name: the default etcd key prefix is
    /// `/pgpilot/<cluster_name>`.
    #[serde(default = "coordination::default_cluster_name")]
    pub cluster_name: String,
    /// Several pgpilots agreeing through etcd; off by default.
    #[serde(default)]
    pub coordination: Coordination,
    /// A Patroni-managed cluster followed (`failover.mode = "patroni"`).
    #[serde(default)]
    pub patroni: Patroni,
    /// Client authentication rules in pg_hba.conf format, relative to the
    /// config file's directory. Absent: every listed user, from anywhere, by
    /// its `auth`.
    #[serde(default)]
    pub hba_file: Option<PathBuf>,
    /// Failed logins a minute from one client address before their answers
    /// are delayed; 0 turns throttling off.
    #[serde(default = "access::default_auth_failure_limit")]
    pub auth_failure_limit: u32,
    /// The longest such delay (it doubles from 100 ms).
    #[serde(
        default = "access::default_auth_failure_max_delay",
        deserialize_with = "duration"
    )]
    pub auth_failure_max_delay: Duration,
    /// Users not in `[[users]]` looked up on the primary.
    #[serde(default)]
    pub auth_query: AuthQuery,
    /// The rules read from `hba_file` at load.
    #[serde(skip)]
    pub hba: Option<Arc<HbaRules>>,
    /// TLS towards clients.
    #[serde(default)]
    pub tls: tls::TlsSettings,
    /// The `[tls]` files, read at load (so SIGHUP re-reads them); `None`
    /// when TLS is off.
    #[serde(skip)]
    pub tls_server: Option<Arc<tls::TlsServer>>,
    /// TLS towards the nodes (pooled connections and the monitor role's).
    #[serde(default)]
    pub backend_tls: tls::BackendTlsSettings,
    /// The `[backend_tls]` files, read at load; `None` when disabled.
    #[serde(skip)]
    pub backend_tls_client: Option<Arc<tls::BackendTls>>,
}

/// Backend connection pool settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// When a session gives its server connections back: at its end, or after
    /// each transaction while it holds no session state.
    pub mode: PoolMode,
    /// Most backend connections pgpilot opens to one node (all users and databases).
    pub max_connections_per_node: usize,
    /// Idle pooled connections older than this are closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// How long a session waits for a backend connection before SQLSTATE 53300.
    #[serde(deserialize_with = "duration")]
    pub acquire_timeout: Duration,
    /// Statement that resets a connection a session used before it is reused.
    pub reset_query: String,
    /// Most named prepared statements one server connection keeps; past this
    /// the least recently used are closed (they cost server memory per connection).
    pub max_prepared_statements: usize,
    /// Under transaction pooling, a client idle this long between
    /// transactions (no server connection, plain TCP) is parked: its session
    /// shrinks to what it must keep and waits in the runtime's parking lot
    /// rather than in a task of its own. 0 = never.
    #[serde(deserialize_with = "duration")]
    pub park_idle_after: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            max_connections_per_node: 90,
            idle_timeout: Duration::from_secs(600),
            acquire_timeout: Duration::from_secs(5),
            reset_query: "DISCARD ALL".into(),
            max_prepared_statements: 200,
            park_idle_after: Duration::from_secs(1),
        }
    }
}

impl MetricsConfig {
    /// `listen`, parsed; `None` when it is empty (metrics off).
    pub(crate) fn addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let l = self.listen.trim();
        if l.is_empty() {
            return Ok(None);
        }
        l.parse().map(Some).map_err(|e| {
            invalid(
                "metrics.listen",
                format!("{l:?} is not address:port or empty ({e})"),
            )
        })
    }
}

/// How long a session keeps its server connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// For the whole client session (pgpool's and PgBouncer's session pooling).
    Session,
    /// Between transactions a session holds no server connection, unless it
    /// has session state (a setting, a prepared statement, a temporary table,
    /// LISTEN, an advisory lock …): from then on it keeps its connections.
    Transaction,
}

/// Network timeouts. Zero disables the optional ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect to a node.
    #[serde(deserialize_with = "duration")]
    pub connect: Duration,
    /// Whole startup + authentication exchange, with a client or with a node.
    #[serde(deserialize_with = "duration")]
    pub auth: Duration,
    /// A write to a client or node that makes no progress for this long fails.
    #[serde(deserialize_with = "duration")]
    pub write: Duration,
    /// Close a client idle (between transactions) this long; 0 = never.
    #[serde(deserialize_with = "duration")]
    pub client_idle: Duration,
    /// Close a client idle inside a transaction this long; 0 = never.
    #[serde(deserialize_with = "duration")]
    pub idle_in_transaction: Duration,
    /// Resetting a released connection (`reset_query`); on timeout it is closed.
    #[serde(deserialize_with = "duration")]
    pub reset: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            auth: Duration::from_secs(15),
            write: Duration::from_secs(60),
            client_idle: Duration::ZERO,
            idle_in_transaction: Duration::ZERO,
            reset: Duration::from_secs(5),
        }
    }
}

/// One PostgreSQL node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Relative load-balance weight (0 = never used for balanced reads).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// `application_name` the node uses in `primary_conninfo` (pg_stat_replication).
    #[serde(default)]
    pub application_name: String,
    /// Data directory on the node's host, for failover hooks (`%D`, `%R`).
    #[serde(default)]
    pub data_directory: String,
    /// Never promote this node automatically (pgpool's
    /// `DISALLOW_TO_FAILOVER`): e.g. a standby in another data centre or one
    /// without the hardware for the write load.
    #[serde(default)]
    pub no_failover: bool,
    /// `promote_trigger_file` of this node (PostgreSQL ≤ 15), for
    /// `failover.mode = "trigger_file"`; relative to `data_directory`.
    #[serde(default)]
    pub trigger_file: String,
}

/// Client authentication method for a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum AuthMethod {
    /// SCRAM-SHA-256 (default).
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// MD5 challenge (needs `password`).
    #[serde(rename = "md5")]
    Md5,
    /// No password asked.
    #[serde(rename = "trust")]
    Trust,
}

/// A user allowed through pgpilot.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Role name, as clients send it and as used on the nodes.
    pub name: String,
    /// Password pgpilot uses to log in to the nodes (and to check clients when no
    /// verifier is given).
    #[serde(default)]
    pub password: Option<String>,
    /// SCRAM-SHA-256 verifier (as in `pg_authid`) to check clients against.
    #[serde(default)]
    pub scram_verifier: Option<String>,
    /// How clients authenticate.
    #[serde(default)]
    pub auth: AuthMethod,
    /// The SCRAM-SHA-256 verifier in PostgreSQL's text form, derived at load
    /// (from `scram_verifier`, checked, or from `password`); the handshake
    /// parses it (`protocol::auth::ScramVerifier::parse`).
    #[serde(skip)]
    pub verifier: Option<String>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("auth", &self.auth)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Role used for pgpilot's own queries to the nodes (roles, health, replication).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Monitor {
    /// Role name.
    pub user: String,
    /// Its password (empty for trust).
    pub password: String,
    /// Database it connects to.
    pub database: String,
    /// Timeout for pgpilot's other queries as this role (`pg_proc` volatility,
    /// the WAL positions behind read-your-writes).
    /// Health and replication checks have their own timeouts.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// `[backend_tls]` as loaded (a copy, for the monitor role's
    /// connections, which get `Monitor` alone).
    #[serde(skip)]
    pub tls: Option<Arc<tls::BackendTls>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor {
            user: "postgres".into(),
            password: String::new(),
            database: "postgres".into(),
            timeout: Duration::from_secs(3),
            tls: None,
        }
    }
}

fn default_listen() -> String {
    "0.0.0.0:9999".into()
}
fn default_max_client_conn() -> usize {
    1000
}
fn default_max_message_size() -> usize {
    256 << 20
}
fn default_pg_port() -> u16 {
    5432
}
fn default_weight() -> f64 {
    1.0
}

impl Config {
    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        // Files the config names are found next to it, wherever pgpilot runs.
        if let (Some(hba), Some(dir)) = (&cfg.hba_file, path.parent())
            && hba.is_relative()
            && !hba.as_os_str().is_empty()
        {
            cfg.hba_file = Some(dir.join(hba));
        }
        if let Some(dir) = path.parent() {
            cfg.tls.resolve(dir);
            cfg.backend_tls.resolve(dir);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse and validate TOML text (a relative `hba_file` is taken from the
    /// working directory).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The listen address, parsed.
    pub(crate) fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|e| {
            invalid(
                "listen",
                format!("{:?} is not address:port ({e})", self.listen),
            )
        })
    }

    /// Look a user up by name.
    pub(crate) fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    /// Check every value, and derive what is derived at load (SCRAM verifiers).
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.tls_server = self.tls.load().map_err(ConfigError::Tls)?;
        self.backend_tls_client = self.backend_tls.load().map_err(ConfigError::Tls)?;
        self.monitor.tls = self.backend_tls_client.clone();
        self.coordination.validate(&self.cluster_name)?;
        if self.max_client_conn == 0 {
            return Err(invalid("max_client_conn", "must be at least 1"));
        }
        if self.max_message_size < 1024 || self.max_message_size > i32::MAX as usize {
            return Err(invalid(
                "max_message_size",
                "must be between 1024 and 2147483647 bytes",
            ));
        }
        if self.pool.max_connections_per_node == 0 {
            return Err(invalid(
                "pool.max_connections_per_node",
                "must be at least 1",
            ));
        }
        if self.pool.max_prepared_statements == 0 {
            return Err(invalid(
                "pool.max_prepared_statements",
                "must be at least 1",
            ));
        }
        if self.pool.acquire_timeout.is_zero() {
            return Err(invalid("pool.acquire_timeout", "must be greater than 0"));
        }
        for (key, d) in [
            ("timeouts.connect", self.timeouts.connect),
            ("timeouts.auth", self.timeouts.auth),
            ("timeouts.write", self.timeouts.write),
            ("timeouts.reset", self.timeouts.reset),
            ("monitor.timeout", self.monitor.timeout),
            ("health_check.period", self.health_check.period),
            ("health_check.timeout", self.health_check.timeout),
            ("sr_check.timeout", self.sr_check.timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.backends.is_empty() {
            return Err(invalid(
                "backends",
                "at least one [[backends]] entry is required",
            ));
        }
        for (i, b) in self.backends.iter().enumerate() {
            if b.host.trim().is_empty() {
                return Err(invalid(format!("backends[{i}].host"), "must not be empty"));
            }
            if b.port == 0 {
                return Err(invalid(format!("backends[{i}].port"), "must be 1..65535"));
            }
            if !(b.weight.is_finite() && b.weight >= 0.0) {
                return Err(invalid(
                    format!("backends[{i}].weight"),
                    "must be a number >= 0",
                ));
            }
            if self.backends[..i]
                .iter()
                .any(|o| o.host == b.host && o.port == b.port)
            {
                return Err(invalid(
                    format!("backends[{i}]"),
                    format!("{}:{} is listed twice", b.host, b.port),
                ));
            }
        }
        for i in 0..self.users.len() {
            let key = |f: &str| format!("users[{i}].{f}");
            let name = self.users[i].name.clone();
            if name.is_empty() {
                return Err(invalid(key("name"), "must not be empty"));
            }
            if self.users[..i].iter().any(|u| u.name == name) {
                return Err(invalid(
                    key("name"),
                    format!("user {name:?} is listed twice"),
                ));
            }
            let u = &mut self.users[i];
            if u.password.is_none() && u.scram_verifier.is_none() && u.auth != AuthMethod::Trust {
                return Err(invalid(
                    key("password"),
                    "a password (or scram_verifier) is required unless auth = \"trust\"",
                ));
            }
            if u.auth == AuthMethod::Md5 && u.password.is_none() {
                return Err(invalid(
                    key("password"),
                    "auth = \"md5\" needs the password",
                ));
            }
            u.verifier = match (&u.scram_verifier, &u.password) {
                (Some(v), _) if is_scram_verifier(v) => Some(v.clone()),
                (Some(_), _) => {
                    return Err(invalid(
                        key("scram_verifier"),
                        "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>",
                    ));
                }
                // Under hba rules a scram-sha-256 line may apply to any user.
                (None, Some(p)) if u.auth == AuthMethod::ScramSha256 || self.hba_file.is_some() => {
                    Some(postgres_protocol::password::scram_sha_256(p.as_bytes()))
                }
                _ => None,
            };
        }
        if self.monitor.user.is_empty() {
            return Err(invalid("monitor.user", "must not be empty"));
        }
        for (key, list) in [
            ("routing.write_functions", &self.routing.write_functions),
            (
                "routing.read_only_functions",
                &self.routing.read_only_functions,
            ),
        ] {
            if let Some(bad) = list.iter().find(|f| f.trim().is_empty() || f.contains('.')) {
                return Err(invalid(
                    key,
                    format!("{bad:?}: give plain function names (no schema, not empty)"),
                ));
            }
        }
        if let Some(bad) =
            self.routing.primary_relations.iter().find(|r| {
                r.split('.').count() > 2 || r.split('.').any(|part| part.trim().is_empty())
            })
        {
            return Err(invalid(
                "routing.primary_relations",
                format!("{bad:?}: give \"name\" or \"schema.name\""),
            ));
        }
        if self.routing.unlogged_cache_ttl.is_zero() {
            return Err(invalid(
                "routing.unlogged_cache_ttl",
                "must be more than 0 (turn the check off with check_unlogged_tables = false)",
            ));
        }
        if self.health_check.max_retries > 100 {
            return Err(invalid("health_check.max_retries", "must be 0..100"));
        }
        if !self.sr_check.period.is_zero() && self.sr_check.period < Duration::from_millis(100) {
            return Err(invalid(
                "sr_check.period",
                "must be 0 (off) or at least 100ms",
            ));
        }
        if self.health_check.period < Duration::from_millis(100) {
            return Err(invalid("health_check.period", "must be at least 100ms"));
        }
        for (i, u) in self.admin_users.iter().enumerate() {
            if u.is_empty() {
                return Err(invalid(format!("admin_users[{i}]"), "must not be empty"));
            }
        }
        self.metrics_addr()?;
        self.validate_failover()?;
        self.validate_patroni()?;
        self.validate_access()?;
        Ok(())
    }

    /// The metrics listen address, parsed; `None` when `metrics.listen` is empty.
    pub(crate) fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.metrics.addr()
    }

    /// Whether `user` may run admin commands (`admin_users`, `"*"` = everyone).
    pub(crate) fn is_admin(&self, user: &str) -> bool {
        self.admin_users.iter().any(|u| u == "*" || u == user)
    }
}

/// Whether `s` is a SCRAM-SHA-256 verifier as PostgreSQL stores it
/// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64, keys
/// of 32 bytes). The configuration checks the form at load, so a reload with a
/// bad one is refused; `protocol::auth::ScramVerifier::parse` reads it at login.
fn is_scram_verifier(s: &str) -> bool {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    let key = |k: &str| B64.decode(k).is_ok_and(|k| k.len() == 32);
    let Some((params, keys)) = s
        .strip_prefix("SCRAM-SHA-256$")
        .and_then(|rest| rest.split_once('$'))
    else {
        return false;
    };
    let (Some((iterations, salt)), Some((stored, server))) =
        (params.split_once(':'), keys.split_once(':'))
    else {
        return false;
    };
    iterations.parse::<u32>().is_ok_and(|i| i > 0)
        && B64.decode(salt).is_ok()
        && key(stored)
        && key(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        listen = "127.0.0.1:9999"
        [[backends]]
        host = "127.0.0.1"
        port = 5432
        [[users]]
        name = "app"
        password = "secret"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.backends[0].weight, 1.0);
        assert_eq!(c.pool.acquire_timeout, Duration::from_secs(5));
        assert_eq!(c.pool.park_idle_after, Duration::from_secs(1));
        assert!(c.users[0].verifier.is_some());
        assert_eq!(c.monitor.user, "postgres");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = Config::from_toml(&format!("{MINIMAL}\nbogus = 1")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::from_toml(&MINIMAL.replace("port = 5432", "port = 0")).unwrap_err();
        assert!(e.to_string().contains("backends[0].port"), "{e}");
        let e = Config::from_toml(&format!(
            "{MINIMAL}\n[pool]\nacquire_timeout = \"5 parsecs\""
        ))
        .unwrap_err();
        assert!(e.to_string().contains("acquire_timeout"), "{e}");
        let e = Config::from_toml(&format!("{MINIMAL}\n[pool]\npark_idle_after = \"soon\""))
            .unwrap_err();
        assert!(e.to_string().contains("park_idle_after"), "{e}");
        let e = Config::from_toml(&MINIMAL.replace("password = \"secret\"", "")).unwrap_err();
        assert!(e.to_string().contains("users[0].password"), "{e}");
    }

    #[test]
    fn monitoring_sections_have_defaults_and_checked_values() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.health_check.period, Duration::from_secs(1));
        assert_eq!(c.health_check.max_retries, 2);
        assert!(c.health_check.auto_failback);
        assert_eq!(c.sr_check.period, Duration::from_secs(1));
        assert_eq!(c.sr_check.half_weight_lag_bytes, 16 << 20);
        assert_eq!(c.sr_check.delay_threshold, 0);
        assert_eq!(
            c.metrics_addr().unwrap(),
            Some("127.0.0.1:9930".parse().unwrap())
        );
        assert!(!c.is_admin("app"));

        let c = Config::from_toml(&format!(
            "admin_users = [\"ops\"]\n{MINIMAL}\n[sr_check]\ndelay_threshold = \"1MB\"\nperiod = 0\n[metrics]\nlisten = \"\""
        ))
        .unwrap();
        assert_eq!(c.sr_check.delay_threshold, 1 << 20);
        assert!(c.sr_check.period.is_zero());
        assert_eq!(c.metrics_addr().unwrap(), None);
        assert!(c.is_admin("ops") && !c.is_admin("app"));

        for (extra, key) in [
            ("[health_check]\nperiod = 0", "health_check.period"),
            ("[health_check]\ntimeout = 0", "health_check.timeout"),
            (
                "[health_check]\nmax_retries = 1000",
                "health_check.max_retries",
            ),
            ("[sr_check]\nperiod = \"10ms\"", "sr_check.period"),
            (
                "[sr_check]\ndelay_threshold = \"12 parsecs\"",
                "delay_threshold",
            ),
            ("[sr_check]\nbogus = 1", "bogus"),
            ("[metrics]\nlisten = \"nowhere\"", "metrics.listen"),
            ("[monitor]\nrole_check_period = \"2s\"", "role_check_period"),
        ] {
            let e = Config::from_toml(&format!("{MINIMAL}\n{extra}")).unwrap_err();
            assert!(e.to_string().contains(key), "{extra}: {e}");
        }
        let e = Config::from_toml(&format!("admin_users = [\"\"]\n{MINIMAL}")).unwrap_err();
        assert!(e.to_string().contains("admin_users[0]"), "{e}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("100"), Some(100));
        assert_eq!(parse_byte_size("16MB"), Some(16 << 20));
        assert_eq!(parse_byte_size("512 kB"), Some(512 << 10));
        assert_eq!(parse_byte_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_byte_size("1.5MB"), None);
        assert_eq!(parse_byte_size("-1"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let text = include_str!("../../conf/pgpilot.toml");
        Config::from_toml(text).unwrap();
    }
}

//! `auth_query`: the stored password, expiry and login right of a user who
//! is not in `[[users]]`, looked up on the primary as the `[monitor]` role,
//! and cached.
//!
//! The lookup connection is opened with `search_path = pg_catalog` as a
//! startup option, which outranks any `ALTER ROLE … SET search_path` of the
//! monitor role, so nobody who can create objects in another schema can
//! shadow what the query names. One connection serves every lookup (it is
//! reopened when the primary moves or it breaks), and one lookup per user
//! name is in flight at a time: a storm of logins, even of unknown names,
//! opens no connection each. Answers are kept for `auth_query.cache` (a role)
//! or `auth_query.negative_cache` (no such role); a reload forgets them all.
//!
//! What the answer means for a login is the handshake's business: this module
//! only reports the role as stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::OnceCell;
use tokio::task::JoinHandle;
use tokio_postgres::types::{FromSql, Type};

use crate::config::{AuthQuery, Backend, Monitor};

/// Most user names remembered; past this, expired answers are dropped, and
/// if that is not enough, all of them (a storm of made-up names cannot grow
/// the cache without bound).
const MAX_ENTRIES: usize = 10_000;

/// After a failed attempt to connect, lookups fail at once for this long
/// instead of each trying again while the primary is down.
const CONNECT_BACKOFF: Duration = Duration::from_secs(1);

/// A role as the primary stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredRole {
    /// Role name as returned by the query.
    pub(crate) name: String,
    /// Its password.
    pub(crate) password: StoredPassword,
    /// `rolvaliduntil` in microseconds since 2000-01-01 UTC (PostgreSQL's
    /// own count; `i64::MAX` is `infinity`); `None`: no expiry.
    pub(crate) valid_until: Option<i64>,
    /// `rolcanlogin`.
    pub(crate) can_login: bool,
}

/// A stored password, in the forms PostgreSQL keeps.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum StoredPassword {
    /// A SCRAM-SHA-256 verifier (`SCRAM-SHA-256$…`).
    Scram(String),
    /// An MD5 hash, `md5` followed by 32 hex digits of md5(password + user).
    Md5(String),
    /// None, or a form pgpilot cannot use: no password matches.
    Unusable,
}

impl std::fmt::Debug for StoredPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.write_str(match self {
            StoredPassword::Scram(_) => "Scram",
            StoredPassword::Md5(_) => "Md5",
            StoredPassword::Unusable => "Unusable",
        })
    }
}

impl StoredPassword {
    /// Read `rolpassword`.
    pub(crate) fn from_stored(text: Option<&str>) -> StoredPassword {
        match text {
            Some(v) if crate::protocol::auth::ScramVerifier::parse(v).is_some() => {
                StoredPassword::Scram(v.to_string())
            }
            Some(v)
                if v.len() == 35
                    && v.starts_with("md5")
                    && v[3..].bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                StoredPassword::Md5(v.to_ascii_lowercase())
            }
            _ => StoredPassword::Unusable,
        }
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

impl StoredRole {
    /// Whether the password has expired at `now` (`rolvaliduntil` in the
    /// past: PostgreSQL then refuses it as a wrong password).
    pub(crate) fn expired(&self, now: SystemTime) -> bool {
        let Some(until) = self.valid_until else {
            return false;
        };
        let now_us = match now.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(_) => 0,
        };
        until < now_us.saturating_sub(PG_EPOCH_US)
    }
}

/// What the primary said about a user name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The role exists.
    Role(Arc<StoredRole>),
    /// No such role (the query returned no row).
    NoSuchRole,
}

/// Why a lookup could not be answered: the client is told the lookup failed,
/// never that its password was wrong.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum LookupError {
    /// No node is the primary now.
    #[error("no primary to look the user up on")]
    NoPrimary,
    /// The lookup connection could not be opened.
    #[error("cannot connect to the primary to look the user up: {0}")]
    Connect(String),
    /// The query failed.
    #[error("the auth_query failed: {0}")]
    Query(String),
    /// The query returned something else than four columns of the expected types.
    #[error("the auth_query returned {0}")]
    Shape(String),
    /// No answer within `monitor.timeout`.
    #[error("the user lookup timed out")]
    Timeout,
}

/// A timestamp column read as PostgreSQL's microseconds, infinities included
/// (no conversion that could overflow).
struct PgMicros(i64);

impl<'a> FromSql<'a> for PgMicros {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        postgres_protocol::types::timestamp_from_sql(raw).map(PgMicros)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TIMESTAMPTZ | Type::TIMESTAMP)
    }
}

/// The kept lookup connection.
struct Conn {
    /// Query handle.
    client: tokio_postgres::Client,
    /// The query, prepared once per connection.
    statement: tokio_postgres::Statement,
    /// Everything it was opened with: another primary, role, database or
    /// query means another connection.
    key: ConnKey,
    /// Drives the connection; aborted when it is dropped.
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

#[derive(Debug, Clone, PartialEq)]
struct ConnKey {
    host: String,
    port: u16,
    user: String,
    database: String,
    query: String,
}

/// One user name's answer, shared by the logins that wait for it.
#[derive(Default)]
struct Slot {
    /// Filled by the first lookup that succeeds; the others wait for it.
    answer: OnceCell<(Answer, Instant)>,
}

/// The lookups and their cache; one per running proxy.
#[derive(Default)]
pub(crate) struct AuthLookup {
    /// User name → its answer (or the lookup in flight).
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// The lookup connection (one opening at a time).
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// When opening it last failed, and why.
    failed: Mutex<Option<(Instant, String)>>,
    /// Lookups sent to the primary (tests and logs).
    queries: std::sync::atomic::AtomicU64,
}

/// Where and how a lookup runs.
pub(crate) struct LookupTarget<'a> {
    /// The primary now.
    pub(crate) primary: Option<&'a Backend>,
    /// The role it runs as.
    pub(crate) monitor: &'a Monitor,
    /// The query, its database and cache times.
    pub(crate) settings: &'a AuthQuery,
}

impl AuthLookup {
    /// The answer for `user`: cached, or looked up (once, for every login
    /// waiting for it), within `monitor.timeout`.
    pub(crate) async fn lookup(
        &self,
        target: &LookupTarget<'_>,
        user: &str,
    ) -> Result<Answer, LookupError> {
        let slot = self.slot(user, target.settings);
        let (answer, _) = slot
            .answer
            .get_or_try_init(|| async {
                let work = self.fetch(target, user);
                let answer = tokio::time::timeout(target.monitor.timeout, work)
                    .await
                    .map_err(|_| LookupError::Timeout)??;
                Ok::<_, LookupError>((answer, Instant::now()))
            })
            .await?;
        Ok(answer.clone())
    }

    /// Forget every answer (a reload: passwords may have changed).
    pub(crate) fn clear(&self) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// How many lookups reached the primary.
    pub(crate) fn queries_sent(&self) -> u64 {
        self.queries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The slot of `user`: the cached one while its answer is fresh (or
    /// being looked up), else a new one.
    fn slot(&self, user: &str, settings: &AuthQuery) -> Arc<Slot> {
        let now = Instant::now();
        let fresh = |s: &Slot| match s.answer.get() {
            None => true,
            Some((Answer::Role(_), at)) => now.duration_since(*at) < settings.cache,
            Some((Answer::NoSuchRole, at)) => now.duration_since(*at) < settings.negative_cache,
        };
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(user).filter(|s| fresh(s)) {
            return s.clone();
        }
        if slots.len() >= MAX_ENTRIES && !slots.contains_key(user) {
            slots.retain(|_, s| fresh(s));
            if slots.len() >= MAX_ENTRIES {
                slots.clear();
            }
        }
        let s = Arc::new(Slot::default());
        slots.insert(user.to_string(), s.clone());
        s
    }

    /// Run the query for `user` on the primary.
    async fn fetch(&self, target: &LookupTarget<'_>, user: &str) -> Result<Answer, LookupError> {
        let conn = self.connection(target).await?;
        self.queries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rows = match conn.client.query(&conn.statement, &[&user]).await {
            Ok(rows) => rows,
            Err(e) => {
                // The next lookup starts from a new connection (this one may
                // be broken, or hold a statement prepared for another query).
                let mut held = self.conn.lock().await;
                if held.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                    *held = None;
                }
                return Err(LookupError::Query(describe(&e)));
            }
        };
        let Some(row) = rows.first() else {
            return Ok(Answer::NoSuchRole);
        };
        if row.len() < 4 {
            return Err(LookupError::Shape(format!(
                "{} columns; it must return role name, password, valid until, can login",
                row.len()
            )));
        }
        let shape = |e: tokio_postgres::Error| LookupError::Shape(e.to_string());
        let name: Option<String> = row.try_get(0).map_err(shape)?;
        let password: Option<String> = row.try_get(1).map_err(shape)?;
        let valid_until: Option<PgMicros> = row.try_get(2).map_err(shape)?;
        let can_login: Option<bool> = row.try_get(3).map_err(shape)?;
        Ok(Answer::Role(Arc::new(StoredRole {
            name: name.unwrap_or_else(|| user.to_string()),
            password: StoredPassword::from_stored(password.as_deref()),
            valid_until: valid_until.map(|m| m.0),
            can_login: can_login.unwrap_or(false),
        })))
    }

    /// The lookup connection to the current primary, opened if needed.
    async fn connection(&self, target: &LookupTarget<'_>) -> Result<Arc<Conn>, LookupError> {
        let primary = target.primary.ok_or(LookupError::NoPrimary)?;
        let s = target.settings;
        let key = ConnKey {
            host: primary.host.clone(),
            port: primary.port,
            user: target.monitor.user.clone(),
            database: if s.database.is_empty() {
                target.monitor.database.clone()
            } else {
                s.database.clone()
            },
            query: s.query.clone(),
        };
        let mut held = self.conn.lock().await;
        if let Some(c) = held.as_ref()
            && c.key == key
            && !c.client.is_closed()
        {
            return Ok(c.clone());
        }
        *held = None;
        if let Some((at, why)) = &*self.failed.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < CONNECT_BACKOFF
        {
            return Err(LookupError::Connect(why.clone()));
        }
        let opened = open(primary, target.monitor, key).await;
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        match opened {
            Ok(c) => {
                *failed = None;
                let c = Arc::new(c);
                *held = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                if let LookupError::Connect(why) = &e {
                    *failed = Some((Instant::now(), why.clone()));
                }
                Err(e)
            }
        }
    }
}

/// A tokio-postgres error as a sentence: the server's message when the
/// server sent one (its Display says only "db error"), with the cause else.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Open a lookup connection with `search_path` fixed to `pg_catalog` and
/// prepare the query on it.
async fn open(primary: &Backend, monitor: &Monitor, key: ConnKey) -> Result<Conn, LookupError> {
    let mut pg = crate::cluster::monitor_conn_config(primary, monitor, "pgpilot-auth-query");
    pg.dbname(&key.database)
        .options("-c search_path=pg_catalog");
    // [backend_tls] applies to the lookup as to every monitor connection.
    let (client, connection) = crate::cluster::monitor_conn::connect(&pg, monitor.tls.as_deref())
        .await
        .map_err(|e| LookupError::Connect(describe(&e)))?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "auth_query connection ended with an error");
        }
    });
    let statement = match client.prepare(&key.query).await {
        Ok(s) => s,
        Err(e) => {
            driver.abort();
            return Err(LookupError::Query(describe(&e)));
        }
    };
    Ok(Conn {
        client,
        statement,
        key,
        driver,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_passwords_are_told_apart() {
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(matches!(
            StoredPassword::from_stored(Some(&v)),
            StoredPassword::Scram(_)
        ));
        let md5 = "md5ABCDEF0123456789abcdef0123456789";
        assert_eq!(
            StoredPassword::from_stored(Some(md5)),
            StoredPassword::Md5(md5.to_ascii_lowercase())
        );
        for bad in [None, Some(""), Some("md5xyz"), Some("plaintext")] {
            assert_eq!(StoredPassword::from_stored(bad), StoredPassword::Unusable);
        }
    }

    #[test]
    fn expiry_follows_valid_until() {
        let role = |valid_until| StoredRole {
            name: "u".into(),
            password: StoredPassword::Unusable,
            valid_until,
            can_login: true,
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let now_pg = 1_700_000_000 * 1_000_000 - PG_EPOCH_US;
        assert!(!role(None).expired(now));
        assert!(!role(Some(i64::MAX)).expired(now));
        assert!(role(Some(i64::MIN)).expired(now));
        assert!(role(Some(now_pg - 1)).expired(now));
        assert!(!role(Some(now_pg + 1_000_000)).expired(now));
    }

    #[test]
    fn the_cache_is_bounded_and_answers_expire() {
        let lookup = AuthLookup::default();
        let settings = AuthQuery {
            cache: Duration::from_secs(60),
            negative_cache: Duration::ZERO,
            ..AuthQuery::default()
        };
        let a = lookup.slot("a", &settings);
        // In flight: the same slot for every login of that name.
        assert!(Arc::ptr_eq(&a, &lookup.slot("a", &settings)));
        a.answer.set((Answer::NoSuchRole, Instant::now())).unwrap();
        // A negative answer kept for zero seconds is looked up again.
        assert!(!Arc::ptr_eq(&a, &lookup.slot("a", &settings)));
        let b = lookup.slot("b", &settings);
        let role = Arc::new(StoredRole {
            name: "b".into(),
            password: StoredPassword::Unusable,
            valid_until: None,
            can_login: true,
        });
        b.answer.set((Answer::Role(role), Instant::now())).unwrap();
        assert!(Arc::ptr_eq(&b, &lookup.slot("b", &settings)));
        lookup.clear();
        assert!(!Arc::ptr_eq(&b, &lookup.slot("b", &settings)));
        for i in 0..MAX_ENTRIES + 10 {
            lookup.slot(&format!("u{i}"), &settings);
        }
        assert!(lookup.slots.lock().unwrap().len() <= MAX_ENTRIES);
    }
}

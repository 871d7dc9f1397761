//! Relations a hot standby refuses to read: unlogged tables (and sequences),
//! and views or partitioned tables over them.
//!
//! An unlogged relation holds its data on the primary only; a standby answers
//! every read of it with `0A000 cannot access temporary or unlogged relations
//! during recovery`. A read naming such a relation is routed to the primary,
//! as pgpool-II does with `check_unlogged_table`.
//!
//! The classifier reports the relations a read names ([`RelationName`]); this
//! module answers whether any of them is unlogged, looking names up once on the
//! primary (as the monitor role, in the session's database) and caching the
//! answers per (database, name). The lookup follows views (through their
//! rewrite rules' dependencies) and partitioned or inherited tables down to the
//! tables they read. An unqualified name is judged over every schema (the
//! session's `search_path` is not known here): if any relation of that name is
//! unlogged the read goes to the primary, which is never wrong, only sometimes
//! unneeded. A name `pg_class` does not know is remembered as logged.
//!
//! Answers expire after a short TTL (changes made around pgpilot), and a
//! database's answers are forgotten whenever a statement that may change the
//! catalog runs through pgpilot, both when it is sent and when its session is
//! next idle (a DDL in a transaction is seen by others only at COMMIT). A lookup
//! started before such a change is not stored after it (a per-database
//! generation). After a failed lookup the read goes to the primary, and its
//! names count as logged until the TTL ends (a lookup is not attempted for
//! every read while the primary or the monitor role cannot answer); a standby's
//! refusal of one of them is retried on the primary (the session's safety
//! net).
//!
//! The lookup itself is [`CatalogQueries::unlogged_relations`], implemented
//! where connections live (`session::catalog_io`); the router does no I/O.

use super::catalog::{CatalogError, CatalogQueries};
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// At most this many answers are kept over all databases; past it the cache
/// starts again (clients naming ever new relations cannot grow it without bound).
const MAX_ENTRIES: usize = 10_000;

/// A relation as a statement names it, folded as PostgreSQL folds identifiers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RelationName {
    /// The schema, if the name is qualified.
    pub(crate) schema: Option<String>,
    /// The relation's name.
    pub(crate) name: String,
}

/// One database's answers.
#[derive(Debug, Default)]
struct DbAnswers {
    /// Bumped whenever the answers are forgotten (see the module docs).
    generation: u64,
    /// Unlogged (or reads something unlogged), and when that was looked up.
    /// Every balanced read looks its relations up here: a fast seeded hash.
    by_name: HashMap<RelationName, (bool, Instant), foldhash::fast::RandomState>,
}

#[derive(Debug, Default)]
struct Answers {
    by_db: HashMap<String, DbAnswers>,
    /// Answers held, over all databases.
    entries: usize,
}

/// Cache of "reads an unlogged relation" per (database, relation name).
#[derive(Debug, Default)]
pub(crate) struct RelationCatalog {
    answers: RwLock<Answers>,
}

/// A cached verdict on a statement's relations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Some relation is unlogged: the primary must run the read.
    Unlogged,
    /// Every relation is known to be logged.
    Logged,
    /// Some answer is missing or expired: look these names up first.
    Unknown,
}

impl RelationCatalog {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Answers> {
        self.answers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Answers> {
        self.answers.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached verdict on `names` in `database` at `now` (answers older than
    /// `ttl` count as missing).
    pub(crate) fn cached(
        &self,
        database: &str,
        names: &[RelationName],
        now: Instant,
        ttl: Duration,
    ) -> Verdict {
        let answers = self.read();
        let Some(db) = answers.by_db.get(database) else {
            return Verdict::Unknown;
        };
        let mut verdict = Verdict::Logged;
        for n in names {
            match db.by_name.get(n) {
                Some((unlogged, at)) if now.saturating_duration_since(*at) < ttl => {
                    if *unlogged {
                        return Verdict::Unlogged;
                    }
                }
                _ => verdict = Verdict::Unknown,
            }
        }
        verdict
    }

    /// Look up the names of `names` not answered (or expired), on `primary`,
    /// and remember the answers. Errors are returned (and logged by the
    /// caller); the names count as logged until the TTL ends then.
    pub(crate) async fn look_up(
        &self,
        database: &str,
        names: &[RelationName],
        queries: &impl CatalogQueries,
        ttl: Duration,
    ) -> Result<(), CatalogError> {
        let now = Instant::now();
        let (generation, missing) = {
            let answers = self.read();
            let db = answers.by_db.get(database);
            let missing: Vec<RelationName> = names
                .iter()
                .filter(|n| {
                    db.and_then(|d| d.by_name.get(*n))
                        .is_none_or(|(_, at)| now.saturating_duration_since(*at) >= ttl)
                })
                .cloned()
                .collect();
            (db.map_or(0, |d| d.generation), missing)
        };
        if missing.is_empty() {
            return Ok(());
        }
        let found = queries
            .unlogged_relations(database, &missing)
            .await
            .and_then(|v| {
                if v.len() == missing.len() {
                    Ok(v)
                } else {
                    Err(CatalogError::WrongCount {
                        rows: v.len(),
                        names: missing.len(),
                    })
                }
            });
        let mut answers = self.write();
        if answers.entries + missing.len() > MAX_ENTRIES {
            *answers = Answers::default();
        }
        let Answers { by_db, entries } = &mut *answers;
        let db = by_db.entry(database.to_string()).or_default();
        if db.generation != generation {
            // The catalog may have changed while the lookup ran.
            return found.map(drop);
        }
        // A failed lookup is not repeated for every read until the TTL ends:
        // the names count as logged meanwhile (the standby's refusal of an
        // unlogged one is retried on the primary, see session::retry).
        let verdicts = match &found {
            Ok(v) => v.clone(),
            Err(_) => vec![false; missing.len()],
        };
        for (name, unlogged) in missing.into_iter().zip(verdicts) {
            if db.by_name.insert(name, (unlogged, now)).is_none() {
                *entries += 1;
            }
        }
        found.map(drop)
    }

    /// Forget `database`'s answers: a statement that may change the catalog
    /// ran (or is about to) there.
    pub(crate) fn invalidate(&self, database: &str) {
        let mut answers = self.write();
        let Answers { by_db, entries } = &mut *answers;
        if let Some(db) = by_db.get_mut(database) {
            db.generation += 1;
            *entries -= db.by_name.len();
            db.by_name.clear();
        }
    }

    /// Cached answers (for tests and admin views).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.read().entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> RelationName {
        RelationName {
            schema: None,
            name: s.to_string(),
        }
    }

    fn put(c: &RelationCatalog, db: &str, n: &str, unlogged: bool, at: Instant) {
        let mut a = c.write();
        a.by_db
            .entry(db.to_string())
            .or_default()
            .by_name
            .insert(name(n), (unlogged, at));
        a.entries += 1;
    }

    #[test]
    fn verdicts_expire_and_are_per_database() {
        let c = RelationCatalog::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        put(&c, "db1", "logged", false, t0);
        put(&c, "db1", "unl", true, t0);
        let v = |db, names: &[&str], at| {
            let names: Vec<_> = names.iter().map(|n| name(n)).collect();
            c.cached(db, &names, at, ttl)
        };
        assert_eq!(v("db1", &["logged"], t0), Verdict::Logged);
        assert_eq!(v("db1", &["logged", "unl"], t0), Verdict::Unlogged);
        assert_eq!(v("db1", &["logged", "other"], t0), Verdict::Unknown);
        assert_eq!(v("db2", &["logged"], t0), Verdict::Unknown);
        // Answers expire.
        let later = t0 + ttl;
        assert_eq!(v("db1", &["logged"], later), Verdict::Unknown);
        assert_eq!(v("db1", &["unl"], later), Verdict::Unknown);
        c.invalidate("db1");
        assert_eq!(v("db1", &["unl"], t0), Verdict::Unknown);
        assert_eq!(c.len(), 0);
    }
}

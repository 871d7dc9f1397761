//! Catalog-aware function classification: a function on no list is looked up
//! once in `pg_proc` (on the primary, as the monitor role, in the session's
//! database) and treated as a write when it is volatile — pgpool-II's default.
//! Answers are cached per (database, function), up to a bound (a name
//! `pg_proc` does not know is remembered as volatile: the call fails on the
//! primary with PostgreSQL's own error); a failed lookup is not cached and
//! counts as "volatile".
//!
//! The router does no I/O: the lookups themselves go through
//! [`CatalogQueries`], implemented where connections live
//! (`session::catalog_io`, on a connection of its own as the monitor role).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use super::relations::RelationName;

/// The catalog queries the router's caches ([`FunctionCatalog`],
/// [`RelationCatalog`](super::relations::RelationCatalog)) need answered on
/// the primary, in the session's database.
pub(crate) trait CatalogQueries: Sync {
    /// Of `names`, the functions `pg_proc` knows, and whether any function of
    /// that name is volatile. A name it does not know is absent.
    fn volatile_functions(
        &self,
        database: &str,
        names: &[String],
    ) -> impl Future<Output = Result<HashMap<String, bool>, CatalogError>> + Send;

    /// Whether each of `names` (in order) is an unlogged relation or reads
    /// one, through views' rewrite rules and inheritance (partitions); one
    /// answer per name.
    fn unlogged_relations(
        &self,
        database: &str,
        names: &[RelationName],
    ) -> impl Future<Output = Result<Vec<bool>, CatalogError>> + Send;
}

/// A catalog lookup on the primary failed; the caller routes to the primary
/// (and logs this).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CatalogError {
    /// Connecting or the query failed (the client library's error).
    #[error("{0}")]
    Query(Box<dyn std::error::Error + Send + Sync>),
    /// No answer within `monitor.timeout`.
    #[error("timed out")]
    Timeout,
    /// The answer does not match the question (one row per name expected).
    #[error("{rows} answers for {names} names")]
    WrongCount {
        /// Rows returned.
        rows: usize,
        /// Names asked.
        names: usize,
    },
}

/// At most this many answers are kept; past it the cache starts again, so
/// clients calling ever new (e.g. nonexistent) function names cannot grow it
/// without bound.
const MAX_ENTRIES: usize = 10_000;

/// Cache of `pg_proc.provolatile = 'v'` per (database, function name).
#[derive(Debug, Default)]
pub(crate) struct FunctionCatalog {
    volatile: Mutex<Answers>,
}

/// Answers by database, then function name (looked up without allocating).
#[derive(Debug, Default)]
struct Answers {
    by_db: HashMap<String, HashMap<String, bool>>,
    /// Answers held, over all databases.
    entries: usize,
}

impl Answers {
    fn get(&self, database: &str, name: &str) -> Option<bool> {
        self.by_db.get(database)?.get(name).copied()
    }

    fn insert(&mut self, database: &str, name: &str, volatile: bool) {
        if self.entries >= MAX_ENTRIES {
            *self = Answers::default();
        }
        let names = self.by_db.entry(database.to_string()).or_default();
        if names.insert(name.to_string(), volatile).is_none() {
            self.entries += 1;
        }
    }

    /// `Some(true)` if any of `names` is known volatile, `Some(false)` if all
    /// are known not to be, `None` if a lookup is needed.
    fn verdict(&self, database: &str, names: &[String]) -> Option<bool> {
        let mut all_known = true;
        for n in names {
            match self.get(database, n) {
                Some(true) => return Some(true),
                Some(false) => {}
                None => all_known = false,
            }
        }
        all_known.then_some(false)
    }
}

impl FunctionCatalog {
    fn answers(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.volatile.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True if any of `names` is volatile (or unknown to the catalog, or the lookup
    /// failed): then the statement must run on the primary.
    pub(crate) async fn any_volatile(
        &self,
        database: &str,
        names: &[String],
        queries: &impl CatalogQueries,
    ) -> bool {
        let missing: Vec<String> = {
            let answers = self.answers();
            if answers.verdict(database, names) == Some(true) {
                return true;
            }
            names
                .iter()
                .filter(|n| answers.get(database, n).is_none())
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            return false;
        }
        match queries.volatile_functions(database, &missing).await {
            Ok(found) => {
                let mut answers = self.answers();
                let mut any = false;
                for n in &missing {
                    // A name pg_proc does not know is treated as volatile (the call
                    // will fail anyway; the primary reports it).
                    let v = found.get(n).copied().unwrap_or(true);
                    any |= v;
                    answers.insert(database, n, v);
                }
                any
            }
            Err(e) => {
                tracing::warn!(error = %e, "pg_proc lookup failed; routing to the primary");
                true
            }
        }
    }

    /// The cached answer for `names`: `Some(true)` if any is known volatile,
    /// `Some(false)` if all are known not to be, `None` if a lookup is needed.
    pub(crate) fn cached(&self, database: &str, names: &[String]) -> Option<bool> {
        self.answers().verdict(database, names)
    }

    /// Forget every answer (after a configuration reload).
    pub(crate) fn clear(&self) {
        *self.answers() = Answers::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_per_database_and_bounded() {
        let mut a = Answers::default();
        a.insert("db1", "f", false);
        a.insert("db1", "g", true);
        a.insert("db2", "f", true);
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(a.verdict("db1", &names(&["f"])), Some(false));
        assert_eq!(a.verdict("db1", &names(&["f", "g"])), Some(true));
        assert_eq!(a.verdict("db2", &names(&["f"])), Some(true));
        assert_eq!(a.verdict("db1", &names(&["f", "h"])), None);
        assert_eq!(a.entries, 3);
        // Ever new names never hold more than MAX_ENTRIES answers.
        for i in 0..3 * MAX_ENTRIES {
            a.insert("db1", &format!("junk_{i}"), true);
            assert!(a.entries <= MAX_ENTRIES);
        }
        let held: usize = a.by_db.values().map(HashMap::len).sum();
        assert_eq!(held, a.entries);
    }
}

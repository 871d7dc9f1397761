//! Catalog-aware function classification: a function on no list is looked up
//! once in `pg_proc` (on the primary, as the monitor role, in the session's
//! database) and treated as a write when it is volatile — pgpool-II's default.
//! Answers are cached per (database, function) for the life of the process
//! (a name `pg_proc` does not know is remembered as volatile: the call fails on
//! the primary with PostgreSQL's own error); a failed lookup is not cached and
//! counts as "volatile".

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::{Backend, Monitor};

/// Cache of `pg_proc.provolatile = 'v'` per (database, function name).
#[derive(Debug, Default)]
pub struct FunctionCatalog {
    volatile: Mutex<HashMap<(String, String), bool>>,
}

impl FunctionCatalog {
    /// True if any of `names` is volatile (or unknown to the catalog, or the lookup
    /// failed): then the statement must run on the primary.
    pub async fn any_volatile(
        &self,
        database: &str,
        names: &[String],
        primary: &Backend,
        monitor: &Monitor,
    ) -> bool {
        let key = |n: &String| (database.to_string(), n.clone());
        let missing: Vec<String> = {
            let cache = self.volatile.lock().unwrap_or_else(|p| p.into_inner());
            if names.iter().any(|n| cache.get(&key(n)) == Some(&true)) {
                return true;
            }
            names
                .iter()
                .filter(|n| !cache.contains_key(&key(n)))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            return false;
        }
        match lookup(database, &missing, primary, monitor).await {
            Ok(found) => {
                let mut cache = self.volatile.lock().unwrap_or_else(|p| p.into_inner());
                let mut any = false;
                for n in &missing {
                    // A name pg_proc does not know is treated as volatile (the call
                    // will fail anyway; the primary reports it).
                    let v = found.get(n).copied().unwrap_or(true);
                    any |= v;
                    cache.insert(key(n), v);
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
    pub fn cached(&self, database: &str, names: &[String]) -> Option<bool> {
        let cache = self.volatile.lock().unwrap_or_else(|p| p.into_inner());
        let mut all_known = true;
        for n in names {
            match cache.get(&(database.to_string(), n.clone())) {
                Some(true) => return Some(true),
                Some(false) => {}
                None => all_known = false,
            }
        }
        all_known.then_some(false)
    }

    /// Forget every answer (after a configuration reload).
    pub fn clear(&self) {
        self.volatile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Cached entries (for tests and admin views).
    pub fn len(&self) -> usize {
        self.volatile.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// No cached entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn lookup(
    database: &str,
    names: &[String],
    primary: &Backend,
    monitor: &Monitor,
) -> Result<HashMap<String, bool>, String> {
    let mut cfg = crate::cluster::monitor_conn_config(primary, monitor, "pgpilot-catalog");
    cfg.dbname(database);
    let work = async {
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        let task = tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT proname::text, bool_or(provolatile = 'v') FROM pg_proc \
                 WHERE proname = ANY($1) GROUP BY proname",
                &[&names],
            )
            .await;
        drop(client);
        task.abort();
        rows
    };
    let rows = tokio::time::timeout(monitor.timeout, work)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1)))
        .collect())
}

//! The catalog lookups the router's caches need (`pg_proc` volatility,
//! unlogged relations), run where connections live: on the primary, in the
//! session's database, as the monitor role, on a connection of its own,
//! within `monitor.timeout`. The router states what it needs
//! ([`CatalogQueries`]) and caches the answers; it opens nothing itself.

use std::collections::HashMap;

use crate::config::{Backend, Monitor};
use crate::router::catalog::{CatalogError, CatalogQueries};
use crate::router::relations::RelationName;

/// The catalog of the node `primary` (the session's idea of the primary now).
pub(super) struct PrimaryCatalog<'a> {
    /// Where the lookup runs.
    pub(super) primary: &'a Backend,
    /// The role and time limit it runs with.
    pub(super) monitor: &'a Monitor,
}

impl CatalogQueries for PrimaryCatalog<'_> {
    async fn volatile_functions(
        &self,
        database: &str,
        names: &[String],
    ) -> Result<HashMap<String, bool>, CatalogError> {
        let rows = self
            .query(
                database,
                "SELECT proname::text, bool_or(provolatile = 'v') FROM pg_proc \
                 WHERE proname = ANY($1) GROUP BY proname",
                &[&names],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1)))
            .collect())
    }

    async fn unlogged_relations(
        &self,
        database: &str,
        names: &[RelationName],
    ) -> Result<Vec<bool>, CatalogError> {
        let schemas: Vec<&str> = names
            .iter()
            .map(|n| n.schema.as_deref().unwrap_or(""))
            .collect();
        let rels: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
        let rows = self
            .query(database, UNLOGGED_SQL, &[&schemas, &rels])
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, bool>(1)).collect())
    }
}

impl PrimaryCatalog<'_> {
    /// Run one catalog query on the primary, in `database`, as the monitor
    /// role, on a connection of its own, within `monitor.timeout`.
    async fn query(
        &self,
        database: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, CatalogError> {
        let mut cfg =
            crate::cluster::monitor_conn_config(self.primary, self.monitor, "pgpilot-catalog");
        cfg.dbname(database);
        let work = async {
            let tls = self.monitor.tls.as_deref();
            let (client, conn) = crate::cluster::monitor_conn::connect(&cfg, tls).await?;
            let task = tokio::spawn(conn);
            let rows = client.query(sql, params).await;
            drop(client);
            task.abort();
            rows
        };
        tokio::time::timeout(self.monitor.timeout, work)
            .await
            .map_err(|_| CatalogError::Timeout)?
            .map_err(|e| CatalogError::Query(Box::new(e)))
    }
}

/// Whether each of `names` (in order) is an unlogged relation or reads one,
/// through views' rewrite rules and inheritance (partitions).
const UNLOGGED_SQL: &str = "\
WITH RECURSIVE wanted AS (
    SELECT s, r, i FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS w(s, r, i)
), edge AS (
    SELECT rw.ev_class AS parent, d.refobjid AS child
      FROM pg_catalog.pg_rewrite rw
      JOIN pg_catalog.pg_depend d
        ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = rw.oid
       AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid <> rw.ev_class
    UNION ALL
    SELECT inhparent, inhrelid FROM pg_catalog.pg_inherits
), rel(i, oid) AS (
    SELECT w.i, c.oid FROM wanted w
      JOIN pg_catalog.pg_class c ON c.relname = w.r
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE w.s = '' OR n.nspname = w.s
    UNION
    SELECT rel.i, edge.child FROM rel JOIN edge ON edge.parent = rel.oid
)
SELECT w.i, coalesce(bool_or(c.relpersistence = 'u'), false)
  FROM wanted w
  LEFT JOIN rel ON rel.i = w.i
  LEFT JOIN pg_catalog.pg_class c ON c.oid = rel.oid
 GROUP BY w.i ORDER BY w.i";

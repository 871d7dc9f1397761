//! The `[routing]` section: read/write splitting and read-your-writes.

use std::time::Duration;

use serde::Deserialize;

use super::units::duration;

/// What to do with a function called by a read that is on no list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownFunctions {
    /// Look up `pg_proc.provolatile` once (cached): volatile → primary (pgpool's default).
    #[default]
    Lookup,
    /// Treat every unknown function as a write (primary).
    Write,
    /// Treat unknown functions as read-only (standby allowed).
    Read,
}

/// Read-your-writes guarantee for reads sent to standbys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyMode {
    /// A session's reads see its own committed writes (default).
    #[default]
    Session,
    /// Every read sees every write pgpilot acknowledged to any client before it.
    Global,
    /// Reads go to standbys by weight and lag only; they may see the past.
    Eventual,
}

/// Read/write routing settings (`[routing]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    /// Send reads to standbys at all; false = everything on the primary.
    pub load_balance: bool,
    /// Let the primary serve balanced reads too, with its own `weight`.
    pub primary_in_read_pool: bool,
    /// `"off"`: a read-write transaction runs wholly on the primary. `"transaction"`:
    /// pgpool's behaviour, reads in a transaction go to the standby until its first write.
    pub disable_load_balance_on_write: BalanceInTransaction,
    /// Functions that write, in addition to the built-in list.
    pub write_functions: Vec<String>,
    /// If non-empty, allow-list mode: only these (and built-in read-only functions) may
    /// run on a standby; any other function call sends the statement to the primary.
    pub read_only_functions: Vec<String>,
    /// Functions on no list: `"lookup"` (pg_proc volatility), `"write"` or `"read"`.
    pub unknown_functions: UnknownFunctions,
    /// Relations whose reads run on the primary, beyond the built-in node-local
    /// views (statistics, activity, locks, replication ...): `"name"` (any
    /// schema) or `"schema.name"`, written as PostgreSQL folds them.
    pub primary_relations: Vec<String>,
    /// Classifications cached (by normalised statement text); 0 disables the cache.
    pub cache_size: usize,
    /// `"session"`, `"global"` or `"eventual"` (see [`ConsistencyMode`]).
    pub consistency: ConsistencyMode,
    /// How long a read may wait for a standby to replay what it must see before it
    /// is sent to the primary instead; 0 = never wait.
    #[serde(deserialize_with = "duration")]
    pub consistency_wait: Duration,
    /// Send reads of unlogged relations (and of views over them) to the primary,
    /// as pgpool-II's `check_unlogged_table`: a hot standby refuses them.
    pub check_unlogged_tables: bool,
    /// How long an answer of the unlogged-relation lookup is trusted (changes
    /// made around pgpilot; DDL through pgpilot forgets answers at once).
    #[serde(deserialize_with = "duration")]
    pub unlogged_cache_ttl: Duration,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            load_balance: true,
            primary_in_read_pool: false,
            disable_load_balance_on_write: Default::default(),
            write_functions: Vec::new(),
            read_only_functions: Vec::new(),
            unknown_functions: UnknownFunctions::Lookup,
            primary_relations: Vec::new(),
            cache_size: 10_000,
            consistency: ConsistencyMode::Session,
            consistency_wait: Duration::from_millis(20),
            check_unlogged_tables: true,
            unlogged_cache_ttl: Duration::from_secs(10),
        }
    }
}

/// pgpool's `disable_load_balance_on_write`, restricted to the two safe-to-explain modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceInTransaction {
    /// Default: a read-write transaction runs entirely on the primary.
    #[default]
    Off,
    /// pgpool's default: reads in a transaction go to the standby until its first
    /// write. The reads do not see the transaction's snapshot or its writes.
    Transaction,
}

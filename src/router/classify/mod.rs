//! The statement classifier: may a SQL string run on a standby, and what does it
//! leave behind in the session?
//!
//! This module owns the read/write decision for SQL text ([`Classifier`],
//! [`SqlParserClassifier`]), the function lists it uses ([`FunctionPolicy`],
//! [`DEFAULT_WRITE_FUNCTIONS`], [`READ_ONLY_FUNCTIONS`]) and the result type
//! ([`Classification`]). It does not track tables, sessions or nodes.
//!
//! # The rule above all
//! A write must never be routed to a standby, so every doubt is a
//! [`Access::Write`]: parse failures, statement types not known to be reads,
//! functions on the write list, and anything unexpected. Only a short list of
//! statement kinds can ever be a read, checked both on the syntax tree and on the
//! first word of the statement.
//!
//! # How a string is classified
//! 1. [`split_statements`] splits the string at top-level `;` exactly as PostgreSQL would
//!    (quotes, dollar quotes, nested comments, `BEGIN ATOMIC ... END` bodies).
//! 2. Each statement is parsed alone with sqlparser's PostgreSQL dialect, inside
//!    `catch_unwind`; statements too large or too deeply chained to parse and drop
//!    safely are not parsed (see [`MAX_PARSE_BYTES`], [`MAX_CHAIN_TOKENS`]).
//! 3. A statement that does not parse is a write, except transaction-control
//!    statements sqlparser does not know (`BEGIN ... DEFERRABLE`,
//!    `PREPARE TRANSACTION`, `COMMIT PREPARED` ...), recognised by a small exact
//!    grammar. A conservative lexical scan still reports transaction control,
//!    session state and stickiness of statements that did not parse.
//! 4. The per-statement results are merged: Read only if every statement is.

use std::collections::HashSet;

use super::normalize::split_statements;
use super::relations::RelationName;
use lexical::{comment_glued_to_operator, fallback, lexical_sticky, may_read};

mod ast;
#[doc(hidden)]
pub mod check;
#[cfg(test)]
mod fuzz_tests;
mod lexical;
#[cfg(test)]
mod tests;

/// Where a statement may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    /// A standby may run it.
    Read,
    /// Only the primary may run it.
    Write,
}

/// Transaction control carried by a statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum TxControl {
    /// `BEGIN` / `START TRANSACTION` with any modes; `read_only` only if `READ ONLY` is given.
    /// A BEGIN giving `READ WRITE` or `ISOLATION LEVEL SERIALIZABLE` is also a write:
    /// a hot standby can start neither.
    Begin {
        /// `READ ONLY` was given (and `READ WRITE` was not).
        read_only: bool,
    },
    /// `COMMIT` / `END` / `COMMIT AND CHAIN`.
    Commit,
    /// `ROLLBACK` / `ABORT`.
    Rollback,
    /// `SAVEPOINT` / `RELEASE` / `ROLLBACK TO`.
    Savepoint,
    /// `PREPARE TRANSACTION 'x'` (also a write).
    PrepareTransaction,
    /// `COMMIT PREPARED 'x'` / `ROLLBACK PREPARED 'x'` (also a write).
    CommitPrepared,
}

/// What a whole SQL string (possibly several statements separated by `;`) requires.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Classification {
    /// Read only if EVERY statement is a read.
    pub(crate) access: Access,
    /// The statement(s) change session state that must be applied to every backend
    /// connection the session uses: SET (incl. SET LOCAL, SET TRANSACTION,
    /// SET SESSION CHARACTERISTICS), RESET, DISCARD, DEALLOCATE.
    pub(crate) session_state: bool,
    /// After this statement the session must stay on the primary for its life:
    /// temporary objects, LISTEN, session-level advisory locks, `set_config` (unless
    /// `is_local` is literally `true`), DECLARE ... WITH HOLD, SET/RESET of
    /// `transaction_read_only` or `session_replication_role`,
    /// `default_transaction_read_only` set to off (or to an unknown value), and a
    /// serializable default isolation (`default_transaction_isolation`, `SET SESSION
    /// CHARACTERISTICS`), since a hot standby cannot run serializable transactions.
    pub(crate) sticky_primary: bool,
    /// `SET default_transaction_read_only = on` or `SET SESSION CHARACTERISTICS AS
    /// TRANSACTION READ ONLY`: `Some(true)`; set to off, to DEFAULT, RESET, RESET ALL,
    /// DISCARD ALL: `Some(false)`; else `None`. The last such statement wins.
    pub(crate) sets_read_only_default: Option<bool>,
    /// Transaction control of the FIRST statement that has one.
    pub(crate) tx: Option<TxControl>,
    /// SQL `PREPARE name AS stmt`: the name (lowercased unless quoted) and the inner
    /// statement's access (Write if the inner statement calls unknown functions).
    pub(crate) prepare: Option<(String, Access)>,
    /// SQL `EXECUTE name`: the name (lowercased unless quoted).
    pub(crate) execute: Option<String>,
    /// SQL `DEALLOCATE [PREPARE] name` → `Some(Some(name))`; `DEALLOCATE ALL` → `Some(None)`.
    pub(crate) deallocate: Option<Option<String>>,
    /// Number of statements in the string (0 for an empty query).
    pub(crate) statements: usize,
    /// True if sqlparser failed on some statement (then access = Write).
    pub(crate) parse_failed: bool,
    /// Some statement fails while other sessions use a database it names
    /// (`DROP DATABASE`, `CREATE DATABASE`, `ALTER DATABASE … RENAME`; see
    /// [`super::database_cmd`], which reads the name from the text).
    pub(crate) exclusive_database: bool,
    /// Functions called by read statements that are on neither the write list nor a
    /// read-only list: folded as PostgreSQL folds identifiers (unquoted → lower case,
    /// quoted → verbatim), schema stripped, deduplicated, sorted. The caller may
    /// resolve them in pg_proc (volatile → write). When non-empty and the policy is
    /// [`UnknownIs::Write`] (or allow-list mode), access is already Write.
    pub(crate) unknown_functions: Vec<String>,
    /// Relations named by read statements (tables, views, sequences, and
    /// anything else in a FROM clause, CTE names included), folded as
    /// PostgreSQL folds identifiers, deduplicated, sorted. The caller checks
    /// them for unlogged relations ([`super::relations`]).
    pub(crate) relations: Vec<RelationName>,
    /// Some statement may change which relations are unlogged (any statement
    /// other than a query or plain DML, including ones that did not parse):
    /// cached relation answers are forgotten when it runs.
    pub(crate) catalog_change: bool,
    /// A standby refused a statement of this shape as only recovery would:
    /// it runs on the primary from now on (see [`Learned`]).
    pub(crate) primary_only: Learned,
    /// Some statement reads `pg_prepared_statements`: the session's own
    /// prepared statements (all of them, and no other session's) must be on
    /// the connection that runs it.
    pub(crate) lists_statements: bool,
}

/// A fact learned about a cached statement shape after it was classified,
/// shared by every session holding the shape's classification. It is not
/// part of what a classification says of the text: it never makes two
/// classifications differ (equality and hashing ignore it).
#[derive(Debug, Default)]
pub(crate) struct Learned(std::sync::atomic::AtomicBool);

impl Learned {
    /// Whether it was learned.
    pub(crate) fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Learn it.
    pub(crate) fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clone for Learned {
    fn clone(&self) -> Self {
        Learned(self.get().into())
    }
}

impl PartialEq for Learned {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Learned {}

impl std::hash::Hash for Learned {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl Classification {
    /// The classification of an empty query string.
    pub(crate) fn empty() -> Self {
        Self {
            access: Access::Read,
            session_state: false,
            sticky_primary: false,
            sets_read_only_default: None,
            tx: None,
            prepare: None,
            execute: None,
            deallocate: None,
            statements: 0,
            parse_failed: false,
            exclusive_database: false,
            unknown_functions: Vec::new(),
            relations: Vec::new(),
            catalog_change: false,
            primary_only: Learned::default(),
            lists_statements: false,
        }
    }
}

/// Inputs longer than this are not parsed: they are classified lexically (Write).
pub(crate) const MAX_PARSE_BYTES: usize = 1 << 20;

/// A statement with more operator-like tokens than this is not parsed (it would
/// build a syntax tree too deep to drop safely on a small thread stack): it is
/// classified lexically (Write).
pub(crate) const MAX_CHAIN_TOKENS: usize = 4000;

/// Functions that write or need the primary's session by default (a call → Write).
///
/// `currval`/`lastval` are read-only but depend on a `nextval` in the same session,
/// which ran on the primary. The advisory-lock family is here because a lock taken
/// on a standby does not exclude anyone on the primary.
#[rustfmt::skip]
pub(crate) const DEFAULT_WRITE_FUNCTIONS: &[&str] = &[
    "brin_desummarize_range", "brin_summarize_new_values", "brin_summarize_range",
    "currval", "dblink_exec", "gin_clean_pending_list", "lastval", "lo_creat", "lo_create",
    "lo_export", "lo_from_bytea", "lo_import", "lo_open", "lo_put", "lo_truncate",
    "lo_truncate64", "lo_unlink", "lo_write", "lowrite", "nextval", "pg_advisory_lock",
    "pg_advisory_lock_shared", "pg_advisory_unlock", "pg_advisory_unlock_all",
    "pg_advisory_unlock_shared", "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared",
    "pg_cancel_backend", "pg_copy_logical_replication_slot",
    "pg_copy_physical_replication_slot", "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot", "pg_create_restore_point", "pg_current_xact_id",
    "pg_drop_replication_slot", "pg_logical_emit_message",
    "pg_logical_slot_get_binary_changes", "pg_logical_slot_get_changes", "pg_notify",
    "pg_promote", "pg_reload_conf", "pg_replication_origin_create",
    "pg_replication_origin_drop", "pg_replication_slot_advance", "pg_rotate_logfile",
    "pg_stat_reset", "pg_stat_reset_shared", "pg_stat_reset_single_function_counters",
    "pg_stat_reset_single_table_counters", "pg_stat_reset_slru", "pg_switch_wal",
    "pg_terminate_backend", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock", "pg_try_advisory_xact_lock_shared", "set_config",
    "setseed", "setval", "txid_current",
];

/// Built-in functions known to be safe on a standby, needing no pg_proc lookup
/// (only when called unqualified or as `pg_catalog.f`).
///
/// Aggregates, window functions, string/math/date/array/JSON functions and system
/// information functions. Volatile-but-harmless ones (`random`, `now`, `pg_sleep`,
/// `gen_random_uuid`) are included: they do not write. Special forms sqlparser
/// parses as functions (`current_timestamp`, `current_user`, `coalesce`, ...) too.
/// Kept sorted (binary search).
#[rustfmt::skip]
pub(crate) const READ_ONLY_FUNCTIONS: &[&str] = &[
    "abs", "acos", "age", "any_value", "array_agg", "array_append", "array_cat",
    "array_dims", "array_fill", "array_length", "array_lower", "array_ndims",
    "array_position", "array_positions", "array_prepend", "array_remove", "array_replace",
    "array_reverse", "array_sample", "array_shuffle", "array_sort", "array_to_json",
    "array_to_string", "array_upper", "ascii", "asin", "atan", "atan2", "avg", "bit_and",
    "bit_count", "bit_length", "bit_or", "bool", "bool_and", "bool_or", "btrim", "bytea",
    "cardinality", "cbrt", "ceil", "ceiling", "char_length", "character_length", "chr",
    "cidr", "clock_timestamp", "coalesce", "col_description", "concat", "concat_ws",
    "convert", "convert_from", "convert_to", "corr", "cos", "count", "covar_pop",
    "covar_samp", "cume_dist", "current_catalog", "current_database", "current_date",
    "current_role", "current_schema", "current_schemas", "current_setting", "current_time",
    "current_timestamp", "current_user", "date", "date_bin", "date_part", "date_trunc",
    "decode", "degrees", "dense_rank", "div", "encode", "every", "exp", "extract",
    "first_value", "float4", "float8", "floor", "format", "format_type", "gcd",
    "gen_random_uuid", "generate_series", "generate_subscripts", "get_bit", "get_byte",
    "greatest", "has_any_column_privilege", "has_column_privilege",
    "has_database_privilege", "has_foreign_data_wrapper_privilege",
    "has_function_privilege", "has_language_privilege", "has_schema_privilege",
    "has_sequence_privilege", "has_server_privilege", "has_table_privilege",
    "has_tablespace_privilege", "has_type_privilege", "inet", "inet_client_addr",
    "inet_client_port", "inet_server_addr", "inet_server_port", "initcap", "int2", "int4",
    "int8", "interval", "is_normalized", "isempty", "isfinite", "json", "json_agg",
    "json_array_elements", "json_array_elements_text", "json_array_length",
    "json_build_array", "json_build_object", "json_each", "json_each_text",
    "json_extract_path", "json_extract_path_text", "json_object", "json_object_agg",
    "json_object_keys", "json_populate_record", "json_populate_recordset",
    "json_strip_nulls", "json_to_record", "json_to_recordset", "json_typeof", "jsonb",
    "jsonb_agg", "jsonb_array_elements", "jsonb_array_elements_text", "jsonb_array_length",
    "jsonb_build_array", "jsonb_build_object", "jsonb_each", "jsonb_each_text",
    "jsonb_extract_path", "jsonb_extract_path_text", "jsonb_insert", "jsonb_object",
    "jsonb_object_agg", "jsonb_object_keys", "jsonb_path_exists", "jsonb_path_match",
    "jsonb_path_query", "jsonb_path_query_array", "jsonb_path_query_first",
    "jsonb_populate_record", "jsonb_populate_recordset", "jsonb_pretty", "jsonb_set",
    "jsonb_strip_nulls", "jsonb_to_record", "jsonb_to_recordset", "jsonb_typeof",
    "justify_days", "justify_hours", "justify_interval", "lag", "last_value", "lcm", "lead",
    "least", "left", "length", "ln", "localtime", "localtimestamp", "log", "log10", "lower",
    "lower_inc", "lpad", "ltrim", "make_date", "make_interval", "make_time",
    "make_timestamp", "make_timestamptz", "max", "md5", "min", "mod", "mode", "name",
    "normalize", "now", "nth_value", "ntile", "nullif", "num_nonnulls", "num_nulls",
    "numeric", "obj_description", "octet_length", "oid", "overlay", "parse_ident",
    "percent_rank", "percentile_cont", "percentile_disc", "pg_client_encoding",
    "pg_column_size", "pg_conf_load_time", "pg_current_logfile", "pg_current_snapshot",
    "pg_database_size", "pg_encoding_to_char", "pg_function_is_visible",
    "pg_get_constraintdef", "pg_get_expr", "pg_get_function_arguments",
    "pg_get_function_identity_arguments", "pg_get_function_result", "pg_get_functiondef",
    "pg_get_indexdef", "pg_get_keywords", "pg_get_partkeydef", "pg_get_ruledef",
    "pg_get_serial_sequence", "pg_get_statisticsobjdef", "pg_get_triggerdef",
    "pg_get_userbyid", "pg_get_viewdef", "pg_get_wal_replay_pause_state", "pg_has_role",
    "pg_indexes_size", "pg_is_in_recovery", "pg_is_wal_replay_paused", "pg_jit_available",
    "pg_last_wal_receive_lsn", "pg_last_wal_replay_lsn", "pg_last_xact_replay_timestamp",
    "pg_listening_channels", "pg_notification_queue_usage", "pg_options_to_table",
    "pg_postmaster_start_time", "pg_relation_filenode", "pg_relation_filepath",
    "pg_relation_size", "pg_size_pretty", "pg_sleep", "pg_sleep_for", "pg_sleep_until",
    "pg_snapshot_xmax", "pg_snapshot_xmin", "pg_table_is_visible", "pg_table_size",
    "pg_tablespace_location", "pg_total_relation_size", "pg_type_is_visible", "pg_typeof",
    "pg_visible_in_snapshot", "pg_wal_lsn_diff", "pg_xact_status", "pi", "position",
    "power", "quote_ident", "quote_literal", "quote_nullable", "radians", "random",
    "range_agg", "range_intersect_agg", "range_merge", "rank", "regclass", "regexp_count",
    "regexp_like", "regexp_match", "regexp_matches", "regexp_replace",
    "regexp_split_to_array", "regexp_split_to_table", "repeat", "replace", "reverse",
    "right", "round", "row", "row_number", "row_to_json", "rpad", "rtrim", "session_user",
    "set_bit", "set_byte", "sha224", "sha256", "sha384", "sha512", "shobj_description",
    "sign", "similar_to_escape", "sin", "split_part", "sqrt", "starts_with",
    "statement_timestamp", "stddev", "stddev_pop", "stddev_samp", "string_agg",
    "string_to_array", "string_to_table", "strpos", "substr", "substring", "sum", "tan",
    "text", "time", "timeofday", "timestamp", "timestamptz", "timetz", "to_ascii",
    "to_char", "to_date", "to_hex", "to_json", "to_jsonb", "to_number", "to_regclass",
    "to_regnamespace", "to_regproc", "to_regprocedure", "to_regrole", "to_regtype",
    "to_timestamp", "transaction_timestamp", "translate", "trim", "trim_array", "trunc",
    "txid_current_snapshot", "txid_snapshot_xmax", "txid_snapshot_xmin",
    "txid_visible_in_snapshot", "unistr", "unnest", "upper", "upper_inc", "user", "uuid",
    "uuid_extract_timestamp", "uuid_extract_version", "var_pop", "var_samp", "varchar",
    "variance", "version", "width_bucket", "xml_is_well_formed", "xmlagg", "xmlconcat",
    "xmlelement", "xmlforest", "xmlparse", "xmlserialize", "xpath", "xpath_exists",
];

/// Views that describe the node that answers (statistics, activity, locks,
/// the session's own prepared statements and cursors, replication), beyond the
/// families of [`NODE_LOCAL_PREFIXES`]: a read of one runs on the primary
/// (when named unqualified or as `pg_catalog.x`). `routing.primary_relations`
/// adds more. Kept sorted (binary search).
#[rustfmt::skip]
pub(crate) const NODE_LOCAL_RELATIONS: &[&str] = &[
    "pg_backend_memory_contexts", "pg_cursors", "pg_locks", "pg_prepared_statements",
    "pg_prepared_xacts", "pg_replication_origin_status", "pg_replication_slots",
    "pg_shmem_allocations",
];

/// Functions that describe the node that answers (its backend, its WAL, its
/// transaction, who blocks whom there), beyond the families of
/// [`NODE_LOCAL_PREFIXES`]: a call sends the statement to the primary. Kept
/// sorted (binary search).
#[rustfmt::skip]
pub(crate) const NODE_LOCAL_FUNCTIONS: &[&str] = &[
    "pg_backend_pid", "pg_blocking_pids", "pg_current_wal_flush_lsn",
    "pg_current_wal_insert_lsn", "pg_current_wal_lsn", "pg_current_xact_id_if_assigned",
    "pg_safe_snapshot_blocking_pids", "txid_current_if_assigned",
];

/// Name prefixes of node-local views (`pg_stat_*`, `pg_statio_*`) and
/// functions (`pg_stat_get_*` and the rest of `pg_stat_`).
pub(crate) const NODE_LOCAL_PREFIXES: &[&str] = &["pg_stat_", "pg_statio_"];

/// Whether a built-in relation or function name describes the answering node.
pub(crate) fn node_local(name: &str, list: &[&str]) -> bool {
    NODE_LOCAL_PREFIXES.iter().any(|p| name.starts_with(p)) || list.binary_search(&name).is_ok()
}

/// Session-level advisory locks: held past the transaction, so the session must
/// keep its primary connection.
const SESSION_ADVISORY_LOCKS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// Settings whose SET/RESET pins the session to the primary.
const STICKY_SETTINGS: &[&str] = &[
    "default_transaction_read_only",
    "session_replication_role",
    "transaction_read_only",
];

/// First words of statements that can be reads; any other statement is a write
/// whatever the parser says.
#[rustfmt::skip]
const MAY_READ_STARTS: &[&str] = &[
    "abort", "begin", "commit", "copy", "deallocate", "discard", "end", "execute",
    "explain", "prepare", "release", "reset", "rollback", "savepoint", "select", "set",
    "show", "start", "table", "values", "with",
];

/// What to do with a function on no list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnknownIs {
    /// Assume it does not write.
    Read,
    /// Assume it writes.
    Write,
    /// Report it in [`Classification::unknown_functions`]; access stays Read.
    Lookup,
}

/// How functions are judged.
#[derive(Debug, Clone)]
pub struct FunctionPolicy {
    /// Functions that write (call → Write), lower case.
    pub(crate) write_functions: HashSet<String>,
    /// If `Some`, allow-list mode: only these functions (plus [`READ_ONLY_FUNCTIONS`])
    /// may run on a standby; every other function → Write.
    pub(crate) read_only_functions: Option<HashSet<String>>,
    /// What to do with a function on no list.
    pub(crate) unknown: UnknownIs,
    /// Relations whose reads run on the primary beyond the built-in node-local
    /// views (`routing.primary_relations`): `name` (any schema) or
    /// `schema.name`, as PostgreSQL folds them.
    pub(crate) primary_relations: HashSet<String>,
}

impl Default for FunctionPolicy {
    /// [`DEFAULT_WRITE_FUNCTIONS`], no allow-list, unknown functions looked up.
    fn default() -> Self {
        Self {
            write_functions: DEFAULT_WRITE_FUNCTIONS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            read_only_functions: None,
            unknown: UnknownIs::Lookup,
            primary_relations: HashSet::new(),
        }
    }
}

impl FunctionPolicy {
    /// The default write list plus `write` (extra write functions are ADDED), an
    /// optional allow-list of read-only functions, and the unknown-function rule.
    /// Names are matched in lower case (write list) or as given (read-only list;
    /// write them as PostgreSQL folds them, i.e. lower case unless created quoted).
    pub(crate) fn with_lists(
        write: impl IntoIterator<Item = String>,
        read_only: Option<Vec<String>>,
        unknown: UnknownIs,
    ) -> Self {
        let mut policy = Self::default();
        policy
            .write_functions
            .extend(write.into_iter().map(|s| s.to_ascii_lowercase()));
        policy.read_only_functions = read_only.map(|v| v.into_iter().collect());
        policy.unknown = unknown;
        policy
    }

    /// The policy the `[routing]` settings ask for.
    pub(crate) fn from_config(routing: &crate::config::Routing) -> Self {
        use crate::config::UnknownFunctions;
        let unknown = match routing.unknown_functions {
            UnknownFunctions::Lookup => UnknownIs::Lookup,
            UnknownFunctions::Write => UnknownIs::Write,
            UnknownFunctions::Read => UnknownIs::Read,
        };
        let allow =
            (!routing.read_only_functions.is_empty()).then(|| routing.read_only_functions.clone());
        let mut policy = Self::with_lists(routing.write_functions.iter().cloned(), allow, unknown);
        policy.primary_relations = routing.primary_relations.iter().cloned().collect();
        policy
    }
}

/// Classifies SQL strings.
pub trait Classifier: Send + Sync {
    /// Classify a whole query string (one or more statements).
    fn classify(&self, sql: &str) -> Classification;
}

/// The classifier built on sqlparser's PostgreSQL dialect.
#[derive(Debug, Clone, Default)]
pub struct SqlParserClassifier {
    policy: FunctionPolicy,
}

impl SqlParserClassifier {
    /// A classifier judging functions by `policy`.
    pub fn new(policy: FunctionPolicy) -> Self {
        Self { policy }
    }
}

impl Classifier for SqlParserClassifier {
    fn classify(&self, sql: &str) -> Classification {
        let lexical_only = sql.len() > MAX_PARSE_BYTES;
        let mut c = Classification::empty();
        for piece in split_statements(sql) {
            let mut part = if lexical_only || piece.chain > MAX_CHAIN_TOKENS {
                fallback(&piece)
            } else {
                self.classify_piece(&piece)
            };
            if !may_read(&piece) || comment_glued_to_operator(piece.text) {
                part.write = true;
            }
            lexical_sticky(&piece, &mut part);
            c.exclusive_database |= super::database_cmd::is_exclusive(piece.text);
            merge(&mut c, part);
        }
        c.unknown_functions.sort_unstable();
        c.unknown_functions.dedup();
        c.relations.sort_unstable();
        c.relations.dedup();
        c
    }
}

/// The result for one statement.
#[derive(Debug, Default)]
struct Part {
    /// Write for a reason other than the unknown-function rule.
    write: bool,
    /// Write only because of the unknown-function rule (or allow-list mode).
    unknown_write: bool,
    session_state: bool,
    sticky: bool,
    read_only_default: Option<bool>,
    tx: Option<TxControl>,
    prepare: Option<(String, Access)>,
    execute: Option<String>,
    deallocate: Option<Option<String>>,
    parse_failed: bool,
    unknown: Vec<String>,
    relations: Vec<RelationName>,
    catalog_change: bool,
    lists_statements: bool,
}

impl Part {
    fn write() -> Self {
        Self {
            write: true,
            ..Self::default()
        }
    }

    fn tx(tx: TxControl) -> Self {
        let write = matches!(
            tx,
            TxControl::PrepareTransaction | TxControl::CommitPrepared
        );
        Self {
            write,
            tx: Some(tx),
            ..Self::default()
        }
    }

    fn access(&self) -> Access {
        if self.write || self.unknown_write {
            Access::Write
        } else {
            Access::Read
        }
    }
}

fn merge(c: &mut Classification, part: Part) {
    c.statements += 1;
    if part.access() == Access::Write {
        c.access = Access::Write;
    }
    c.session_state |= part.session_state;
    c.sticky_primary |= part.sticky;
    if part.read_only_default.is_some() {
        c.sets_read_only_default = part.read_only_default;
    }
    if c.tx.is_none() {
        c.tx = part.tx;
    }
    c.parse_failed |= part.parse_failed;
    c.catalog_change |= part.catalog_change;
    c.lists_statements |= part.lists_statements;
    // Only one PREPARE/EXECUTE/DEALLOCATE of each kind can be reported: a second
    // one makes the whole string a write (it runs on the primary).
    merge_once(&mut c.prepare, part.prepare, &mut c.access);
    merge_once(&mut c.execute, part.execute, &mut c.access);
    merge_once(&mut c.deallocate, part.deallocate, &mut c.access);
    if !part.write {
        c.unknown_functions.extend(part.unknown);
        c.relations.extend(part.relations);
    }
}

fn merge_once<T>(slot: &mut Option<T>, new: Option<T>, access: &mut Access) {
    if new.is_some() {
        if slot.is_some() {
            *access = Access::Write;
        } else {
            *slot = new;
        }
    }
}

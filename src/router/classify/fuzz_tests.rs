//! The classifier's randomised robustness test: random SQL-ish strings never
//! panic it, and no write among them reaches a standby.

use super::*;
use crate::config::NodeId;
use crate::router::cache::ClassifyCache;
use crate::router::normalize::{Hint, Kind, split_statements};
use crate::router::policy::{BalanceInTransaction, Decision, Policy, RouteState, decide};

/// One of `items`, chosen by `rng`.
fn pick<'a>(rng: &mut fastrand::Rng, items: &[&'a str]) -> &'a str {
    items[rng.usize(..items.len())]
}

const WRITE_STARTS: &[&str] = &[
    "insert",
    "update",
    "delete",
    "merge",
    "truncate",
    "create",
    "alter",
    "drop",
    "grant",
    "revoke",
    "vacuum",
    "analyze",
    "call",
    "do",
    "lock",
    "listen",
    "unlisten",
    "notify",
    "refresh",
    "cluster",
    "reindex",
    "checkpoint",
    "comment",
    "declare",
    "fetch",
    "move",
    "close",
    "security",
    "import",
    "reassign",
    "load",
];

/// The write keyword starting one of the statements of `sql` (split at top-level
/// `;` as PostgreSQL splits them), if any.
fn write_start(sql: &str) -> Option<String> {
    split_statements(sql).iter().find_map(|st| {
        let t = st.head.first()?;
        let w = t.text.to_ascii_lowercase();
        (t.kind == Kind::Word && WRITE_STARTS.contains(&w.as_str())).then_some(w)
    })
}

const BALANCED: Policy = Policy {
    load_balance: true,
    in_transaction: BalanceInTransaction::Off,
};
const PGPOOL: Policy = Policy {
    load_balance: true,
    in_transaction: BalanceInTransaction::Transaction,
};

/// Random SQL-ish strings: the classifier never panics, a string with a write
/// keyword at the start of any of its statements is a write (cached or not),
/// and the routing policy never sends a write to a standby outside a
/// transaction, whatever the session state and hint.
#[test]
fn random_sql_never_panics_and_write_starts_are_write() {
    #[rustfmt::skip]
    let pieces: &[&str] = &[
        "SELECT", "select", "INSERT", "into", "UPDATE", "DELETE", "from", "where", "WITH", "as",
        "(", ")", ",", ";", ";", "'", "''", "'x'", "E'\\'", "$$", "$a$", "$1", "\"", "\"id\"",
        "--", "\n", "/*", "*/", "1", "1.5e3", "0x", "t", "a", "nextval('s')", "count(*)", "FOR",
        "UPDATE", "SHARE", "NO KEY", "BEGIN", "COMMIT", "SET", "=", "on", "off", "EXPLAIN",
        "ANALYZE", "TABLE", "CREATE", "TEMP", "DROP", "é", "日本", "\u{0}", "\\", "::", "[", "]",
        "+", "-", "ORDER BY", "UNION", "VALUES", "PREPARE", "EXECUTE", "DEALLOCATE", "COPY",
        "TO", "STDOUT", "LISTEN", "DO", "CALL", "merge", "truncate", "vacuum", "grant", "lock",
        "comment", "refresh", "default_transaction_read_only", "pg_advisory_lock(1)", "*",
        "BEGIN ATOMIC", "END",
    ];
    let classifier = SqlParserClassifier::default();
    let cache = ClassifyCache::new(512);
    let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15);
    let mut writes = 0;
    for i in 0..20_000 {
        let mut sql = String::new();
        if i % 3 == 0 {
            sql.push_str(pick(&mut rng, &["", " ", "/* x */ ", "-- c\n", "\t"]));
            sql.push_str(pick(&mut rng, WRITE_STARTS));
            sql.push(' ');
        }
        for _ in 0..rng.usize(..12) {
            sql.push_str(pick(&mut rng, pieces));
            sql.push_str(pick(&mut rng, &[" ", "", " ", "\n"]));
        }
        if i % 5 == 0 {
            // A write keyword starting a later statement of the string.
            sql.push_str(pick(&mut rng, &["; ", ";\n", "; /* c */ "]));
            sql.push_str(pick(&mut rng, WRITE_STARTS));
            sql.push_str(pick(&mut rng, &[" t", " (", "", " 'x' $$"]));
        }
        let direct = classifier.classify(&sql);
        let cached = cache
            .classify(sql.as_bytes(), || &classifier)
            .expect("UTF-8");
        if let Some(w) = write_start(&sql) {
            writes += 1;
            assert_eq!(direct.access, Access::Write, "{w}: {sql:?}");
            assert_eq!(cached.access, Access::Write, "{w}: {sql:?}");
        }
        if direct.access == Access::Write {
            // The cache never turns a write into a read.
            assert_eq!(cached.access, Access::Write, "{sql:?}");
            // Outside a transaction, no session state or hint routes a write
            // to the standby (node 1; the primary is node 0).
            let state = RouteState {
                standby: Some(NodeId::new(1)),
                sticky_primary: rng.usize(..4) == 0,
                forced_primary: rng.usize(..4) == 0,
                read_only_default: rng.bool(),
                ..RouteState::default()
            };
            let hint = [None, Some(Hint::Primary), Some(Hint::Standby)][rng.usize(..3)];
            for policy in [BALANCED, PGPOOL] {
                let node = decide(&policy, &state, &cached, hint, false, Some(NodeId::new(0)));
                assert_eq!(
                    node,
                    Decision::Node(NodeId::new(0)),
                    "{sql:?} {state:?} {hint:?}"
                );
                // Nor inside a read-write transaction (on the primary), even
                // before its first write in pgpool mode.
                let in_tx = RouteState {
                    tx_node: Some(NodeId::new(0)),
                    ..state.clone()
                };
                let node = decide(&policy, &in_tx, &cached, hint, true, Some(NodeId::new(0)));
                assert_eq!(
                    node,
                    Decision::Node(NodeId::new(0)),
                    "{sql:?} in a transaction"
                );
            }
        }
    }
    // The generator does produce statement-starting write keywords.
    assert!(writes > 5_000, "{writes}");
    assert_eq!(cache.hits() + cache.misses(), 20_000);
}

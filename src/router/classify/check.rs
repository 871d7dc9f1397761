//! The checks the classifier's fuzzing applies to every statement (the
//! `classify` fuzz target in `crate::fuzzing`, and the randomised unit test
//! in `fuzz_tests.rs`): what routing relies on the classifier and its cache
//! for. Pure, like the rest of the router.

use super::{Access, Classifier, SqlParserClassifier};
use crate::config::NodeId;
use crate::router::cache::ClassifyCache;
use crate::router::normalize::{Hint, Kind, split_statements};
use crate::router::policy::{BalanceInTransaction, Decision, Policy, RouteState, decide};

/// Statement-starting keywords that always make a write.
pub const WRITE_STARTS: &[&str] = &[
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

/// The write keyword starting one of the statements of `sql` (split at
/// top-level `;` as PostgreSQL splits them), if any.
pub fn write_start(sql: &str) -> Option<String> {
    split_statements(sql).iter().find_map(|st| {
        let t = st.head.first()?;
        let w = t.text.to_ascii_lowercase();
        (t.kind == Kind::Word && WRITE_STARTS.contains(&w.as_str())).then_some(w)
    })
}

const PRIMARY: NodeId = NodeId::new(0);

const BALANCED: Policy = Policy {
    load_balance: true,
    in_transaction: BalanceInTransaction::Off,
};
const PGPOOL: Policy = Policy {
    load_balance: true,
    in_transaction: BalanceInTransaction::Transaction,
};

/// Classify `sql` directly and through `cache` and check what routing relies
/// on: a statement starting with a write keyword is a write, the cache never
/// turns a write into a read, and no session state (`bits` chooses it) or
/// hint sends a write to a standby, inside a read-write transaction or not.
/// Returns whether `sql` starts a statement with a write keyword.
pub fn check_classification(
    classifier: &SqlParserClassifier,
    cache: &ClassifyCache,
    sql: &str,
    bits: u64,
) -> bool {
    let direct = classifier.classify(sql);
    let cached = cache
        .classify(sql.as_bytes(), || classifier)
        .expect("UTF-8");
    let starts_write = write_start(sql);
    if let Some(w) = &starts_write {
        assert_eq!(direct.access, Access::Write, "{w}: {sql:?}");
        assert_eq!(cached.access, Access::Write, "{w}: {sql:?}");
    }
    if direct.access == Access::Write {
        assert_eq!(cached.access, Access::Write, "{sql:?}");
        // The primary is node 0, the session's standby node 1.
        let state = RouteState {
            standby: Some(NodeId::new(1)),
            sticky_primary: bits & 3 == 0,
            forced_primary: (bits >> 2) & 3 == 0,
            read_only_default: (bits >> 4) & 1 == 1,
            ..RouteState::default()
        };
        let hint = [None, Some(Hint::Primary), Some(Hint::Standby)][(bits >> 5) as usize % 3];
        for policy in [BALANCED, PGPOOL] {
            let node = decide(&policy, &state, &cached, hint, false, Some(PRIMARY));
            assert_eq!(node, Decision::Node(PRIMARY), "{sql:?} {state:?} {hint:?}");
            let in_tx = RouteState {
                tx_node: Some(PRIMARY),
                ..state.clone()
            };
            let node = decide(&policy, &in_tx, &cached, hint, true, Some(PRIMARY));
            assert_eq!(node, Decision::Node(PRIMARY), "{sql:?} in a transaction");
        }
    }
    starts_write.is_some()
}

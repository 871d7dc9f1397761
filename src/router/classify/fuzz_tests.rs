//! The classifier's randomised robustness test: random SQL-ish strings never
//! panic it, and no write among them reaches a standby. The checks are the
//! classifier fuzz target's (`check.rs`, shared with `crate::fuzzing`); this generator feeds them
//! SQL-shaped input that random bytes rarely reach.

use super::check::{WRITE_STARTS, check_classification};
use super::*;
use crate::router::cache::ClassifyCache;

/// One of `items`, chosen by `rng`.
fn pick<'a>(rng: &mut fastrand::Rng, items: &[&'a str]) -> &'a str {
    items[rng.usize(..items.len())]
}

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
        if check_classification(&classifier, &cache, &sql, rng.u64(..)) {
            writes += 1;
        }
    }
    // The generator does produce statement-starting write keywords.
    assert!(writes > 5_000, "{writes}");
    assert_eq!(cache.hits() + cache.misses(), 20_000);
}

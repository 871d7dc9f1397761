//! A cheap scan of SQL text, far cheaper than a parse: used where only a
//! conservative yes/no is needed.

/// Statement starts that leave no session state behind by themselves.
const STATELESS_STARTS: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "with",
    "values",
    "table",
    "show",
    "begin",
    "commit",
    "rollback",
    "end",
    "start",
    "abort",
    "explain",
    "copy",
    "savepoint",
    "release",
    "merge",
];

/// Words that, anywhere in a statement, may create session state (temp tables,
/// advisory locks, `set_config`, prepared statements, cursors, LISTEN).
const STATEFUL_WORDS: &[&str] = &[
    "temp",
    "advisory",
    "set_config",
    "prepare",
    "listen",
    "declare",
    "cursor",
    "hold",
];

/// Conservative: `false` only when every statement in `sql` surely leaves no session
/// state (so the connection needs no reset before another client uses it).
pub fn may_leave_session_state(sql: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(sql) else {
        return true;
    };
    let lower = text.to_ascii_lowercase();
    if STATEFUL_WORDS.iter().any(|w| lower.contains(w)) {
        return true;
    }
    // Comments or quoting can hide statement boundaries from this scan: be safe.
    if lower.contains("/*") || lower.contains("--") || lower.contains('$') {
        return true;
    }
    lower
        .split(';')
        .map(|s| s.trim_start_matches(|c: char| c.is_whitespace() || c == '(' || c == '\0'))
        .filter(|s| !s.is_empty())
        .any(|s| {
            let word: String = s.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
            !STATELESS_STARTS.contains(&word.as_str())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_dml_is_stateless() {
        assert!(!may_leave_session_state(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;"
        ));
        assert!(!may_leave_session_state(
            b"BEGIN; UPDATE t SET a = 1; COMMIT"
        ));
        assert!(!may_leave_session_state(b"insert into t values (1)\0"));
    }

    #[test]
    fn state_is_detected() {
        for sql in [
            "SET search_path = x",
            "select set_config('a.b', '1', false)",
            "create temp table t (a int)",
            "PREPARE p AS SELECT 1",
            "LISTEN chan",
            "select pg_advisory_lock(1)",
            "select 1; set x = 1",
            "/* hi */ set x = 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        ] {
            assert!(may_leave_session_state(sql.as_bytes()), "{sql}");
        }
        assert!(may_leave_session_state(&[0xff, 0xfe]));
    }
}

//! Cheap recognisers for the session-state statements whose *effect* pgpilot must
//! know beyond their classification: the scope of a `SET` (transaction or
//! session), statements that reset every setting, and pgpilot's own
//! `pgpilot.route` setting. Token-based (see [`super::normalize::Lexer`]): no
//! parse, no allocation.

use super::normalize::{Kind, Lexer, Token};

/// The first `N` tokens of `sql` (fewer if it is shorter).
fn head<const N: usize>(sql: &str) -> ([Option<Token<'_>>; N], usize) {
    let mut out = [None; N];
    let mut n = 0;
    // Count one token past N, so `n > N` says "more follows" (a trailing
    // statement must never pass for the end of a command).
    for tok in Lexer::new(sql).take(N + 1) {
        if let Some(slot) = out.get_mut(n) {
            *slot = Some(tok);
        }
        n += 1;
    }
    (out, n)
}

fn word(t: &Option<Token<'_>>, w: &str) -> bool {
    t.is_some_and(|t| t.is_word(w))
}

/// `SET LOCAL …` or `SET TRANSACTION …`: lasts only until the end of the
/// transaction, so it is never replayed on other connections.
pub(crate) fn is_transaction_scoped_set(sql: &str) -> bool {
    let (t, _) = head::<2>(sql);
    word(&t[0], "set") && (word(&t[1], "local") || word(&t[1], "transaction"))
}

/// `SET TRANSACTION` asking for what a hot standby cannot give: `ISOLATION
/// LEVEL SERIALIZABLE` or `READ WRITE` (a single statement; later statements
/// in the same string are not looked at, they run where it runs).
pub(crate) fn tx_mode_needs_primary(sql: &str) -> bool {
    let mut toks = Lexer::new(sql);
    let (set, tx) = (toks.next(), toks.next());
    if !word(&set, "set") || !word(&tx, "transaction") {
        return false;
    }
    let mut prev: Option<Token<'_>> = None;
    for t in toks.take_while(|t| !t.is_punct(";")) {
        if t.is_word("serializable") || (t.is_word("write") && word(&prev, "read")) {
            return true;
        }
        prev = Some(t);
    }
    false
}

/// `DISCARD ALL` or `RESET ALL`: every earlier setting is void afterwards.
pub(crate) fn resets_all(sql: &str) -> bool {
    let (t, n) = head::<3>(sql);
    let end = |i: usize| n == i || t[i].is_some_and(|t| t.is_punct(";"));
    (word(&t[0], "discard") || word(&t[0], "reset")) && word(&t[1], "all") && end(2)
}

/// `DISCARD ALL` (which also drops prepared statements, temp tables, listeners).
pub(crate) fn is_discard_all(sql: &str) -> bool {
    let (t, _) = head::<2>(sql);
    word(&t[0], "discard") && word(&t[1], "all")
}

/// What a statement does to `pgpilot.route`: `Some(true)` for
/// `SET [SESSION] pgpilot.route = 'primary'` (or `TO primary`), `Some(false)` for
/// any other value, `DEFAULT`, `RESET pgpilot.route`, `RESET ALL` and `DISCARD ALL`;
/// `None` when the statement does not touch it. The setting itself is a
/// PostgreSQL placeholder variable, so the server accepts and reports it too.
pub(crate) fn route_setting(sql: &str) -> Option<bool> {
    if resets_all(sql) {
        return Some(false);
    }
    let (t, n) = head::<7>(sql);
    let mut i = 0;
    let reset = if word(&t[0], "set") {
        false
    } else if word(&t[0], "reset") {
        true
    } else {
        return None;
    };
    i += 1;
    if !reset && word(&t[i], "session") {
        i += 1;
    }
    let is_name = word(&t[i], "pgpilot")
        && t[i + 1].is_some_and(|t| t.is_punct("."))
        && word(&t[i + 2], "route");
    if !is_name {
        return None;
    }
    i += 3;
    if reset {
        return Some(false);
    }
    let assign = t[i].is_some_and(|t| (t.kind == Kind::Op && t.text == "=") || t.is_word("to"));
    if !assign || i + 1 >= n {
        return None;
    }
    let value = t[i + 1]?;
    let text = match value.kind {
        Kind::Str => value.text.trim_matches('\''),
        Kind::Word | Kind::QuotedIdent => value.text.trim_matches('"'),
        _ => return Some(false),
    };
    Some(text.eq_ignore_ascii_case("primary"))
}

/// A savepoint command and its (folded) name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SavepointOp {
    /// `SAVEPOINT name`.
    Set(String),
    /// `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name`.
    RollbackTo(String),
    /// `RELEASE [SAVEPOINT] name`.
    Release(String),
}

/// Recognise a savepoint command.
pub(crate) fn savepoint_op(sql: &str) -> Option<SavepointOp> {
    let (t, _) = head::<6>(sql);
    let name = |i: usize| -> Option<String> {
        let tok = t.get(i).copied().flatten()?;
        match tok.kind {
            Kind::Word => Some(tok.text.to_ascii_lowercase()),
            Kind::QuotedIdent => Some(tok.text.trim_matches('"').replace("\"\"", "\"")),
            _ => None,
        }
    };
    if word(&t[0], "savepoint") {
        return name(1).map(SavepointOp::Set);
    }
    if word(&t[0], "release") {
        let i = if word(&t[1], "savepoint") { 2 } else { 1 };
        return name(i).map(SavepointOp::Release);
    }
    if word(&t[0], "rollback") {
        let mut i = 1;
        if word(&t[i], "work") || word(&t[i], "transaction") {
            i += 1;
        }
        if !word(&t[i], "to") {
            return None;
        }
        i += 1;
        if word(&t[i], "savepoint") {
            i += 1;
        }
        return name(i).map(SavepointOp::RollbackTo);
    }
    None
}

/// A `SET pgpilot.min_lsn` whose value is not a WAL position (`X/Y`, hex), or
/// whose form is not `SET pgpilot.min_lsn = <value>`: `text` is what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid input syntax for type pg_lsn: \"{text}\"")]
pub(crate) struct InvalidLsn {
    /// The value, or the whole statement when its form is wrong.
    pub(crate) text: String,
}

/// pgpilot's own session commands, answered by pgpilot (never sent to a node).
/// Every one is about an LSN; the names follow the SQL they answer.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PgpilotCommand {
    /// `SHOW pgpilot.last_commit_lsn`: the session's last commit position.
    ShowLastCommitLsn,
    /// `SHOW pgpilot.min_lsn`.
    ShowMinLsn,
    /// `SET pgpilot.min_lsn = '<lsn>'`: reads must see this position, or the
    /// value (or statement) that is not one.
    SetMinLsn(Result<u64, InvalidLsn>),
    /// `RESET pgpilot.min_lsn` / `SET pgpilot.min_lsn TO DEFAULT`.
    ResetMinLsn,
}

/// Recognise one of [`PgpilotCommand`] (a single statement, `;` allowed at the end).
pub(crate) fn pgpilot_command(sql: &str) -> Option<PgpilotCommand> {
    let (t, n) = head::<8>(sql);
    let name_at = |i: usize, name: &str| {
        word(&t[i], "pgpilot") && t[i + 1].is_some_and(|t| t.is_punct(".")) && word(&t[i + 2], name)
    };
    let ends_at = |i: usize| n == i || (n == i + 1 && t[i].is_some_and(|t| t.is_punct(";")));
    if word(&t[0], "show") && ends_at(4) {
        if name_at(1, "last_commit_lsn") {
            return Some(PgpilotCommand::ShowLastCommitLsn);
        }
        if name_at(1, "min_lsn") {
            return Some(PgpilotCommand::ShowMinLsn);
        }
        return None;
    }
    if word(&t[0], "reset") && name_at(1, "min_lsn") && ends_at(4) {
        return Some(PgpilotCommand::ResetMinLsn);
    }
    if !word(&t[0], "set") {
        return None;
    }
    let i = if word(&t[1], "session") { 2 } else { 1 };
    if !name_at(i, "min_lsn") {
        return None;
    }
    let assign = t[i + 3].is_some_and(|t| (t.kind == Kind::Op && t.text == "=") || t.is_word("to"));
    let value = t.get(i + 4).copied().flatten();
    if !assign || !ends_at(i + 5) {
        return Some(PgpilotCommand::SetMinLsn(Err(InvalidLsn {
            text: sql.trim().to_string(),
        })));
    }
    let value = value?;
    if value.is_word("default") {
        return Some(PgpilotCommand::ResetMinLsn);
    }
    let text = match value.kind {
        Kind::Str => value.text.trim_start_matches(['E', 'e']).trim_matches('\''),
        _ => value.text,
    };
    Some(PgpilotCommand::SetMinLsn(
        crate::protocol::lsn::parse_lsn(text).ok_or_else(|| InvalidLsn {
            text: text.to_string(),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_transaction_modes_a_standby_cannot_take() {
        for sql in [
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "set transaction read write",
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ WRITE;",
            "SET TRANSACTION /* x */ READ ONLY, ISOLATION LEVEL SERIALIZABLE",
        ] {
            assert!(tx_mode_needs_primary(sql), "{sql}");
        }
        for sql in [
            "SET TRANSACTION READ ONLY",
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET TRANSACTION READ ONLY; SELECT 'serializable'",
            "SELECT 1",
        ] {
            assert!(!tx_mode_needs_primary(sql), "{sql}");
        }
    }

    #[test]
    fn scopes() {
        assert!(is_transaction_scoped_set("SET LOCAL work_mem = '1MB'"));
        assert!(is_transaction_scoped_set(
            "set transaction isolation level serializable"
        ));
        assert!(!is_transaction_scoped_set("SET search_path = a"));
        assert!(!is_transaction_scoped_set("SET SESSION work_mem = 1"));
        assert!(resets_all("DISCARD ALL"));
        assert!(resets_all("reset all;"));
        assert!(!resets_all("RESET search_path"));
        assert!(is_discard_all("discard all"));
        assert!(!is_discard_all("reset all"));
    }

    #[test]
    fn savepoints() {
        use SavepointOp::*;
        assert_eq!(savepoint_op("SAVEPOINT a"), Some(Set("a".into())));
        assert_eq!(savepoint_op("savepoint \"B c\""), Some(Set("B c".into())));
        assert_eq!(savepoint_op("ROLLBACK TO a"), Some(RollbackTo("a".into())));
        assert_eq!(
            savepoint_op("rollback work to savepoint A"),
            Some(RollbackTo("a".into()))
        );
        assert_eq!(
            savepoint_op("RELEASE SAVEPOINT a"),
            Some(Release("a".into()))
        );
        assert_eq!(savepoint_op("RELEASE a"), Some(Release("a".into())));
        assert_eq!(savepoint_op("ROLLBACK"), None);
        assert_eq!(savepoint_op("SELECT 1"), None);
    }

    #[test]
    fn pgpilot_commands() {
        use PgpilotCommand::*;
        assert_eq!(
            pgpilot_command("SHOW pgpilot.last_commit_lsn"),
            Some(ShowLastCommitLsn)
        );
        assert_eq!(pgpilot_command("show pgpilot.min_lsn;"), Some(ShowMinLsn));
        assert_eq!(
            pgpilot_command("SET pgpilot.min_lsn = '0/16B3748'"),
            Some(SetMinLsn(Ok(0x16B_3748)))
        );
        assert_eq!(
            pgpilot_command("SET pgpilot.min_lsn TO '1/0'"),
            Some(SetMinLsn(Ok(1 << 32)))
        );
        assert_eq!(
            pgpilot_command("SET pgpilot.min_lsn = 'banana'"),
            Some(SetMinLsn(Err(InvalidLsn {
                text: "banana".into()
            })))
        );
        assert_eq!(pgpilot_command("RESET pgpilot.min_lsn"), Some(ResetMinLsn));
        assert_eq!(
            pgpilot_command("SET pgpilot.min_lsn TO DEFAULT"),
            Some(ResetMinLsn)
        );
        assert_eq!(pgpilot_command("SHOW search_path"), None);
        assert_eq!(pgpilot_command("SET pgpilot.route = 'primary'"), None);
        assert_eq!(
            pgpilot_command("SHOW pgpilot.last_commit_lsn; SELECT 1"),
            None
        );
        // A statement after the command is never taken for its end (it would
        // be answered by pgpilot and never run).
        for sql in [
            "SET SESSION pgpilot.min_lsn = '0/1'; DELETE FROM t",
            "SET SESSION pgpilot.min_lsn TO DEFAULT; DELETE FROM t",
            "SET pgpilot.min_lsn = '0/1'; DELETE FROM t",
        ] {
            assert!(
                matches!(pgpilot_command(sql), None | Some(SetMinLsn(Err(_)))),
                "{sql}"
            );
        }
        assert_eq!(
            pgpilot_command("RESET pgpilot.min_lsn; DELETE FROM t"),
            None
        );
        assert_eq!(
            pgpilot_command("SET SESSION pgpilot.min_lsn = '0/1';"),
            Some(SetMinLsn(Ok(1)))
        );
    }

    #[test]
    fn route_settings() {
        assert_eq!(route_setting("SET pgpilot.route = 'primary'"), Some(true));
        assert_eq!(
            route_setting("set session pgpilot.route to primary"),
            Some(true)
        );
        assert_eq!(route_setting("SET pgpilot.route = 'auto'"), Some(false));
        assert_eq!(route_setting("SET pgpilot.route TO DEFAULT"), Some(false));
        assert_eq!(route_setting("RESET pgpilot.route"), Some(false));
        assert_eq!(route_setting("DISCARD ALL"), Some(false));
        assert_eq!(route_setting("SET search_path = x"), None);
        assert_eq!(route_setting("SET pgpilot.other = 'primary'"), None);
        assert_eq!(route_setting("SELECT 1"), None);
        assert_eq!(route_setting("SET pgpilot.route"), None);
    }
}

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
    for (slot, tok) in out.iter_mut().zip(Lexer::new(sql)) {
        *slot = Some(tok);
        n += 1;
    }
    (out, n)
}

fn word(t: &Option<Token<'_>>, w: &str) -> bool {
    t.is_some_and(|t| t.is_word(w))
}

/// `SET LOCAL …` or `SET TRANSACTION …`: lasts only until the end of the
/// transaction, so it is never replayed on other connections.
pub fn is_transaction_scoped_set(sql: &str) -> bool {
    let (t, _) = head::<2>(sql);
    word(&t[0], "set") && (word(&t[1], "local") || word(&t[1], "transaction"))
}

/// `DISCARD ALL` or `RESET ALL`: every earlier setting is void afterwards.
pub fn resets_all(sql: &str) -> bool {
    let (t, n) = head::<3>(sql);
    let end = |i: usize| n == i || t[i].is_some_and(|t| t.is_punct(";"));
    (word(&t[0], "discard") || word(&t[0], "reset")) && word(&t[1], "all") && end(2)
}

/// `DISCARD ALL` (which also drops prepared statements, temp tables, listeners).
pub fn is_discard_all(sql: &str) -> bool {
    let (t, _) = head::<2>(sql);
    word(&t[0], "discard") && word(&t[1], "all")
}

/// What a statement does to `pgpilot.route`: `Some(true)` for
/// `SET [SESSION] pgpilot.route = 'primary'` (or `TO primary`), `Some(false)` for
/// any other value, `DEFAULT`, `RESET pgpilot.route`, `RESET ALL` and `DISCARD ALL`;
/// `None` when the statement does not touch it. The setting itself is a
/// PostgreSQL placeholder variable, so the server accepts and reports it too.
pub fn route_setting(sql: &str) -> Option<bool> {
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

#[cfg(test)]
mod tests {
    use super::*;

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

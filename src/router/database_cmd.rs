//! Statements PostgreSQL refuses while other sessions are connected to a
//! database (`55006 database "d" is being accessed by other users`):
//! `DROP DATABASE d`, `ALTER DATABASE d RENAME TO …`, `ALTER DATABASE d SET
//! TABLESPACE …` and `CREATE DATABASE … [TEMPLATE d]` (whose template is
//! `template1` when none is given). pgpilot's own idle pooled connections to
//! `d` are such sessions: the session closes them before it sends the
//! statement (`crate::backend::Pool::close_idle_database`).
//!
//! Token-based (see [`super::normalize::Lexer`]). The classifier only asks
//! whether a statement is one of these ([`is_exclusive`]); the name is read
//! from the raw text when the statement is sent ([`exclusive_databases`]):
//! a classification is cached by normalised text, which folds the literal of
//! `TEMPLATE 'd'`.

use super::normalize::{Kind, Lexer, Token, split_statements};

/// The database `CREATE DATABASE` copies when no `TEMPLATE` is given.
const DEFAULT_TEMPLATE: &str = "template1";

/// Whether the statement (one, as split by [`split_statements`]) needs a
/// database without other sessions.
pub(crate) fn is_exclusive(statement: &str) -> bool {
    exclusive_database(statement).is_some()
}

/// The databases the statements of `sql` need without other sessions, folded
/// as PostgreSQL folds names (unquoted: lower case).
pub(crate) fn exclusive_databases(sql: &str) -> Vec<String> {
    split_statements(sql)
        .iter()
        .filter_map(|s| exclusive_database(s.text))
        .collect()
}

/// The database one statement needs without other sessions, if any.
fn exclusive_database(statement: &str) -> Option<String> {
    let mut toks = Lexer::new(statement).take_while(|t| !t.is_punct(";"));
    let verb = toks.next()?;
    if verb.kind != Kind::Word || !toks.next()?.is_word("database") {
        return None;
    }
    if verb.is_word("drop") {
        let mut name = toks.next()?;
        if name.is_word("if") {
            toks.next()?.is_word("exists").then_some(())?;
            name = toks.next()?;
        }
        identifier(&name)
    } else if verb.is_word("alter") {
        let name = identifier(&toks.next()?)?;
        let (a, b) = (toks.next()?, toks.next()?);
        let exclusive = (a.is_word("rename") && b.is_word("to"))
            || (a.is_word("set") && b.is_word("tablespace"));
        exclusive.then_some(name)
    } else if verb.is_word("create") {
        identifier(&toks.next()?)?;
        Some(create_template(toks).unwrap_or_else(|| DEFAULT_TEMPLATE.to_string()))
    } else {
        None
    }
}

/// The `TEMPLATE` option among `CREATE DATABASE`'s options (`[WITH] name [=]
/// value …`, `CONNECTION LIMIT` being the one two-word name), or `None` for
/// the default template (none given, or `TEMPLATE DEFAULT`).
fn create_template<'a>(toks: impl Iterator<Item = Token<'a>>) -> Option<String> {
    let mut toks = toks.peekable();
    if toks.peek().is_some_and(|t| t.is_word("with")) {
        toks.next();
    }
    while let Some(option) = toks.next() {
        if option.is_word("connection") && toks.peek().is_some_and(|t| t.is_word("limit")) {
            toks.next();
        }
        if toks
            .peek()
            .is_some_and(|t| t.kind == Kind::Op && t.text == "=")
        {
            toks.next();
        }
        let mut value = toks.next()?;
        if value.kind == Kind::Op && (value.text == "-" || value.text == "+") {
            value = toks.next()?;
        }
        if option.is_word("template") {
            if value.is_word("default") {
                return None;
            }
            return identifier(&value).or_else(|| string_literal(&value));
        }
    }
    None
}

/// A name: an unquoted word folded to lower case, or a quoted identifier.
fn identifier(t: &Token<'_>) -> Option<String> {
    match t.kind {
        Kind::Word => Some(t.text.to_ascii_lowercase()),
        Kind::QuotedIdent if t.text.starts_with('"') && t.text.len() >= 2 => {
            Some(t.text[1..t.text.len() - 1].replace("\"\"", "\""))
        }
        _ => None,
    }
}

/// The value of a plain `'…'` string literal.
fn string_literal(t: &Token<'_>) -> Option<String> {
    (t.kind == Kind::Str && t.text.starts_with('\'') && t.text.len() >= 2)
        .then(|| t.text[1..t.text.len() - 1].replace("''", "'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Option<String> {
        let all = exclusive_databases(sql);
        assert!(all.len() <= 1, "{all:?}");
        all.into_iter().next()
    }

    #[test]
    fn drop_alter_and_create_name_their_database() {
        assert_eq!(one("DROP DATABASE d").as_deref(), Some("d"));
        assert_eq!(
            one("drop database if exists \"My\"\"Db\"").as_deref(),
            Some("My\"Db")
        );
        assert_eq!(one("DROP DATABASE D WITH (FORCE);").as_deref(), Some("d"));
        assert_eq!(one("/* c */ DROP DATABASE d (FORCE)").as_deref(), Some("d"));
        assert_eq!(one("ALTER DATABASE d RENAME TO e").as_deref(), Some("d"));
        assert_eq!(
            one("ALTER DATABASE d SET TABLESPACE t").as_deref(),
            Some("d")
        );
        assert_eq!(one("ALTER DATABASE d SET work_mem = 1"), None);
        assert_eq!(one("ALTER DATABASE d OWNER TO x"), None);
        assert_eq!(one("CREATE DATABASE e TEMPLATE d").as_deref(), Some("d"));
        assert_eq!(
            one("CREATE DATABASE e WITH OWNER = template CONNECTION LIMIT = -1 TEMPLATE = 'D x'")
                .as_deref(),
            Some("D x")
        );
        assert_eq!(one("CREATE DATABASE e").as_deref(), Some("template1"));
        assert_eq!(
            one("CREATE DATABASE e TEMPLATE DEFAULT").as_deref(),
            Some("template1")
        );
        assert_eq!(one("DROP TABLE d"), None);
        assert_eq!(one("SELECT 1"), None);
        assert_eq!(one("DROP DATABASE"), None);
        assert_eq!(
            exclusive_databases("DROP DATABASE a; DROP DATABASE b"),
            vec!["a".to_string(), "b".to_string()]
        );
        assert!(is_exclusive("drop database x"));
        assert!(!is_exclusive("drop schema x"));
    }
}

//! The cache key of a plain statement in one tight pass — the hot path of
//! every query's classification.
//!
//! [`normalize_plain`] produces exactly the key [`super::normalize::normalize`]
//! would, for the statements it accepts: ASCII words, numbers, simple string
//! literals, quoted identifiers, `$n` parameters, operators, punctuation and
//! comments (dropped). Anything else — backslashes, dollar quotes, prefixed strings
//! (`E'…'`, `U&"…"`), non-ASCII outside literals, unterminated literals,
//! numbers with odd suffixes, `SET`/`RESET` (whose literals are kept) — makes
//! it decline, and the caller runs the general lexer. Declining is always
//! safe; a test checks the two agree wherever the fast path accepts.

use super::normalize::{
    is_ident_cont, is_ident_start, is_op_char, number_end, quoted_end, trivia_end,
};

/// Write the cache key of `sql` into `out` (cleared first) and return true, or
/// return false (leaving `out` unspecified) if `sql` needs the general lexer.
pub fn normalize_plain(sql: &str, out: &mut String) -> bool {
    out.clear();
    let b = sql.as_bytes();
    let len = b.len();
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    let mut i = 0;
    let mut stmt_start = true;
    loop {
        i = trivia_end(b, i);
        if i >= len {
            return true;
        }
        let start = i;
        let (c, n) = (b[i], at(i + 1));
        if !out.is_empty() {
            out.push(' ');
        }
        let first = std::mem::replace(&mut stmt_start, false);
        if is_ident_start(c) {
            if n == b'\'' || n == b'&' {
                return false;
            }
            i += 1;
            while i < len && is_ident_cont(b[i]) {
                i += 1;
            }
            let word = &b[start..i];
            if !word.is_ascii()
                || (first
                    && (word.eq_ignore_ascii_case(b"set") || word.eq_ignore_ascii_case(b"reset")))
            {
                return false;
            }
            let from = out.len();
            if !push_slice(out, sql, start, i) {
                return false;
            }
            if let Some(w) = out.get_mut(from..) {
                w.make_ascii_lowercase();
            }
            continue;
        }
        match c {
            b'\'' | b'"' => {
                // Verbatim (a backslash, or never closed): the general lexer's.
                let (end, verbatim) = quoted_end(b, i, c, false);
                if verbatim {
                    return false;
                }
                if c == b'\'' {
                    out.push('?');
                } else {
                    if !push_slice(out, sql, start, end) {
                        return false;
                    }
                }
                i = end;
            }
            b'$' => {
                if !n.is_ascii_digit() {
                    return false;
                }
                i += 1;
                while at(i).is_ascii_digit() {
                    i += 1;
                }
                if !push_slice(out, sql, start, i) {
                    return false;
                }
            }
            b'0'..=b'9' | b'.' if c != b'.' || n.is_ascii_digit() => {
                // Radix prefixes and trailing identifier characters stay
                // verbatim in the general lexer's key.
                let radix = c == b'0' && matches!(n | 0x20, b'x' | b'o' | b'b');
                let (end, junk) = number_end(b, i);
                if radix || junk {
                    return false;
                }
                out.push('?');
                i = end;
            }
            b':' if n == b':' => {
                out.push_str("::");
                i += 2;
            }
            _ if is_op_char(c) => {
                i += 1;
                while i < len && is_op_char(b[i]) {
                    let (x, y) = (b[i], at(i + 1));
                    if (x == b'-' && y == b'-') || (x == b'/' && y == b'*') {
                        break;
                    }
                    i += 1;
                }
                if !push_slice(out, sql, start, i) {
                    return false;
                }
            }
            _ if c.is_ascii() => {
                out.push(c as char);
                i += 1;
                stmt_start = c == b';';
            }
            _ => return false,
        }
    }
}

/// Append `sql[start..end]`; false if that is not a character boundary.
fn push_slice(out: &mut String, sql: &str, start: usize, end: usize) -> bool {
    match sql.get(start..end) {
        Some(t) => {
            out.push_str(t);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::normalize::normalize;

    /// Where the fast path accepts, its key is the general lexer's.
    fn agrees(sql: &str) -> bool {
        let (mut fast, mut slow) = (String::new(), String::new());
        normalize(sql, &mut slow);
        let accepted = normalize_plain(sql, &mut fast);
        if accepted {
            assert_eq!(fast, slow, "keys differ for {sql:?}");
        }
        accepted
    }

    #[test]
    fn plain_statements_take_the_fast_path_with_the_same_key() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
            "select  a.x, \"Quoted\"\"Id\" FROM t a WHERE a.y='it''s' AND z <= -1.5e+3",
            "UPDATE t SET v = v + 1 WHERE id = $1 RETURNING *",
            "SELECT .5, 1_000, 2., 3.e2, x::int, a->>'k', b @> '{}' , c!=d; COMMIT",
            "INSERT INTO t VALUES (1, 'a'), (2, 'b'); SELECT 1",
            "SELECT 'naïve', \"ünï\" FROM t",
            "",
            "   ",
            ";;",
            "BEGIN; SELECT 1; END",
            "SELECT 1 -- c",
            "SELECT 1 -- c\n, 2",
            "SELECT /* c /* nested */ */ 1 /*x*/",
            "SELECT a+-- c\n1",
            "SELECT a*/* c */b",
            "/* pgpilot:standby */ SELECT 1",
            "SELECT 1 /* open",
        ] {
            assert!(agrees(sql), "declined {sql:?}");
        }
    }

    #[test]
    fn unusual_text_is_left_to_the_general_lexer() {
        for sql in [
            "SELECT E'\\n'",
            "SELECT 'a\\'",
            "SELECT U&\"x\"",
            "SELECT $$x$$",
            "SELECT $a$x$a$",
            "SELECT 0x1F",
            "SELECT 123abc",
            "SELECT 'open",
            "SELECT \"open",
            "SET search_path = 'a'",
            "select 1; reset all",
            "SELECT naïve FROM t",
            "SELECT x'1F'",
        ] {
            assert!(!agrees(sql), "accepted {sql:?}");
        }
    }

    #[test]
    fn random_token_soup_agrees() {
        const PIECES: &[&str] = &[
            "SELECT", "set", "Reset", "from", "x", "_y1$", " ", "  ", "\n", "\t", "'s'", "''",
            "'a''b'", "\"Q\"", "\"\"", "$1", "$", "12", "1.5", ".5", "1e3", "1e", "1.", "0x",
            "0b1", "1_0", "::", ":", ";", ",", "(", ")", "=", "<=", "->>", "-", "/", "*", "--",
            "/*", "*/", "\\", "E'", "U&", "é", "'é'", "[", "]", "?", "@", "#", "%", "^", "&", "|",
            "~", "!", "`", "..", "\u{0}",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut accepted = 0;
        for _ in 0..50_000 {
            let n = rng.usize(1..12);
            let sql: String = (0..n).map(|_| PIECES[rng.usize(..PIECES.len())]).collect();
            accepted += usize::from(agrees(&sql));
        }
        assert!(accepted > 5_000, "the fast path accepted only {accepted}");
    }
}

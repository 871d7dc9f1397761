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
    is_ident_cont, is_ident_start, is_op_char, is_space, number_end, quoted_end, trivia_end,
};

/// Write the cache key of `sql` into `out` (cleared first) and return true, or
/// return false (leaving `out` unspecified) if `sql` needs the general lexer.
///
/// Works on raw bytes, one pass, writing the key byte by byte (most tokens
/// are a few bytes long: a call to copy each would cost more than the copy).
/// It accepts only valid UTF-8 — ASCII outside literals and quoted
/// identifiers, valid UTF-8 inside them — so the key is valid UTF-8 and the
/// statement is what [`super::normalize::normalize`] would see as `&str`.
pub fn normalize_plain(b: &[u8], out: &mut Vec<u8>) -> bool {
    normalize_plain_literals(b, out, None)
}

/// [`normalize_plain`], also recording in `literals` (cleared first) where the
/// literals it replaced by `?` are in `b`, as `[start, end)` byte ranges: what
/// a [`super::memo::StatementMemo`] needs to recognise a statement of the same
/// shape without building its key.
pub(crate) fn normalize_plain_literals(
    b: &[u8],
    out: &mut Vec<u8>,
    mut literals: Option<&mut Vec<(usize, usize)>>,
) -> bool {
    if let Some(l) = literals.as_deref_mut() {
        l.clear();
    }
    out.clear();
    // A key is at most one byte per input byte plus one space per token.
    out.reserve(2 * b.len());
    let len = b.len();
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    let mut i = 0;
    let mut stmt_start = true;
    loop {
        // Whitespace inline; comments (rare) through the shared scanner.
        while i < len && is_space(b[i]) {
            i += 1;
        }
        if matches!((at(i), at(i + 1)), (b'-', b'-') | (b'/', b'*')) {
            let end = trivia_end(b, i);
            let comments = &b[i..end];
            if !comments.is_ascii() && std::str::from_utf8(comments).is_err() {
                return false;
            }
            i = end;
        }
        if i >= len {
            return true;
        }
        let start = i;
        let (c, n) = (b[i], at(i + 1));
        if !out.is_empty() {
            out.push(b' ');
        }
        let first = std::mem::replace(&mut stmt_start, false);
        if is_ident_start(c) {
            // Non-ASCII identifiers, and prefixed strings (E'', B'', X'', N'',
            // U&'', U&""), are the general lexer's.
            if !c.is_ascii() || n == b'\'' || n == b'&' {
                return false;
            }
            let from = out.len();
            out.push(c.to_ascii_lowercase());
            i += 1;
            while i < len && is_ident_cont(b[i]) {
                if !b[i].is_ascii() {
                    return false;
                }
                out.push(b[i].to_ascii_lowercase());
                i += 1;
            }
            // SET / RESET keep their literals (their values decide the class).
            if first && matches!(&out[from..], b"set" | b"reset") {
                return false;
            }
            continue;
        }
        match c {
            _ if literal_start(c, n) => {
                let Some(end) = plain_literal(b, i) else {
                    return false;
                };
                out.extend_from_slice(if c == b'\'' { b"'?'" } else { b"?" });
                if let Some(l) = literals.as_deref_mut() {
                    l.push((start, end));
                }
                i = end;
            }
            b'"' => {
                // Verbatim (a backslash, or never closed): the general lexer's.
                let (end, verbatim) = quoted_end(b, i, c, false);
                let inner = &b[start..end];
                if verbatim || (!inner.is_ascii() && std::str::from_utf8(inner).is_err()) {
                    return false;
                }
                out.extend_from_slice(inner);
                i = end;
            }
            b'$' => {
                if !n.is_ascii_digit() {
                    return false;
                }
                out.push(b'$');
                i += 1;
                while at(i).is_ascii_digit() {
                    out.push(b[i]);
                    i += 1;
                }
            }
            b':' if n == b':' => {
                out.extend_from_slice(b"::");
                i += 2;
            }
            _ if is_op_char(c) => {
                // An operator's `?` is doubled: `?` alone is a literal.
                out.push(c);
                if c == b'?' {
                    out.push(c);
                }
                i += 1;
                while i < len && is_op_char(b[i]) {
                    let (x, y) = (b[i], at(i + 1));
                    if (x == b'-' && y == b'-') || (x == b'/' && y == b'*') {
                        break;
                    }
                    out.push(x);
                    if x == b'?' {
                        out.push(x);
                    }
                    i += 1;
                }
            }
            _ if c.is_ascii() => {
                out.push(c);
                i += 1;
                stmt_start = c == b';';
            }
            _ => return false,
        }
    }
}

/// Whether a literal the plain path replaces by `?` starts with `c` (followed
/// by `n`): a simple string literal or a number.
pub(super) fn literal_start(c: u8, n: u8) -> bool {
    c == b'\'' || c.is_ascii_digit() || (c == b'.' && n.is_ascii_digit())
}

/// The end of the literal starting at `i` (where [`literal_start`] holds), or
/// `None` if it is one the general lexer must handle: a string with a
/// backslash, never closed or not UTF-8; a number with a radix prefix
/// (`0x1F`) or trailing identifier characters (`123abc`), which stay verbatim
/// in the general lexer's key.
pub(super) fn plain_literal(b: &[u8], i: usize) -> Option<usize> {
    let c = b[i];
    if c == b'\'' {
        let (end, verbatim) = quoted_end(b, i, c, false);
        let inner = &b[i..end];
        if verbatim || (!inner.is_ascii() && std::str::from_utf8(inner).is_err()) {
            return None;
        }
        return Some(end);
    }
    let n = b.get(i + 1).copied().unwrap_or(0);
    if c == b'0' && matches!(n | 0x20, b'x' | b'o' | b'b') {
        return None;
    }
    match number_end(b, i) {
        (_, true) => None,
        (end, false) => Some(end),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::normalize::normalize;

    /// Where the fast path accepts, its key is the general lexer's.
    fn agrees(sql: &str) -> bool {
        let (mut fast, mut slow) = (Vec::new(), String::new());
        normalize(sql, &mut slow);
        let accepted = normalize_plain(sql.as_bytes(), &mut fast);
        if accepted {
            assert_eq!(
                String::from_utf8(fast).unwrap(),
                slow,
                "keys differ for {sql:?}"
            );
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

    #[test]
    fn accepts_only_valid_utf8() {
        let mut key = Vec::new();
        for bad in [
            &b"SELECT '\xff'"[..],
            b"SELECT \"\xc3\" FROM t",
            b"SELECT 1 /* \xfe */",
            b"SELECT 1 -- \xe2\x82\n",
            b"SELECT \xff",
        ] {
            assert!(!normalize_plain(bad, &mut key), "accepted {bad:?}");
        }
        assert!(normalize_plain(
            "SELECT 'é' /* ü */ FROM t".as_bytes(),
            &mut key
        ));
        // Random byte soups: whatever is accepted is UTF-8 (so the key is too).
        let mut rng = fastrand::Rng::with_seed(11);
        const PIECES: &[&[u8]] = &[
            b"SELECT ",
            b"'",
            b"\"",
            b"/*",
            b"*/",
            b"--",
            b"\n",
            b" x ",
            b"1",
            b"\xff",
            b"\xc3",
            b"\xa9",
            "é".as_bytes(),
            b";",
        ];
        for _ in 0..20_000 {
            let n = rng.usize(1..10);
            let sql: Vec<u8> = (0..n)
                .flat_map(|_| PIECES[rng.usize(..PIECES.len())].iter().copied())
                .collect();
            if normalize_plain(&sql, &mut key) {
                assert!(std::str::from_utf8(&sql).is_ok(), "accepted {sql:?}");
                assert!(std::str::from_utf8(&key).is_ok());
            }
        }
    }
}

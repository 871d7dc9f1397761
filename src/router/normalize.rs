//! Cheap lexing of SQL text: routing hints and the classification cache key.
//!
//! This module owns everything that looks at SQL *without* parsing it:
//!
//! * [`hint`] reads a leading `/* pgpilot:primary */` or `/* pgpilot:standby */`
//!   comment.
//! * [`normalize`] turns a statement into the key of the classification cache
//!   (see [`crate::router::cache`]).
//! * [`Lexer`] is the single-pass tokenizer both are built on; the classifier
//!   uses it to split a query string into statements the way PostgreSQL does.
//!
//! The lexer follows PostgreSQL's rules (standard_conforming_strings = on):
//! `--` and nested `/* */` comments, `'...'` strings with doubled quotes,
//! `E'...'` strings with backslash escapes, `B'..'`, `X'..'`, `N'..'`, `U&'..'`,
//! `$tag$...$tag$` dollar quotes, `"quoted"` identifiers, `$1` parameters.
//! It never allocates, never panics, and treats anything unterminated as running
//! to the end of the input.
//!
//! # Hints and the cache key
//! Comments are not part of the cache key, so a hint comment does not change the
//! key: the caller must apply [`hint`] to the raw text *separately* from the
//! (cached) classification, e.g. `hint(sql)` first, then the cache.

/// A routing hint given by the client in a leading comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Hint {
    /// `/* pgpilot:primary */`: run on the primary.
    Primary,
    /// `/* pgpilot:standby */`: a standby may run it (writes still go to the primary).
    Standby,
}

/// The hint carried by a leading `/* pgpilot:primary */` or `/* pgpilot:standby */`
/// comment, if the comment is the first token of `sql` (whitespace around the words
/// and any letter case are accepted).
pub(crate) fn hint(sql: &[u8]) -> Option<Hint> {
    let body = trim_space(sql).strip_prefix(b"/*")?;
    let inner = &body[..body.windows(2).position(|w| w == b"*/")?];
    let colon = inner.iter().position(|&c| c == b':')?;
    let (word, target) = (trim_space(&inner[..colon]), trim_space(&inner[colon + 1..]));
    if !word.eq_ignore_ascii_case(b"pgpilot") {
        return None;
    }
    if target.eq_ignore_ascii_case(b"primary") {
        Some(Hint::Primary)
    } else if target.eq_ignore_ascii_case(b"standby") {
        Some(Hint::Standby)
    } else {
        None
    }
}

/// Write the cache key of `sql` into `out` (cleared first).
///
/// The key is the token sequence of `sql`, one space between tokens, with:
/// comments removed; unquoted identifiers and keywords in ASCII lower case;
/// `"quoted"` identifiers, `$1` parameters, operators and punctuation verbatim;
/// numeric literals, string literals (all prefixes) and dollar-quoted strings
/// replaced by `?`. So `WHERE aid = 17` and `where  aid=42` share a key.
///
/// Literals are kept verbatim where replacing them could change what the
/// statement means to the classifier:
/// * in statements whose first word is `SET` or `RESET` (the value of
///   `default_transaction_read_only` decides the classification), so such
///   statements are cached per value;
/// * string literals containing a backslash, and unterminated literals (their
///   extent depends on escaping rules, so they are never folded together);
/// * numbers immediately followed by identifier characters (`123abc`).
///
/// A number becomes `?`, a string `'?'`; a `?` of an operator is written `??`.
///
/// Comments are dropped: apply [`hint`] to the raw text separately.
pub fn normalize(sql: &str, out: &mut String) {
    out.clear();
    let mut stmt_start = true;
    let mut keep_literals = false;
    for tok in Lexer::new(sql) {
        if !out.is_empty() {
            out.push(' ');
        }
        match tok.kind {
            Kind::Word => {
                let start = out.len();
                out.push_str(tok.text);
                if let Some(s) = out.get_mut(start..) {
                    s.make_ascii_lowercase();
                }
                if stmt_start {
                    keep_literals = tok.is_word("set") || tok.is_word("reset");
                }
            }
            Kind::Number | Kind::Str | Kind::Dollar => {
                if keep_literals || tok.verbatim {
                    out.push_str(tok.text);
                } else if tok.kind == Kind::Number {
                    out.push('?');
                } else {
                    // Of another kind than a number's: `SELECT 1 1` and
                    // `SELECT 1 'a'` do not parse alike.
                    out.push_str("'?'");
                }
            }
            // `?` is the placeholder: in an operator (jsonb's `?`, `?|`) it is
            // doubled, so `1 ?` and `1 ''` do not share a key.
            Kind::Op if tok.text.contains('?') => {
                for c in tok.text.chars() {
                    out.push(c);
                    if c == '?' {
                        out.push('?');
                    }
                }
            }
            Kind::QuotedIdent | Kind::Param | Kind::Op | Kind::Punct => out.push_str(tok.text),
        }
        if tok.text == ";" && tok.kind == Kind::Punct {
            stmt_start = true;
            keep_literals = false;
        } else {
            if stmt_start && tok.kind != Kind::Word {
                keep_literals = false;
            }
            stmt_start = false;
        }
    }
}

/// The kind of a [`Token`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An unquoted identifier or keyword.
    Word,
    /// A `"quoted"` (or `U&"..."`) identifier, quotes included.
    QuotedIdent,
    /// A numeric literal.
    Number,
    /// A string literal with any prefix (`'..'`, `E'..'`, `B'..'`, `X'..'`, `N'..'`, `U&'..'`).
    Str,
    /// A dollar-quoted string `$tag$...$tag$`.
    Dollar,
    /// A positional parameter `$n`.
    Param,
    /// A run of operator characters (`<=`, `->>`, `=`, ...).
    Op,
    /// Any other single character (`(`, `)`, `,`, `;`, `.`, ...) or `::`.
    Punct,
}

/// One token of SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token<'a> {
    /// What the token is.
    pub(crate) kind: Kind,
    /// The token's text, exactly as in the input.
    pub(crate) text: &'a str,
    /// Byte offset of the token in the input.
    pub(crate) start: usize,
    /// A literal whose extent depends on escaping rules (contains a backslash) or
    /// that is unterminated, or a number with trailing identifier characters: it
    /// must not be folded into `?`.
    pub(crate) verbatim: bool,
}

impl Token<'_> {
    /// True if this is the unquoted word `w` (ASCII case-insensitive; `w` lower case).
    pub(crate) fn is_word(&self, w: &str) -> bool {
        self.kind == Kind::Word && self.text.eq_ignore_ascii_case(w)
    }

    /// True if this is the punctuation `p`.
    pub(crate) fn is_punct(&self, p: &str) -> bool {
        self.kind == Kind::Punct && self.text == p
    }
}

/// A single-pass SQL tokenizer that skips whitespace and comments.
#[derive(Debug, Clone)]
pub(crate) struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    /// Tokenize `src`.
    pub(crate) fn new(src: &'a str) -> Self {
        Self { src, pos: 0 }
    }

    fn byte(&self, i: usize) -> u8 {
        self.src.as_bytes().get(i).copied().unwrap_or(0)
    }

    fn len(&self) -> usize {
        self.src.len()
    }

    /// Skip whitespace and comments.
    fn skip_trivia(&mut self) {
        self.pos = trivia_end(self.src.as_bytes(), self.pos);
    }

    /// Scan a quoted literal whose opening quote is at `q`; returns (end, verbatim).
    fn scan_quoted(&self, q: usize, quote: u8, backslash_escapes: bool) -> (usize, bool) {
        quoted_end(self.src.as_bytes(), q, quote, backslash_escapes)
    }

    /// Scan a dollar quote whose opening `$tag$` spans `open`; returns (end, terminated).
    fn scan_dollar(&self, start: usize, tag_end: usize) -> (usize, bool) {
        let tag = &self.src.as_bytes()[start..tag_end];
        let body = &self.src.as_bytes()[tag_end..];
        match body.windows(tag.len()).position(|w| w == tag) {
            Some(p) => (tag_end + p + tag.len(), true),
            None => (self.len(), false),
        }
    }

    fn scan_number(&self, start: usize) -> (usize, bool) {
        number_end(self.src.as_bytes(), start)
    }

    fn make(&mut self, kind: Kind, start: usize, end: usize, verbatim: bool) -> Token<'a> {
        let end = end.min(self.len()).max(start);
        self.pos = end;
        Token {
            kind,
            text: self.src.get(start..end).unwrap_or(""),
            start,
            verbatim,
        }
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        self.skip_trivia();
        let start = self.pos;
        if start >= self.len() {
            return None;
        }
        let b = self.byte(start);
        let n = self.byte(start + 1);
        if is_ident_start(b) && n != b'\'' && n != b'&' {
            // Fast path: a plain identifier or keyword.
            let bytes = self.src.as_bytes();
            let mut i = start + 1;
            while i < bytes.len() && is_ident_cont(bytes[i]) {
                i += 1;
            }
            return Some(self.make(Kind::Word, start, i, false));
        }
        Some(match b {
            b'\'' => {
                let (end, v) = self.scan_quoted(start, b'\'', false);
                self.make(Kind::Str, start, end, v)
            }
            b'"' => {
                let (end, v) = self.scan_quoted(start, b'"', false);
                self.make(Kind::QuotedIdent, start, end, v)
            }
            b'$' if n.is_ascii_digit() => {
                let mut i = start + 1;
                while self.byte(i).is_ascii_digit() {
                    i += 1;
                }
                self.make(Kind::Param, start, i, false)
            }
            b'$' => {
                let mut i = start + 1;
                if is_ident_start(self.byte(i)) {
                    while is_ident_start(self.byte(i)) || self.byte(i).is_ascii_digit() {
                        i += 1;
                    }
                }
                if i < self.len() && self.byte(i) == b'$' {
                    let (end, terminated) = self.scan_dollar(start, i + 1);
                    self.make(Kind::Dollar, start, end, !terminated)
                } else {
                    self.make(Kind::Punct, start, start + 1, false)
                }
            }
            b'0'..=b'9' => {
                let (end, junk) = self.scan_number(start);
                self.make(Kind::Number, start, end, junk)
            }
            b'.' if n.is_ascii_digit() => {
                let (end, junk) = self.scan_number(start);
                self.make(Kind::Number, start, end, junk)
            }
            _ if is_ident_start(b) => {
                // String prefixes: E'..' (escapes), B'..', X'..', N'..', U&'..', U&"..".
                match (b | 0x20, n) {
                    (b'e', b'\'') => {
                        let (end, v) = self.scan_quoted(start + 1, b'\'', true);
                        return Some(self.make(Kind::Str, start, end, v));
                    }
                    (b'b' | b'x' | b'n', b'\'') => {
                        let (end, v) = self.scan_quoted(start + 1, b'\'', false);
                        return Some(self.make(Kind::Str, start, end, v));
                    }
                    (b'u', b'&') if matches!(self.byte(start + 2), b'\'' | b'"') => {
                        let q = self.byte(start + 2);
                        let (end, v) = self.scan_quoted(start + 2, q, false);
                        let kind = if q == b'"' {
                            Kind::QuotedIdent
                        } else {
                            Kind::Str
                        };
                        return Some(self.make(kind, start, end, v));
                    }
                    _ => {}
                }
                let mut i = start + 1;
                while i < self.len() && is_ident_cont(self.byte(i)) {
                    i += 1;
                }
                self.make(Kind::Word, start, i, false)
            }
            b':' if n == b':' => self.make(Kind::Punct, start, start + 2, false),
            _ if is_op_char(b) => {
                let mut i = start + 1;
                while i < self.len() && is_op_char(self.byte(i)) {
                    let (c, d) = (self.byte(i), self.byte(i + 1));
                    if (c == b'-' && d == b'-') || (c == b'/' && d == b'*') {
                        break;
                    }
                    i += 1;
                }
                self.make(Kind::Op, start, i, false)
            }
            _ => self.make(Kind::Punct, start, start + 1, false),
        })
    }
}

/// How many leading tokens [`Statement::head`] keeps.
pub(crate) const HEAD_TOKENS: usize = 16;

/// Words that build left-deep expression chains in a parser (see [`Statement::chain`]).
#[rustfmt::skip]
const CHAIN_WORDS: &[&str] = &[
    "and", "between", "collate", "except", "ilike", "in", "intersect", "is", "like", "not",
    "or", "overlaps", "similar", "union",
];

/// One statement of a query string, as split by [`split_statements`].
#[derive(Debug, Clone)]
pub(crate) struct Statement<'a> {
    /// The statement's text, from its first token up to (not including) its `;`.
    pub(crate) text: &'a str,
    /// Its first [`HEAD_TOKENS`] tokens.
    pub(crate) head: Vec<Token<'a>>,
    /// Number of operator-like tokens (operators, `::`, `[`, AND/OR/UNION/...):
    /// a bound on how deep a parser's expression tree for it can get.
    pub(crate) chain: usize,
}

impl Statement<'_> {
    /// True if the first token is the word `w` (lower case).
    pub(crate) fn starts_with_word(&self, w: &str) -> bool {
        self.head.first().is_some_and(|t| t.is_word(w))
    }
}

/// Split `sql` into its non-empty statements at top-level `;`, as PostgreSQL's
/// psql does: `;` inside literals, quoted identifiers, comments, or the
/// `BEGIN ATOMIC ... END` body of `CREATE [OR REPLACE] FUNCTION|PROCEDURE` does
/// not end a statement.
pub(crate) fn split_statements(sql: &str) -> Vec<Statement<'_>> {
    let mut out = Vec::new();
    let mut cur: Option<Statement<'_>> = None;
    let mut depth = 0usize;
    for tok in Lexer::new(sql) {
        if tok.is_punct(";") && depth == 0 {
            if let Some(mut st) = cur.take() {
                st.text = sql.get(st.head[0].start..tok.start).unwrap_or("");
                out.push(st);
            }
            continue;
        }
        let st = cur.get_or_insert_with(|| Statement {
            text: "",
            head: Vec::with_capacity(HEAD_TOKENS),
            chain: 0,
        });
        if st.head.len() < HEAD_TOKENS {
            st.head.push(tok);
        }
        match tok.kind {
            Kind::Op => st.chain += 1,
            Kind::Punct if tok.text == "::" || tok.text == "[" => st.chain += 1,
            Kind::Word => {
                if CHAIN_WORDS.iter().any(|w| tok.text.eq_ignore_ascii_case(w)) {
                    st.chain += 1;
                }
                if tok.is_word("begin") {
                    if is_routine(&st.head) {
                        depth += 1;
                    }
                } else if tok.is_word("case") {
                    if depth > 0 {
                        depth += 1;
                    }
                } else if tok.is_word("end") {
                    depth = depth.saturating_sub(1);
                }
            }
            _ => {}
        }
    }
    if let Some(mut st) = cur.take() {
        st.text = sql.get(st.head[0].start..).unwrap_or("");
        out.push(st);
    }
    out
}

/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE`: a body may be `BEGIN ATOMIC ... END`.
fn is_routine(head: &[Token<'_>]) -> bool {
    let routine =
        |t: Option<&Token<'_>>| t.is_some_and(|t| t.is_word("function") || t.is_word("procedure"));
    let Some(first) = head.first() else {
        return false;
    };
    first.is_word("create")
        && (routine(head.get(1))
            || (head.get(1).is_some_and(|t| t.is_word("or"))
                && head.get(2).is_some_and(|t| t.is_word("replace"))
                && routine(head.get(3))))
}

const SPACE: u8 = 1;
const IDENT_START: u8 = 2;
const IDENT_CONT: u8 = 4;
const OP: u8 = 8;

/// End of the whitespace and comments (`--` to the end of the line, nested
/// `/* */`) starting at `i`.
pub(super) fn trivia_end(b: &[u8], mut i: usize) -> usize {
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    loop {
        if i < b.len() && is_space(b[i]) {
            i += 1;
        } else if at(i) == b'-' && at(i + 1) == b'-' {
            // PostgreSQL ends a `--` comment at a carriage return too.
            i = match b[i..].iter().position(|&c| c == b'\n' || c == b'\r') {
                Some(n) => i + n + 1,
                None => b.len(),
            };
        } else if at(i) == b'/' && at(i + 1) == b'*' {
            // PostgreSQL refuses a comment that never closes: its text is
            // kept as tokens, so the key is not that of the statement
            // without it (found by the classify fuzz target).
            match block_comment_end(b, i) {
                Some(end) => i = end,
                None => return i,
            }
        } else {
            return i;
        }
    }
}

/// Scan a quoted literal or identifier whose opening quote is at `q`; returns
/// (end, verbatim). Verbatim: it holds a backslash (its extent depends on
/// escaping rules) or never ends.
pub(super) fn quoted_end(b: &[u8], q: usize, quote: u8, backslash_escapes: bool) -> (usize, bool) {
    let mut i = q + 1;
    let mut saw_backslash = false;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' {
            saw_backslash = true;
            i += if backslash_escapes { 2 } else { 1 };
        } else if c == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return (i + 1, saw_backslash);
            }
        } else {
            i += 1;
        }
    }
    (b.len(), true)
}

/// Scan a number starting at `start` (radix prefixes, `_`, a fraction, an
/// exponent); returns (end, junk): identifier characters right after it
/// (`123abc`) are swallowed and make it one verbatim token.
pub(super) fn number_end(b: &[u8], start: usize) -> (usize, bool) {
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    // Digits with `_` only between two of them, as PostgreSQL 16 reads
    // `1_000`: `1_` or `1__0` is a number followed by junk, a statement that
    // must not share the key (and the classification) of `1`.
    let run = |mut i: usize, digit: fn(&u8) -> bool| {
        let first = i;
        while digit(&at(i)) || (at(i) == b'_' && i > first && digit(&at(i + 1))) {
            i += 1;
        }
        i
    };
    let mut i = start;
    // Only the radix's own digits: `0o2r` is `0o2` and junk.
    let radix: Option<fn(&u8) -> bool> = match at(i + 1) | 0x20 {
        _ if at(i) != b'0' => None,
        b'x' => Some(u8::is_ascii_hexdigit),
        b'o' => Some(|c| (b'0'..=b'7').contains(c)),
        b'b' => Some(|c| matches!(c, b'0' | b'1')),
        _ => None,
    };
    if let Some(digit) = radix.filter(|digit| digit(&at(i + 2))) {
        i = run(i + 2, digit);
    } else {
        i = run(i, u8::is_ascii_digit);
        if at(i) == b'.' && at(i + 1) != b'.' {
            i = run(i + 1, u8::is_ascii_digit);
        }
        if at(i) | 0x20 == b'e' {
            let mut j = i + 1;
            if matches!(at(j), b'+' | b'-') {
                j += 1;
            }
            if at(j).is_ascii_digit() {
                i = j;
                while at(i).is_ascii_digit() {
                    i += 1;
                }
            }
        }
    }
    let mut junk = false;
    while i < b.len() && is_ident_cont(b[i]) {
        junk = true;
        i += 1;
    }
    (i, junk)
}

/// End of the (nested) block comment opening at `start`, or `None` if it
/// never closes.
fn block_comment_end(b: &[u8], start: usize) -> Option<usize> {
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    let mut depth = 0usize;
    let mut i = start;
    while i < b.len() {
        if at(i) == b'/' && at(i + 1) == b'*' {
            depth += 1;
            i += 2;
        } else if at(i) == b'*' && at(i + 1) == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// Character classes of bytes, as PostgreSQL's lexer sees them.
static CLASS: [u8; 256] = classes();

const fn classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut c = 0;
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            c |= SPACE;
        }
        // Identifier start: letters, `_`, and any non-ASCII byte.
        if b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 {
            c |= IDENT_START | IDENT_CONT;
        }
        if b.is_ascii_digit() || b == b'$' {
            c |= IDENT_CONT;
        }
        #[rustfmt::skip]
        let op = matches!(
            b,
            b'+' | b'-' | b'*' | b'/' | b'<' | b'>' | b'=' | b'~' | b'!' | b'@' | b'#' | b'%' | b'^'
                | b'&' | b'|' | b'`' | b'?'
        );
        if op {
            c |= OP;
        }
        t[i] = c;
        i += 1;
    }
    t
}

/// `b` without SQL whitespace at either end.
fn trim_space(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&c| !is_space(c)).unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|&c| !is_space(c))
        .map_or(start, |n| n + 1);
    &b[start..end]
}

pub(super) fn is_space(b: u8) -> bool {
    CLASS[b as usize] & SPACE != 0
}

pub(super) fn is_ident_start(b: u8) -> bool {
    CLASS[b as usize] & IDENT_START != 0
}

pub(super) fn is_ident_cont(b: u8) -> bool {
    CLASS[b as usize] & IDENT_CONT != 0
}

pub(super) fn is_op_char(b: u8) -> bool {
    CLASS[b as usize] & OP != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sql: &str) -> String {
        let mut s = String::new();
        normalize(sql, &mut s);
        s
    }

    #[test]
    fn literals_and_whitespace_are_folded() {
        assert_eq!(
            key("SELECT * FROM t WHERE aid = 17"),
            key("select *  from t\nwhere aid=42")
        );
        assert_eq!(key("WHERE aid = 17"), "where aid = ?");
        assert_eq!(
            key("x = 'a''b' AND y = E'\\n' AND z = $f$ ; $f$"),
            "x = '?' and y = E'\\n' and z = '?'"
        );
        assert_eq!(key("a = 1.5e-3 + .5 + 0x1F + 1_000"), "a = ? + ? + ? + ?");
        assert_eq!(
            key("b = B'0101' OR c = X'ff' OR d = U&'x'"),
            "b = '?' or c = '?' or d = '?'"
        );
    }

    #[test]
    fn different_tables_and_identifiers_differ() {
        assert_ne!(
            key("SELECT a FROM t1 WHERE x = 1"),
            key("SELECT a FROM t2 WHERE x = 1")
        );
        assert_ne!(key(r#"SELECT "A" FROM t"#), key("SELECT a FROM t"));
        assert_eq!(
            key(r#"SELECT "A"."b c" FROM t"#),
            r#"select "A" . "b c" from t"#
        );
    }

    #[test]
    fn comments_are_dropped_and_separate_tokens() {
        assert_eq!(
            key("/* pgpilot:standby */ SELECT 1 -- x\n FROM/*a /* nested */ b*/t"),
            "select ? from t"
        );
        assert_eq!(key("a/**/b"), "a b");
        assert_eq!(key("a--x"), "a");
    }

    #[test]
    fn classification_relevant_tokens_are_kept() {
        assert_eq!(
            key("SELECT nextval('s') FROM t FOR UPDATE"),
            "select nextval ( '?' ) from t for update"
        );
        assert_eq!(key("SELECT $1::int, $2"), "select $1 :: int , $2");
        assert_eq!(key("a <= b AND c->>'k'"), "a <= b and c ->> '?'");
    }

    #[test]
    fn set_statements_keep_literals() {
        assert_eq!(
            key("SET default_transaction_read_only = 'off'"),
            "set default_transaction_read_only = 'off'"
        );
        assert_ne!(
            key("select 1; set default_transaction_read_only = 1"),
            key("select 1; set default_transaction_read_only = 0")
        );
        assert_eq!(key("SELECT 1; SELECT 2"), "select ? ; select ?");
        assert_eq!(key("UPDATE t SET a = 1"), "update t set a = ?");
    }

    #[test]
    fn backslash_and_unterminated_literals_stay_verbatim() {
        assert_eq!(
            key(r"SELECT 'a\'; DELETE FROM t; --'"),
            r"select 'a\' ; delete from t ;"
        );
        assert_eq!(key("SELECT 'abc"), "select 'abc");
        assert_eq!(key("SELECT $q$abc"), "select $q$abc");
        assert_eq!(key("SELECT \"abc"), "select \"abc");
        assert_eq!(key("SELECT 1 /* open"), "select ? /* open");
        assert_ne!(key("SELECT 1, 2 /* /* */"), key("SELECT 1, 2"));
        assert_eq!(key("SELECT 123abc"), "select 123abc");
        // A misplaced `_` is junk too (found by the classify fuzz target:
        // `SELECT 1_` shared the key of `SELECT 1`).
        assert_eq!(key("SELECT 1_"), "select 1_");
        assert_eq!(key("SELECT 1__0, 0x_1"), "select 1__0 , 0x_1");
        assert_eq!(key("SELECT 1_0, 0x1_f"), "select ? , ?");
        // Only the radix's digits (found by the classify fuzz target:
        // `select 0o2r u` shared the key of `select 0o2 u`).
        assert_eq!(
            key("SELECT 0o2r u, 0b12, 0xfg"),
            "select 0o2r u , 0b12 , 0xfg"
        );
        assert_eq!(key("SELECT 0o17, 0b1_0, 0xFF"), "select ? , ? , ?");
        // A `--` comment ends at a carriage return, as in PostgreSQL (found
        // by the classify fuzz target).
        assert_eq!(
            key("SELECT 1; -- c\rDELETE FROM t"),
            "select ? ; delete from t"
        );
        // An operator's `?` is not a literal's placeholder (found by the
        // classify fuzz target: `SELECT 1?` shared the key of `SELECT 1''`).
        assert_ne!(key("SELECT 1?"), key("SELECT 1''"));
        // Nor are a number and a string (`SELECT 1 1` fails to parse where
        // `SELECT 1 'a'` parses).
        assert_ne!(key("SELECT 1 1"), key("SELECT 1 'a'"));
        assert_eq!(key("SELECT j ? 'a', j ?| b"), "select j ?? '?' , j ??| b");
    }

    #[test]
    fn hint_is_read_only_from_a_leading_comment() {
        assert_eq!(hint(b"/* pgpilot:primary */ SELECT 1"), Some(Hint::Primary));
        assert_eq!(
            hint(b"  /*PGPILOT : Standby*/SELECT 1"),
            Some(Hint::Standby)
        );
        assert_eq!(hint(b"\n/*  pgpilot:standby  */"), Some(Hint::Standby));
        assert_eq!(hint(b"SELECT 1 /* pgpilot:primary */"), None);
        assert_eq!(hint(b"-- x\n/* pgpilot:primary */ SELECT 1"), None);
        assert_eq!(hint(b"/* pgpilot:other */ SELECT 1"), None);
        assert_eq!(hint(b"/* pgpilot:primary"), None);
        assert_eq!(hint(b""), None);
    }

    #[test]
    fn lexer_never_panics_on_odd_input() {
        #[rustfmt::skip]
        let inputs = [
            "'", "\"", "$", "$a", "$a$", "$a$x$a", "E'\\", "U&", "u&'", "/*", "/* /* */", "--",
            "0x", "1e", "1e+", ".", "..", "::", ":", "é'ü'", "\u{0}\u{1}", "$1$2", "1.2.3",
            "$é$x$é$",
        ];
        for s in inputs {
            let mut out = String::new();
            normalize(s, &mut out);
            let total: usize = Lexer::new(s).map(|t| t.text.len()).sum();
            assert!(total <= s.len());
        }
    }

    #[test]
    fn statements_are_split_at_top_level_semicolons() {
        let texts = |sql: &str| -> Vec<String> {
            split_statements(sql)
                .into_iter()
                .map(|s| s.text.to_string())
                .collect()
        };
        assert_eq!(
            texts("BEGIN; SELECT ';'; -- ;\n COMMIT;"),
            ["BEGIN", "SELECT ';'", "COMMIT"]
        );
        assert_eq!(texts(" ; ;; /* ; */ "), Vec::<String>::new());
        assert_eq!(
            texts("SELECT $$;$$; SELECT \";\""),
            ["SELECT $$;$$", "SELECT \";\""]
        );
        let f = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END";
        assert_eq!(texts(&format!("{f}; END")), [f, "END"]);
        assert_eq!(
            split_statements("SELECT a + b::int FROM t WHERE x AND y")[0].chain,
            3
        );
    }
}

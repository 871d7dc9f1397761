//! A session's memory of the shapes of its latest statements: the cheapest
//! classification there is.
//!
//! Applications send the same few statements over and over with different
//! literals (`… WHERE aid = 17`, then `… WHERE aid = 42`). The cache
//! ([`super::cache`]) already classifies them once, but each lookup still
//! builds the normalised key, hashes it and takes a shard's lock. The memo
//! skips all of that: it keeps, for the last few statements the session sent,
//! their text and where their literals are, and recognises a new statement
//! whose text is the same outside those literals, with a literal of the same
//! kind at each of them — a byte comparison and a scan of each literal.
//!
//! Such a statement has exactly the remembered statement's cache key. The
//! bytes before each literal are identical, so the key's lexer is in the same
//! state when it reaches it; the new literal starts with a byte of the same
//! kind (quote, digit, or `.` before a digit), so the token before it ends at
//! the same place; [`plain_literal`] accepts it, so the key gets `?` for it as
//! it did for the old one; and the rest up to the next literal is identical
//! again. So it has the same classification — unless a reload emptied the
//! cache since, which the remembered generation catches.
//!
//! Only statements the plain-statement fast path keyed are remembered (it is
//! the one that reports where the literals are); `SET`/`RESET`, whose literals
//! are part of their key, never are.

use std::sync::Arc;

use super::classify::Classification;
use super::normalize_fast::{literal_start, plain_literal};

/// How many statement shapes a session remembers (a transaction of a few
/// statements repeated, such as pgbench's TPC-B-like script, fits).
const SHAPES: usize = 6;

/// Statements longer than this are not remembered (bounds each session's memo).
const MAX_TEXT: usize = 1024;

/// One remembered statement.
#[derive(Debug)]
struct Shape {
    /// Its text, as sent. Reused when the slot is taken over (no allocation
    /// once the memo is warm).
    text: Vec<u8>,
    /// Where its literals are in `text`, `[start, end)`, in order.
    literals: Vec<(usize, usize)>,
    /// Its classification.
    class: Arc<Classification>,
    /// The cache generation it was classified under.
    generation: u64,
}

/// The statement shapes one session sent last (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct StatementMemo {
    /// At most [`SHAPES`], the most recently found or added first.
    shapes: Vec<Shape>,
}

impl StatementMemo {
    /// The classification of `sql` if it has the shape of a remembered
    /// statement classified under `generation` (the cache's current one).
    pub(crate) fn find(&mut self, sql: &[u8], generation: u64) -> Option<Arc<Classification>> {
        let i = self
            .shapes
            .iter()
            .position(|s| s.generation == generation && same_shape(&s.text, &s.literals, sql))?;
        // Move to the front: the next statement is most likely the same one.
        if i > 0 {
            self.shapes[..=i].rotate_right(1);
        }
        Some(self.shapes[0].class.clone())
    }

    /// Remember `sql` (with its literals where the plain-statement fast path
    /// found them), replacing the least recently used shape when full.
    pub(crate) fn remember(
        &mut self,
        sql: &[u8],
        literals: &[(usize, usize)],
        class: Arc<Classification>,
        generation: u64,
    ) {
        if sql.len() > MAX_TEXT {
            return;
        }
        let mut shape = if self.shapes.len() < SHAPES {
            Shape {
                text: Vec::with_capacity(sql.len()),
                literals: Vec::with_capacity(literals.len()),
                class: class.clone(),
                generation,
            }
        } else {
            self.shapes.pop().expect("full")
        };
        shape.text.clear();
        shape.text.extend_from_slice(sql);
        shape.literals.clear();
        shape.literals.extend_from_slice(literals);
        shape.class = class;
        shape.generation = generation;
        self.shapes.insert(0, shape);
    }
}

/// Whether `new` is `old` with other literals of the same kinds at `old`'s
/// literal positions (see the module docs for why that means the same key).
fn same_shape(old: &[u8], literals: &[(usize, usize)], new: &[u8]) -> bool {
    // The common case of a different statement fails on its first bytes.
    let mut o = 0;
    let mut n = 0;
    for &(start, end) in literals {
        let between = &old[o..start];
        if new.get(n..n + between.len()) != Some(between) {
            return false;
        }
        n += between.len();
        let (c, next) = (old[start], new.get(n).copied().unwrap_or(0));
        let after = new.get(n + 1).copied().unwrap_or(0);
        let same_kind = match c {
            b'\'' => next == b'\'',
            b'.' => next == b'.',
            _ => next.is_ascii_digit(),
        };
        if !same_kind || !literal_start(next, after) {
            return false;
        }
        match plain_literal(new, n) {
            Some(e) => n = e,
            None => return false,
        }
        o = end;
    }
    new.get(n..) == Some(&old[o..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::normalize_fast::normalize_plain_literals;

    /// Remember `old` as the fast path saw it; whether `new` is recognised.
    fn recognised(old: &str, new: &str) -> bool {
        let (mut key, mut lits) = (Vec::new(), Vec::new());
        if !normalize_plain_literals(old.as_bytes(), &mut key, Some(&mut lits)) {
            return false;
        }
        same_shape(old.as_bytes(), &lits, new.as_bytes())
    }

    fn key(sql: &[u8]) -> Option<Vec<u8>> {
        let mut k = Vec::new();
        normalize_plain_literals(sql, &mut k, None).then_some(k)
    }

    #[test]
    fn the_same_statement_with_other_literals_is_recognised() {
        let pgbench = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;";
        assert!(recognised(
            pgbench,
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7;"
        ));
        assert!(recognised(
            "UPDATE t SET a = a + -5, b = 'x' WHERE id = 1.5e3",
            "UPDATE t SET a = a + -123456, b = 'it''s é' WHERE id = 0.5"
        ));
        assert!(recognised("SELECT 1", "SELECT 22"));
    }

    #[test]
    fn anything_else_is_not() {
        let base = "SELECT a FROM t WHERE id = 5 AND s = 'x'";
        for other in [
            "SELECT a FROM t WHERE id = 5 AND s = 'x' ",
            "SELECT a FROM t WHERE id = 5 AND s = x",
            "SELECT a FROM t WHERE id = 'a' AND s = 'x'",
            "SELECT a FROM t WHERE id = 5 AND s = 5",
            "SELECT a FROM t WHERE id = 5abc AND s = 'x'",
            "SELECT a FROM t WHERE id = 0x1F AND s = 'x'",
            "SELECT a FROM t WHERE id = 5 AND s = 'a\\'",
            "SELECT a FROM t WHERE id = 5 AND s = 'open",
            "SELECT a FROM t WHERE id = 5 AND s = 'x' OR 1",
            "SELECT b FROM t WHERE id = 5 AND s = 'x'",
            "SELECT a FROM t WHERE id = 5",
            "",
        ] {
            assert!(!recognised(base, other), "{other:?}");
        }
        assert!(!recognised("SELECT 1", "SELECT .5"));
        assert!(!recognised("SELECT .5", "SELECT ."));
        assert!(!recognised("SELECT 'a'", "SELECT '\u{ff}'\u{0}"));
    }

    /// Whatever is recognised has the remembered statement's key.
    #[test]
    fn recognised_statements_have_the_same_key() {
        const PIECES: &[&str] = &[
            "SELECT", "x", " ", "\n", "'s'", "''", "'a''b'", "'\\'", "'é'", "\"Q\"", "$1", "12",
            "1.5", ".5", "1e3", "1e", "1.", "0x1", "1a", "1_0", "::", ";", ",", "(", "=", "-",
            "--c\n", "/*c*/", ".", "..", "'", "e", "+",
        ];
        const LITERALS: &[&str] = &[
            "1", "22", "1.5", ".5", "5.", "1e3", "1e+4", "1_000", "'a'", "''", "'b''c'", "'é'",
            "0x1", "7a", "'\\'", "'", ".", "1..2", "1.2.3", "e5",
        ];
        let mut rng = fastrand::Rng::with_seed(3);
        let mut hits = 0;
        for _ in 0..100_000 {
            let n = rng.usize(1..10);
            let old: String = (0..n).map(|_| PIECES[rng.usize(..PIECES.len())]).collect();
            let (mut k, mut lits) = (Vec::new(), Vec::new());
            if !normalize_plain_literals(old.as_bytes(), &mut k, Some(&mut lits)) {
                continue;
            }
            // Replace some literals, or mutate a byte.
            let mut new = old.clone().into_bytes();
            for &(s, e) in lits.iter().rev() {
                if rng.bool() {
                    let l = LITERALS[rng.usize(..LITERALS.len())];
                    new.splice(s..e, l.bytes());
                }
            }
            if rng.usize(..4) == 0 && !new.is_empty() {
                let at = rng.usize(..new.len());
                new[at] = PIECES[rng.usize(..PIECES.len())].as_bytes()[0];
            }
            if same_shape(old.as_bytes(), &lits, &new) {
                hits += 1;
                assert_eq!(
                    key(&new),
                    Some(k),
                    "{old:?} -> {:?}",
                    String::from_utf8_lossy(&new)
                );
            }
        }
        assert!(hits > 10_000, "only {hits} recognised");
    }

    #[test]
    fn the_memo_keeps_the_latest_shapes_of_its_generation() {
        let class = |n| {
            let mut c = Classification::empty();
            c.statements = n;
            Arc::new(c)
        };
        let mut memo = StatementMemo::default();
        let (mut k, mut lits) = (Vec::new(), Vec::new());
        let mut add = |memo: &mut StatementMemo, sql: &str, n, g| {
            assert!(normalize_plain_literals(
                sql.as_bytes(),
                &mut k,
                Some(&mut lits)
            ));
            memo.remember(sql.as_bytes(), &lits, class(n), g);
        };
        for i in 0..SHAPES {
            add(&mut memo, &format!("SELECT {i} FROM t{i}"), i, 1);
        }
        assert_eq!(memo.find(b"SELECT 9 FROM t0", 1).unwrap().statements, 0);
        assert!(memo.find(b"SELECT 9 FROM t0", 2).is_none(), "generation");
        // t0 was used last: adding one more drops t1.
        add(&mut memo, "SELECT 1 FROM u", 99, 1);
        assert!(memo.find(b"SELECT 9 FROM t1", 1).is_none());
        assert_eq!(memo.find(b"SELECT 9 FROM t0", 1).unwrap().statements, 0);
        assert_eq!(memo.find(b"SELECT 3 FROM u", 1).unwrap().statements, 99);
        assert_eq!(memo.shapes.len(), SHAPES);
    }
}

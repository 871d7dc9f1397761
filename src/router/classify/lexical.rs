//! Lexical classification of statements sqlparser cannot (or is not asked to)
//! parse, and lexical checks applied to every statement. Part of [`super`].

use super::{MAY_READ_STARTS, Part, SESSION_ADVISORY_LOCKS, STICKY_SETTINGS, TxControl};
use crate::router::normalize::{Kind, Lexer, Statement as Piece, Token};

/// Whether the statement's first word allows it to be a read at all.
pub(super) fn may_read(piece: &Piece<'_>) -> bool {
    match piece.head.first() {
        Some(t) if t.kind == Kind::Word => MAY_READ_STARTS.iter().any(|w| t.is_word(w)),
        Some(t) => t.is_punct("("),
        None => true,
    }
}

/// Whether a comment starts right after an operator (`~~--`, `+/*`).
/// PostgreSQL ends the operator there; sqlparser's lexing of custom
/// operators may not, and reads the comment as part of the statement (found
/// by the classify fuzz target: `SELECT 'x' ~~-- a` parsed as a read). What
/// it then parses is not what PostgreSQL runs: a doubt, so a write.
pub(super) fn comment_glued_to_operator(text: &str) -> bool {
    let b = text.as_bytes();
    if memchr::memmem::find(b, b"--").is_none() && memchr::memmem::find(b, b"/*").is_none() {
        return false;
    }
    Lexer::new(text).any(|t| {
        let end = t.start + t.text.len();
        t.kind == Kind::Op && matches!(b.get(end..end + 2), Some(b"--" | b"/*"))
    })
}

/// Words seen in a statement's tokens that signal stickiness.
#[derive(Debug, Default)]
struct Words {
    /// `CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP|TEMPORARY`.
    temp_in_head: bool,
    /// `INTO TEMP` / `INTO TEMPORARY`.
    into_temp: bool,
    /// An identifier starting with `pg_temp`.
    pg_temp: bool,
    /// `WITH HOLD`.
    hold: bool,
    advisory_lock: bool,
    set_config: bool,
    sticky_setting: bool,
    /// `serializable` or `default_transaction_isolation` (a SET of them may make
    /// every later transaction serializable).
    serializable: bool,
}

fn words(text: &str) -> Words {
    let mut w = Words::default();
    let mut prev = "";
    for (i, tok) in Lexer::new(text).enumerate() {
        let ident = match tok.kind {
            Kind::Word => tok.text,
            Kind::QuotedIdent => tok.text.trim_matches('"'),
            _ => {
                prev = "";
                continue;
            }
        };
        let is = |word: &str| ident.eq_ignore_ascii_case(word);
        let after = |words: &[&str]| words.iter().any(|p| prev.eq_ignore_ascii_case(p));
        if is("temp") || is("temporary") {
            w.temp_in_head |= i < 6 && after(&["create", "global", "local", "replace"]);
            w.into_temp |= after(&["into"]);
        }
        w.pg_temp |= ident
            .as_bytes()
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"pg_temp"));
        w.hold |= is("hold") && after(&["with"]);
        w.advisory_lock |= SESSION_ADVISORY_LOCKS.iter().any(|f| is(f));
        w.set_config |= is("set_config");
        w.sticky_setting |= STICKY_SETTINGS.iter().any(|s| is(s));
        w.serializable |= is("serializable") || is("default_transaction_isolation");
        prev = ident;
    }
    w
}

/// Stickiness visible in the tokens, applied whether or not the statement parsed.
pub(super) fn lexical_sticky(piece: &Piece<'_>, part: &mut Part) {
    let first = |w: &str| piece.starts_with_word(w);
    if !(first("create") || first("select") || first("with") || first("listen") || first("declare"))
    {
        return;
    }
    let w = words(piece.text);
    part.sticky |= (first("create") && (w.temp_in_head || w.pg_temp))
        || ((first("select") || first("with")) && w.into_temp)
        || first("listen")
        || (first("declare") && w.hold);
}

/// A statement sqlparser could not parse (or was not asked to): Write, with
/// transaction control, session state and stickiness read from its words.
pub(super) fn fallback(piece: &Piece<'_>) -> Part {
    if let Some(part) = exact_tx(piece.text) {
        return part;
    }
    let first = |w: &str| piece.starts_with_word(w);
    let w = words(piece.text);
    let set = first("set") || first("reset");
    Part {
        write: true,
        parse_failed: true,
        // What did not parse may be DDL.
        catalog_change: true,
        tx: loose_tx(&piece.head),
        session_state: set || first("discard") || first("deallocate"),
        sticky: w.advisory_lock || w.set_config || (set && (w.sticky_setting || w.serializable)),
        deallocate: if first("deallocate") {
            lexical_deallocate(&piece.head)
        } else {
            None
        },
        ..Part::default()
    }
}

/// A cursor over tokens for the exact transaction-control grammar.
struct Cursor<'t, 'a> {
    toks: &'t [Token<'a>],
    i: usize,
}

impl Cursor<'_, '_> {
    fn eat(&mut self, word: &str) -> bool {
        let hit = self.toks.get(self.i).is_some_and(|t| t.is_word(word));
        self.i += usize::from(hit);
        hit
    }

    fn eat_kind(&mut self, kinds: &[Kind]) -> bool {
        let hit = self
            .toks
            .get(self.i)
            .is_some_and(|t| kinds.contains(&t.kind));
        self.i += usize::from(hit);
        hit
    }

    fn done(&self) -> bool {
        self.i >= self.toks.len()
    }

    /// `[AND [NO] CHAIN]`
    fn chain(&mut self) -> Option<()> {
        if self.eat("and") {
            self.eat("no");
            self.eat("chain").then_some(())?;
        }
        Some(())
    }

    /// Transaction modes: (READ ONLY and not READ WRITE, needs the primary:
    /// READ WRITE or SERIALIZABLE, which a hot standby cannot start).
    fn modes(&mut self) -> Option<(bool, bool)> {
        let (mut ro, mut rw, mut serializable) = (false, false, false);
        while !self.done() {
            if self.eat("isolation") {
                self.eat("level").then_some(())?;
                serializable |= self.eat("serializable");
                let ok = serializable
                    || (self.eat("repeatable") && self.eat("read"))
                    || (self.eat("read") && (self.eat("committed") || self.eat("uncommitted")));
                ok.then_some(())?;
            } else if self.eat("read") {
                if self.eat("only") {
                    ro = true;
                } else {
                    self.eat("write").then_some(())?;
                    rw = true;
                }
            } else if !(self.eat("deferrable") || (self.eat("not") && self.eat("deferrable"))) {
                return None;
            }
            if self.toks.get(self.i).is_some_and(|t| t.is_punct(",")) {
                self.i += 1;
            }
        }
        Some((ro && !rw, rw || serializable))
    }
}

/// Transaction-control statements by an exact grammar (sqlparser lacks some of
/// them: `BEGIN ... DEFERRABLE`, `PREPARE TRANSACTION`, `COMMIT/ROLLBACK PREPARED`).
fn exact_tx(text: &str) -> Option<Part> {
    const MAX: usize = 24;
    let toks: Vec<Token<'_>> = Lexer::new(text).take(MAX + 1).collect();
    if toks.len() > MAX {
        return None;
    }
    let c = &mut Cursor { toks: &toks, i: 0 };
    let name = [Kind::Word, Kind::QuotedIdent];
    let mut needs_primary = false;
    let tx = if c.eat("begin") {
        let _ = c.eat("work") || c.eat("transaction");
        let (read_only, primary) = c.modes()?;
        needs_primary = primary;
        TxControl::Begin { read_only }
    } else if c.eat("start") {
        c.eat("transaction").then_some(())?;
        let (read_only, primary) = c.modes()?;
        needs_primary = primary;
        TxControl::Begin { read_only }
    } else if c.eat("commit") || c.eat("end") || c.eat("abort") || c.eat("rollback") {
        let commit = c.toks[0].is_word("commit") || c.toks[0].is_word("end");
        let rollback = c.toks[0].is_word("rollback");
        if (commit || rollback) && c.eat("prepared") {
            c.eat_kind(&[Kind::Str]).then_some(())?;
            TxControl::CommitPrepared
        } else {
            let _ = c.eat("work") || c.eat("transaction");
            if rollback && c.eat("to") {
                c.eat("savepoint");
                c.eat_kind(&name).then_some(())?;
                TxControl::Savepoint
            } else {
                c.chain()?;
                if commit {
                    TxControl::Commit
                } else {
                    TxControl::Rollback
                }
            }
        }
    } else if c.eat("savepoint") {
        c.eat_kind(&name).then_some(())?;
        TxControl::Savepoint
    } else if c.eat("release") {
        c.eat("savepoint");
        c.eat_kind(&name).then_some(())?;
        TxControl::Savepoint
    } else if c.eat("prepare") && c.eat("transaction") {
        c.eat_kind(&[Kind::Str]).then_some(())?;
        TxControl::PrepareTransaction
    } else {
        return None;
    };
    c.done().then(|| {
        let mut part = Part::tx(tx);
        part.write |= needs_primary;
        part
    })
}

/// Transaction control guessed from the first words of a statement that did not
/// parse: claiming a transaction that PostgreSQL then rejects only keeps the
/// session on one node a little longer, missing one would not.
fn loose_tx(head: &[Token<'_>]) -> Option<TxControl> {
    let at = |i: usize, w: &str| head.get(i).is_some_and(|t| t.is_word(w));
    let read_only = head
        .windows(2)
        .any(|p| p[0].is_word("read") && p[1].is_word("only"))
        && !head
            .windows(2)
            .any(|p| p[0].is_word("read") && p[1].is_word("write"));
    Some(
        if at(0, "begin") || (at(0, "start") && at(1, "transaction")) {
            TxControl::Begin { read_only }
        } else if (at(0, "commit") || at(0, "rollback")) && at(1, "prepared") {
            TxControl::CommitPrepared
        } else if at(0, "commit") || at(0, "end") {
            TxControl::Commit
        } else if at(0, "rollback") && head.iter().any(|t| t.is_word("to")) {
            TxControl::Savepoint
        } else if at(0, "rollback") || at(0, "abort") {
            TxControl::Rollback
        } else if at(0, "savepoint") || at(0, "release") {
            TxControl::Savepoint
        } else if at(0, "prepare") && at(1, "transaction") {
            TxControl::PrepareTransaction
        } else {
            return None;
        },
    )
}

/// `DEALLOCATE [PREPARE] name|ALL` from its words.
fn lexical_deallocate(head: &[Token<'_>]) -> Option<Option<String>> {
    let i = if head.get(1).is_some_and(|t| t.is_word("prepare")) {
        2
    } else {
        1
    };
    let t = head.get(i)?;
    match t.kind {
        Kind::Word if t.is_word("all") => Some(None),
        Kind::Word => Some(Some(t.text.to_ascii_lowercase())),
        Kind::QuotedIdent if t.text.starts_with('"') => Some(Some(
            t.text
                .trim_start_matches('"')
                .trim_end_matches('"')
                .replace("\"\"", "\""),
        )),
        _ => None,
    }
}

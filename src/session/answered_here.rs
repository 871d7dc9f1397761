//! Requests pgpilot answers itself instead of a node: admin commands
//! (`SHOW POOL_NODES` and friends, see [`crate::admin`]) and the session's
//! `pgpilot.*` commands (`SHOW pgpilot.last_commit_lsn`, `SET pgpilot.min_lsn`),
//! through the simple protocol and through the extended protocol (Parse / Bind
//! / Describe / Execute / Close / Sync, as drivers send them). These are
//! pgpilot's *own* commands ([`OwnCommand`]).
//!
//! Pgpilot's own answer is written straight to the client, so it is only given when no
//! request is in flight on any node (the router waits otherwise): answers stay
//! in request order.

use std::collections::HashMap;

use bytes::BytesMut;

use super::route::Step;
use super::{Session, SessionError};
use crate::admin::{self, AdminCaller, AdminCommand, ResultSet};
use crate::error::sqlstate::{
    FEATURE_NOT_SUPPORTED, IN_FAILED_SQL_TRANSACTION, INVALID_TEXT_REPRESENTATION,
};
use crate::protocol::frame::cstr;
use crate::protocol::lsn::format_lsn;
use crate::protocol::messages::{self, PgError};
use crate::protocol::{TxStatus, tag};
use crate::router::classify::TxControl;
use crate::router::session_cmd::{self, PgpilotCommand};

/// A statement pgpilot answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OwnCommand {
    /// `SHOW POOL_NODES` and the other admin commands.
    Admin(AdminCommand),
    /// `SHOW pgpilot.last_commit_lsn`, `SET pgpilot.min_lsn` …
    Session(PgpilotCommand),
}

/// What an own command produced.
enum Outcome {
    /// A result set.
    Rows(ResultSet),
    /// A command without rows, with its CommandComplete tag.
    Done(&'static str),
}

/// Recognise an own command in statement text (raw bytes, no NUL).
pub(crate) fn parse_own_command(sql: &[u8]) -> Option<OwnCommand> {
    // Every query passes here: first a cheap look at the first word, which
    // is all most statements need (admin commands start with one of
    // `admin::FIRST_WORDS`; pgpilot's own settings with SET, SHOW or RESET).
    let word = first_word(sql)?;
    if matches!(word, SHOW | PGPOOL | ATTACH | DETACH | PROMOTE | REJOIN)
        && let Some(cmd) = admin::parse_bytes(sql)
    {
        return Some(OwnCommand::Admin(cmd));
    }
    if !matches!(word, SET | SHOW | RESET) {
        return None;
    }
    let text = std::str::from_utf8(sql).ok()?;
    session_cmd::pgpilot_command(text).map(OwnCommand::Session)
}

/// A word of up to 8 ASCII letters, lowercased, packed into an integer (so
/// the hot path compares words as integers).
const fn pack(word: &[u8]) -> u64 {
    let mut code = 0u64;
    let mut i = 0;
    while i < word.len() {
        code = (code << 8) | word[i].to_ascii_lowercase() as u64;
        i += 1;
    }
    code
}

const SHOW: u64 = pack(b"show");
const SET: u64 = pack(b"set");
const RESET: u64 = pack(b"reset");
const PGPOOL: u64 = pack(b"pgpool");
const ATTACH: u64 = pack(b"attach");
const DETACH: u64 = pack(b"detach");
const PROMOTE: u64 = pack(b"promote");
const REJOIN: u64 = pack(b"rejoin");
/// The first three letters of each of those words, derived from them.
const PREFIXES: [u64; 8] = [
    first3(SHOW),
    first3(SET),
    first3(RESET),
    first3(PGPOOL),
    first3(ATTACH),
    first3(DETACH),
    first3(PROMOTE),
    first3(REJOIN),
];

/// The first three letters of a [`pack`]ed word (its letters are non-zero
/// bytes, the first the most significant).
const fn first3(mut code: u64) -> u64 {
    while code >= 1 << 24 {
        code >>= 8;
    }
    code
}

/// The statement's first word ([`pack`]ed) if it may start an own command:
/// the run of ASCII letters after leading whitespace. `None` when there is
/// none, it is longer than 8, or its first three letters start no own
/// command (so `SELECT`, `INSERT`, `BEGIN` … are turned away early).
fn first_word(sql: &[u8]) -> Option<u64> {
    let start = sql.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = &sql[start..];
    if !PREFIXES.contains(&pack(rest.get(..3).unwrap_or(rest))) {
        return None;
    }
    // Nine letters (or more) make no own command.
    let len = rest
        .iter()
        .take(9)
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(rest.len().min(9));
    (len <= 8).then(|| pack(&rest[..len]))
}

/// Admin statements and portals a client prepared through the extended protocol.
#[derive(Debug, Default)]
pub(crate) struct OwnStatements {
    /// Prepared statement name → command.
    pub(crate) stmts: HashMap<Vec<u8>, OwnCommand>,
    /// Portal name → command (until the batch's Sync).
    portals: HashMap<Vec<u8>, OwnCommand>,
    /// An error occurred in the current own batch: skip to Sync.
    pub(crate) failed: bool,
    /// A command another party ran for this session (the leading pgpilot,
    /// or Patroni: [`Step::AdminElsewhere`]), and its answer, until it is
    /// sent.
    pub(crate) awaited: Option<(AdminCommand, Result<ResultSet, PgError>)>,
}

impl OwnStatements {
    /// Nothing prepared, no portal, no batch state, no answer awaited.
    pub(crate) fn is_empty(&self) -> bool {
        self.stmts.is_empty() && self.portals.is_empty() && !self.failed && self.awaited.is_none()
    }
}

impl Session {
    /// The step an own command needs before it is answered: one run
    /// elsewhere ([`admin::waits_elsewhere`]) is answered with its outcome
    /// once that has come.
    pub(super) fn own_command_step(&self, cmd: &OwnCommand) -> Option<Step> {
        let OwnCommand::Admin(a) = cmd else {
            return None;
        };
        let answered = matches!(&self.answered_here.awaited, Some((c, _)) if c == a);
        (!answered && admin::waits_elsewhere(&self.ctx, a)).then(|| Step::AdminElsewhere(a.clone()))
    }

    /// [`Session::own_command_step`] for an Execute in an own batch.
    pub(super) fn own_execute_step(&self, t: u8, frame: &[u8]) -> Option<Step> {
        if t != tag::EXECUTE || self.answered_here.failed {
            return None;
        }
        let name = cstr(&frame[5..]).map(|(n, _)| n).unwrap_or_default();
        self.own_command_step(self.answered_here.portals.get(name)?)
    }

    /// Run `cmd` for this session (or say what error to send).
    fn run_own_command(&mut self, cmd: &OwnCommand) -> Result<Outcome, PgError> {
        let one =
            |name: &str, value: String| Outcome::Rows(ResultSet::new(&[name], vec![vec![value]]));
        match cmd {
            OwnCommand::Admin(cmd) => {
                let who = AdminCaller {
                    user: self.user.clone(),
                    load_balance_node: self.route.standby,
                };
                self.ctx.metrics.statement_routed(self.active, "admin");
                if let Some((_, r)) = self.answered_here.awaited.take_if(|(c, _)| c == cmd) {
                    return r.map(Outcome::Rows);
                }
                admin::execute(&self.ctx, cmd, &who).map(Outcome::Rows)
            }
            OwnCommand::Session(PgpilotCommand::ShowLastCommitLsn) => Ok(one(
                "last_commit_lsn",
                format_lsn(self.read_your_writes.last_commit_lsn),
            )),
            OwnCommand::Session(PgpilotCommand::ShowMinLsn) => {
                Ok(one("min_lsn", format_lsn(self.read_your_writes.min_lsn)))
            }
            OwnCommand::Session(PgpilotCommand::SetMinLsn(Ok(lsn))) => {
                self.read_your_writes.min_lsn = *lsn;
                Ok(Outcome::Done("SET"))
            }
            OwnCommand::Session(PgpilotCommand::SetMinLsn(Err(e))) => Err(PgError::error(
                INVALID_TEXT_REPRESENTATION,
                e.to_string(),
            )
            .with_hint("write a WAL position as returned by SHOW pgpilot.last_commit_lsn, e.g. '0/16B3748'")),
            OwnCommand::Session(PgpilotCommand::ResetMinLsn) => {
                self.read_your_writes.min_lsn = 0;
                Ok(Outcome::Done("RESET"))
            }
        }
    }

    /// What `cmd` returns, for Describe: no side effects (ATTACH/DETACH/PROMOTE
    /// run at Execute only).
    fn describe_admin(&self, cmd: &AdminCommand) -> Result<ResultSet, PgError> {
        let who = AdminCaller {
            user: self.user.clone(),
            load_balance_node: self.route.standby,
        };
        admin::describe(&self.ctx, cmd, &who)
    }

    fn client_status(&self) -> TxStatus {
        if self.tx.client_aborted() {
            return TxStatus::Failed;
        }
        match self.links[self.active.index()].as_ref() {
            Some(l) if self.tx.in_block() => l.conn.status,
            _ => TxStatus::Idle,
        }
    }

    /// A simple Query while the client's transaction is aborted (see
    /// `Session::tx_aborted`): `None` to route it (ROLLBACK), or what to do.
    pub(super) fn aborted_tx_query(&self, sql: &[u8]) -> Option<AbortedTx> {
        let text = std::str::from_utf8(sql).unwrap_or("");
        let (class, _) = self.classify_unremembered(sql);
        match class.tx {
            Some(TxControl::Rollback) if class.statements == 1 => None,
            Some(TxControl::Savepoint)
                if matches!(
                    session_cmd::savepoint_op(text),
                    Some(session_cmd::SavepointOp::RollbackTo(_))
                ) =>
            {
                None
            }
            Some(TxControl::Commit) if class.statements == 1 => Some(AbortedTx::RollBack),
            _ => Some(AbortedTx::Refuse),
        }
    }

    /// Whether `sql` ends an aborted transaction (ROLLBACK / ROLLBACK TO).
    pub(super) fn aborted_tx_query_is_rollback(&self, sql: &[u8]) -> bool {
        self.aborted_tx_query(sql).is_none()
    }

    /// Refuse a request in an aborted transaction: 25P02, and (simple protocol)
    /// ReadyForQuery `E`.
    pub(super) fn refuse_in_aborted_tx(&mut self, ready: bool) -> Result<(), SessionError> {
        let mut out = BytesMut::new();
        PgError::error(
            IN_FAILED_SQL_TRANSACTION,
            "current transaction is aborted, commands ignored until end of transaction block",
        )
        .encode(&mut out);
        if ready {
            messages::ready_for_query(&mut out, TxStatus::Failed);
        }
        self.send_own_answer(&out)
    }

    /// Answer the request at the front of the client's buffer with `err`
    /// instead of running it: a Query or FunctionCall is consumed and answered
    /// with the error and ReadyForQuery; an extended batch gets the error and
    /// is skipped up to its Sync, which gets ReadyForQuery.
    pub(super) fn refuse_request(&mut self, err: PgError) -> Result<(), SessionError> {
        let Some(f) = crate::protocol::frame::peek_frame(&self.cbuf, self.cfg.max_message_size)?
        else {
            return Ok(());
        };
        let mut out = BytesMut::new();
        err.encode(&mut out);
        if f.tag == tag::QUERY || f.tag == tag::FUNCTION_CALL {
            bytes::Buf::advance(&mut self.cbuf, f.wire_len);
            messages::ready_for_query(&mut out, self.client_status());
        } else {
            self.batch = Some(super::route::Target::Local);
            self.answered_here.failed = true;
        }
        self.send_own_answer(&out)
    }

    /// Start an own batch that only reports the aborted transaction.
    #[cold]
    #[inline(never)]
    pub(super) fn start_refused_batch(&mut self) -> Result<(), SessionError> {
        self.answered_here.failed = true;
        self.refuse_in_aborted_tx(false)
    }

    fn send_own_answer(&mut self, out: &[u8]) -> Result<(), SessionError> {
        // The request is answered here, not sent: its one-shot routing state
        // (a primary position fetched for it, above all) must not serve the
        // next request, which may arrive after other sessions' commits.
        self.read_your_writes_request_sent();
        self.to_client
            .send(&mut self.client, out)
            .map_err(SessionError::ClientIo)
    }

    /// Answer a simple Query carrying `cmd`: result (or error), ReadyForQuery.
    #[cold]
    #[inline(never)]
    pub(super) fn answer_own_query(&mut self, cmd: &OwnCommand) -> Result<(), SessionError> {
        let mut out = BytesMut::new();
        match self.run_own_command(cmd) {
            Ok(Outcome::Rows(rs)) => {
                rs.encode_row_description(&mut out);
                rs.encode_rows_and_complete(&mut out);
            }
            Ok(Outcome::Done(tag)) => messages::command_complete(&mut out, tag),
            Err(e) => e.encode(&mut out),
        }
        messages::ready_for_query(&mut out, self.client_status());
        self.send_own_answer(&out)
    }

    /// Whether an extended batch starting with this message is for pgpilot itself.
    #[inline(never)]
    pub(super) fn starts_own_batch(&self, t: u8, body: &[u8]) -> bool {
        match t {
            tag::PARSE => {
                let (_, rest) = cstr(body).unwrap_or_default();
                let query = cstr(rest).map(|(q, _)| q).unwrap_or_default();
                parse_own_command(query).is_some()
            }
            tag::BIND => {
                let rest = cstr(body).map(|(_, r)| r).unwrap_or_default();
                let stmt = cstr(rest).map(|(s, _)| s).unwrap_or_default();
                self.answered_here.stmts.contains_key(stmt)
            }
            tag::DESCRIBE => match body.split_first() {
                Some((b'S', rest)) => {
                    let name = cstr(rest).map(|(n, _)| n).unwrap_or_default();
                    self.answered_here.stmts.contains_key(name)
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// Answer one message of an own extended batch.
    #[cold]
    #[inline(never)]
    pub(super) fn own_extended(&mut self, t: u8, frame: &[u8]) -> Result<(), SessionError> {
        let body = &frame[5..];
        let mut out = BytesMut::new();
        if t == tag::SYNC {
            self.answered_here.portals.clear();
            self.answered_here.failed = false;
            self.answered_here.awaited = None;
            self.batch = None;
            messages::ready_for_query(&mut out, self.client_status());
            return self.send_own_answer(&out);
        }
        if self.answered_here.failed {
            return Ok(());
        }
        let result = match t {
            tag::PARSE => {
                let (name, rest) = cstr(body).unwrap_or_default();
                let query = cstr(rest).map(|(q, _)| q).unwrap_or_default();
                match parse_own_command(query) {
                    Some(cmd) => {
                        self.answered_here.stmts.insert(name.to_vec(), cmd);
                        messages::empty_message(&mut out, b'1');
                        Ok(())
                    }
                    None => Err(mixed()),
                }
            }
            tag::BIND => {
                let (portal, rest) = cstr(body).unwrap_or_default();
                let stmt = cstr(rest).map(|(s, _)| s).unwrap_or_default();
                match self.answered_here.stmts.get(stmt).cloned() {
                    Some(cmd) => {
                        self.answered_here.portals.insert(portal.to_vec(), cmd);
                        messages::empty_message(&mut out, b'2');
                        Ok(())
                    }
                    None => Err(mixed()),
                }
            }
            tag::DESCRIBE => {
                let (kind, rest) = body.split_first().unwrap_or((&0, &[]));
                let name = cstr(rest).map(|(n, _)| n).unwrap_or_default();
                let cmd = match kind {
                    b'S' => self.answered_here.stmts.get(name).cloned(),
                    _ => self.answered_here.portals.get(name).cloned(),
                };
                let described = match &cmd {
                    // Describing a SET must not run it.
                    Some(OwnCommand::Session(
                        PgpilotCommand::SetMinLsn(_) | PgpilotCommand::ResetMinLsn,
                    )) => Some(Ok(Outcome::Done("SET"))),
                    // ATTACH / DETACH / PROMOTE NODE run only at Execute.
                    Some(OwnCommand::Admin(a)) => Some(self.describe_admin(a).map(Outcome::Rows)),
                    Some(c) => Some(self.run_own_command(c)),
                    None => None,
                };
                match described {
                    Some(Ok(result)) => {
                        if *kind == b'S' {
                            messages::no_parameters(&mut out);
                        }
                        match result {
                            Outcome::Rows(rs) => rs.encode_row_description(&mut out),
                            Outcome::Done(_) => messages::empty_message(&mut out, b'n'),
                        }
                        Ok(())
                    }
                    Some(Err(e)) => Err(e),
                    None => Err(mixed()),
                }
            }
            tag::EXECUTE => {
                let name = cstr(body).map(|(n, _)| n).unwrap_or_default();
                let cmd = self.answered_here.portals.get(name).cloned();
                match cmd.map(|c| self.run_own_command(&c)) {
                    Some(Ok(Outcome::Rows(rs))) => {
                        rs.encode_rows_and_complete(&mut out);
                        Ok(())
                    }
                    Some(Ok(Outcome::Done(tag))) => {
                        messages::command_complete(&mut out, tag);
                        Ok(())
                    }
                    Some(Err(e)) => Err(e),
                    None => Err(mixed()),
                }
            }
            tag::CLOSE => {
                let (kind, rest) = body.split_first().unwrap_or((&0, &[]));
                let name = cstr(rest).map(|(n, _)| n).unwrap_or_default();
                if *kind == b'S' {
                    self.answered_here.stmts.remove(name);
                } else {
                    self.answered_here.portals.remove(name);
                }
                messages::empty_message(&mut out, b'3');
                Ok(())
            }
            // Flush: everything is already written.
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.answered_here.failed = true;
            e.encode(&mut out);
        }
        self.send_own_answer(&out)
    }
}

/// What to do with a request while the client's transaction is aborted.
pub(crate) enum AbortedTx {
    /// COMMIT: roll the transaction back instead, as PostgreSQL does.
    RollBack,
    /// Anything but ROLLBACK: 25P02.
    Refuse,
}

/// The error for a batch mixing pgpilot's commands with SQL for the nodes.
fn mixed() -> PgError {
    PgError::error(
        FEATURE_NOT_SUPPORTED,
        "pgpilot admin commands cannot be combined with other statements in one batch",
    )
    .with_hint("send the admin command in its own Sync-terminated batch")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_word_is_the_leading_run_of_letters_lowercased() {
        // Words that start no own command are turned away.
        assert_eq!(first_word(b"  SELECT 1"), None);
        assert_eq!(first_word(b"select"), None);
        assert_eq!(first_word(b"se"), None);
        assert_eq!(first_word(b"setting"), Some(pack(b"setting")));
        assert_eq!(first_word(b"Set search_path"), Some(pack(b"set")));
        assert_eq!(first_word(b"\n\tShow pool_nodes"), Some(pack(b"show")));
        assert_eq!(first_word(b"set"), Some(pack(b"set")));
        assert_eq!(first_word(b"reset;"), Some(pack(b"reset")));
        assert_eq!(first_word(b"PROMOTE"), Some(pack(b"promote")));
        assert_eq!(first_word(b"   "), None);
        assert_eq!(first_word(b""), None);
        assert_eq!(first_word(b"(select 1)"), None);
        // Longer than 8 letters: no own command starts so.
        assert_eq!(first_word(b"checkpoint"), None);
        assert_eq!(first_word(b"showxxxx y"), Some(pack(b"showxxxx")));
    }

    #[test]
    fn every_admin_first_word_is_recognised() {
        for w in admin::FIRST_WORDS {
            assert!(
                matches!(
                    first_word(w),
                    Some(SHOW | PGPOOL | ATTACH | DETACH | PROMOTE | REJOIN)
                ),
                "{}",
                String::from_utf8_lossy(w)
            );
        }
    }

    #[test]
    fn ordinary_sql_is_not_local() {
        for q in [
            &b"SELECT abalance FROM pgbench_accounts WHERE aid = 1"[..],
            b"SET search_path = public",
            b"SHOW search_path",
            b"RESET ALL",
            b"showx",
            b"",
        ] {
            assert_eq!(parse_own_command(q), None, "{}", String::from_utf8_lossy(q));
        }
        assert!(matches!(
            parse_own_command(b"show pool_nodes"),
            Some(OwnCommand::Admin(_))
        ));
        assert!(matches!(
            parse_own_command(b"  SHOW pgpilot.last_commit_lsn"),
            Some(OwnCommand::Session(_))
        ));
    }
}

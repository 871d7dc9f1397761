//! Requests pgpilot answers itself instead of a node: admin commands
//! (`SHOW POOL_NODES` and friends, see [`crate::admin`]), through the simple
//! protocol and through the extended protocol (Parse / Bind / Describe /
//! Execute / Close / Sync, as drivers send them).
//!
//! A local answer is written straight to the client, so it is only given when no
//! request is in flight on any node (the router waits otherwise): answers stay
//! in request order.

use std::collections::HashMap;

use bytes::BytesMut;

use super::{Session, SessionError};
use crate::admin::{self, AdminCaller, AdminCommand, ResultSet};
use crate::error::sqlstate::FEATURE_NOT_SUPPORTED;
use crate::protocol::frame::cstr;
use crate::protocol::messages::{self, PgError};
use crate::protocol::{TxStatus, tag};

/// Admin statements and portals a client prepared through the extended protocol.
#[derive(Debug, Default)]
pub struct LocalStatements {
    /// Prepared statement name → command.
    pub stmts: HashMap<Vec<u8>, AdminCommand>,
    /// Portal name → command (until the batch's Sync).
    portals: HashMap<Vec<u8>, AdminCommand>,
    /// An error occurred in the current local batch: skip to Sync.
    failed: bool,
}

impl Session {
    /// The result of `cmd` for this session's user (or the error to send).
    fn run_admin(&self, cmd: &AdminCommand) -> Result<ResultSet, PgError> {
        let who = AdminCaller {
            user: self.user.clone(),
            load_balance_node: self.route.standby,
        };
        self.ctx.metrics.statement_routed(self.active, "admin");
        admin::execute(&self.ctx, cmd, &who)
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
        match self.links[self.active].as_ref() {
            Some(l) if self.in_tx => l.conn.status,
            _ => TxStatus::Idle,
        }
    }

    fn send_local(&mut self, out: &[u8]) -> Result<(), SessionError> {
        self.to_client
            .send(&self.client, out)
            .map_err(SessionError::ClientIo)
    }

    /// Answer a simple Query carrying `cmd`: result set (or error), ReadyForQuery.
    pub(super) fn answer_admin_query(&mut self, cmd: &AdminCommand) -> Result<(), SessionError> {
        let mut out = BytesMut::new();
        match self.run_admin(cmd) {
            Ok(rs) => {
                rs.encode_row_description(&mut out);
                rs.encode_rows_and_complete(&mut out);
            }
            Err(e) => e.encode(&mut out),
        }
        messages::ready_for_query(&mut out, self.client_status());
        self.send_local(&out)
    }

    /// Whether an extended batch starting with this message is for pgpilot itself.
    pub(super) fn starts_local_batch(&self, t: u8, body: &[u8]) -> bool {
        match t {
            tag::PARSE => {
                let (_, rest) = cstr(body).unwrap_or_default();
                let query = cstr(rest).map(|(q, _)| q).unwrap_or_default();
                admin::parse_bytes(query).is_some()
            }
            tag::BIND => {
                let rest = cstr(body).map(|(_, r)| r).unwrap_or_default();
                let stmt = cstr(rest).map(|(s, _)| s).unwrap_or_default();
                self.local.stmts.contains_key(stmt)
            }
            tag::DESCRIBE => match body.split_first() {
                Some((b'S', rest)) => {
                    let name = cstr(rest).map(|(n, _)| n).unwrap_or_default();
                    self.local.stmts.contains_key(name)
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// Answer one message of a local extended batch.
    pub(super) fn local_extended(&mut self, t: u8, frame: &[u8]) -> Result<(), SessionError> {
        let body = &frame[5..];
        let mut out = BytesMut::new();
        if t == tag::SYNC {
            self.local.portals.clear();
            self.local.failed = false;
            self.batch = None;
            messages::ready_for_query(&mut out, self.client_status());
            return self.send_local(&out);
        }
        if self.local.failed {
            return Ok(());
        }
        let result = match t {
            tag::PARSE => {
                let (name, rest) = cstr(body).unwrap_or_default();
                let query = cstr(rest).map(|(q, _)| q).unwrap_or_default();
                match admin::parse_bytes(query) {
                    Some(cmd) => {
                        self.local.stmts.insert(name.to_vec(), cmd);
                        messages::empty_message(&mut out, b'1');
                        Ok(())
                    }
                    None => Err(mixed()),
                }
            }
            tag::BIND => {
                let (portal, rest) = cstr(body).unwrap_or_default();
                let stmt = cstr(rest).map(|(s, _)| s).unwrap_or_default();
                match self.local.stmts.get(stmt).cloned() {
                    Some(cmd) => {
                        self.local.portals.insert(portal.to_vec(), cmd);
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
                    b'S' => self.local.stmts.get(name).cloned(),
                    _ => self.local.portals.get(name).cloned(),
                };
                match cmd.map(|c| self.describe_admin(&c)) {
                    Some(Ok(rs)) => {
                        if *kind == b'S' {
                            messages::no_parameters(&mut out);
                        }
                        rs.encode_row_description(&mut out);
                        Ok(())
                    }
                    Some(Err(e)) => Err(e),
                    None => Err(mixed()),
                }
            }
            tag::EXECUTE => {
                let name = cstr(body).map(|(n, _)| n).unwrap_or_default();
                match self
                    .local
                    .portals
                    .get(name)
                    .cloned()
                    .map(|c| self.run_admin(&c))
                {
                    Some(Ok(rs)) => {
                        rs.encode_rows_and_complete(&mut out);
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
                    self.local.stmts.remove(name);
                } else {
                    self.local.portals.remove(name);
                }
                messages::empty_message(&mut out, b'3');
                Ok(())
            }
            // Flush: everything is already written.
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.local.failed = true;
            e.encode(&mut out);
        }
        self.send_local(&out)
    }
}

/// The error for a batch mixing pgpilot's commands with SQL for the nodes.
fn mixed() -> PgError {
    PgError::error(
        FEATURE_NOT_SUPPORTED,
        "pgpilot admin commands cannot be combined with other statements in one batch",
    )
    .with_hint("send the admin command in its own Sync-terminated batch")
}

//! The relay loop of a logged-in session: one `select!` over the client socket,
//! the server socket, pending writes, timeouts and shutdown.
//!
//! Writes never block the loop: what a socket will not take now waits in an
//! [`Outbox`](crate::net::Outbox) and is flushed when the socket is writable,
//! while the other direction keeps flowing. Reading from a side pauses only
//! while the queue towards the other side is above a high-water mark, so memory
//! stays bounded and neither peer can deadlock the other.

use std::time::Duration;

use tokio::io::AsyncReadExt;

use bytes::BytesMut;

use super::{End, Session, SessionError};
use crate::admin::{self, AdminCaller, AdminCommand};
use crate::protocol::frame::{BackendEvent, cstr, missing_bytes, peek_frame};
use crate::protocol::messages;
use crate::protocol::{TxStatus, tag};
use crate::router::lexer;

/// Stop reading a side while this many bytes wait to be written to the other.
const HIGH_WATER: usize = 1 << 20;

impl Session {
    /// Relay until the client leaves, an error occurs, or pgpilot stops.
    pub(super) async fn relay(&mut self) -> End {
        let mut shutdown = self.ctx.shutdown.clone();
        // One long-lived future: re-registering a watcher on every turn costs a lock.
        let stopping = shutdown.changed();
        tokio::pin!(stopping);
        loop {
            let idle_limit = if self.outstanding > 0 || self.in_batch {
                Duration::ZERO
            } else if self.status == TxStatus::Idle {
                self.cfg.timeouts.client_idle
            } else {
                self.cfg.timeouts.idle_in_transaction
            };
            let write_limit = self.cfg.timeouts.write;
            let stalled = match (
                self.to_client.stalled_since(),
                self.to_backend.stalled_since(),
            ) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let Some(backend) = self.backend.as_mut() else {
                return End::Error(SessionError::BackendLost { node: 0 });
            };
            let node = backend.node;
            let conn = &mut backend.conn;
            let (mut server_rd, server_wr) = conn.stream.split();
            let (mut client_rd, client_wr) = self.client.split();
            let read_client = self.to_backend.len() < HIGH_WATER;
            let read_server = self.to_client.len() < HIGH_WATER;
            tokio::select! {
                biased;
                _ = &mut stopping => return End::Error(SessionError::Shutdown),
                r = client_wr.as_ref().writable(), if !self.to_client.is_empty() => {
                    if let Err(e) = r.and_then(|()| self.to_client.flush(&self.client)) {
                        return End::Error(SessionError::ClientIo(e));
                    }
                }
                r = server_wr.as_ref().writable(), if !self.to_backend.is_empty() => {
                    let flushed = r.and_then(|()| {
                        let b = self.backend.as_ref().map(|b| &b.conn.stream);
                        b.map_or(Ok(()), |s| self.to_backend.flush(s))
                    });
                    if flushed.is_err() {
                        return End::Error(SessionError::BackendLost { node });
                    }
                }
                r = server_rd.read_buf(&mut conn.buf), if read_server => match r {
                    Ok(0) | Err(_) => {
                        tracing::info!(node, user = %self.user, "server closed the session's connection");
                        return End::Error(SessionError::BackendLost { node });
                    }
                    Ok(_) => {
                        if let Err(e) = self.on_backend_data() {
                            return End::Error(e);
                        }
                    }
                },
                r = client_rd.read_buf(&mut self.cbuf), if read_client => match r {
                    Ok(0) => return End::ClientGone,
                    Ok(_) => match self.on_client_data() {
                        Ok(true) => {}
                        Ok(false) => return End::ClientGone,
                        Err(e) => return End::Error(e),
                    },
                    Err(e) => return End::Error(SessionError::ClientIo(e)),
                },
                _ = sleep_until_stall_limit(stalled, write_limit) => {
                    return End::Error(SessionError::WriteTimeout);
                }
                _ = sleep_unless_zero(idle_limit) => {
                    return End::Error(if self.status == TxStatus::Idle {
                        SessionError::IdleTimeout
                    } else {
                        SessionError::IdleInTransactionTimeout
                    });
                }
            }
        }
    }

    /// Frame what the client sent, account for it, and pass the whole frames on in
    /// one write. Returns false when the client sent Terminate.
    fn on_client_data(&mut self) -> Result<bool, SessionError> {
        let max = self.cfg.max_message_size;
        let mut pos = 0;
        let mut keep_going = true;
        while let Some(f) = peek_frame(&self.cbuf[pos..], max)? {
            let body = &self.cbuf[pos + 5..pos + f.wire_len];
            match f.tag {
                // Admin hook (cluster-state branch; the session rewrite re-homes
                // it): `SHOW POOL_NODES` and friends are answered by pgpilot
                // itself when nothing is in flight and the Query is the first
                // frame of this read, so no forwarded bytes precede the answer.
                tag::QUERY if pos == 0 && self.outstanding == 0 && !self.in_batch => {
                    if let Some(cmd) = admin::parse_bytes(body) {
                        let len = f.wire_len;
                        self.answer_admin(&cmd)?;
                        bytes::Buf::advance(&mut self.cbuf, len);
                        continue;
                    }
                    self.outstanding += 1;
                    self.dirty = self.dirty || lexer::may_leave_session_state(body);
                }
                tag::QUERY => {
                    self.outstanding += 1;
                    self.dirty = self.dirty || lexer::may_leave_session_state(body);
                }
                tag::PARSE => {
                    self.in_batch = true;
                    let (name, rest) = cstr(body).unwrap_or_default();
                    let sql = cstr(rest).map(|(q, _)| q).unwrap_or_default();
                    self.dirty =
                        self.dirty || !name.is_empty() || lexer::may_leave_session_state(sql);
                }
                tag::BIND | tag::EXECUTE | tag::DESCRIBE | tag::CLOSE | tag::FLUSH => {
                    self.in_batch = true;
                }
                tag::SYNC => {
                    self.in_batch = false;
                    self.outstanding += 1;
                }
                tag::FUNCTION_CALL => {
                    self.outstanding += 1;
                    self.dirty = true;
                }
                tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {}
                tag::TERMINATE => {
                    keep_going = false;
                    break;
                }
                other => return Err(SessionError::UnexpectedMessage(other)),
            }
            pos += f.wire_len;
        }
        if pos > 0 {
            let Some(b) = self.backend.as_ref() else {
                return Err(SessionError::BackendLost { node: 0 });
            };
            let node = b.node;
            self.to_backend
                .send(&b.conn.stream, &self.cbuf[..pos])
                .map_err(|_| SessionError::BackendLost { node })?;
            bytes::Buf::advance(&mut self.cbuf, pos);
        }
        if keep_going {
            let need = missing_bytes(&self.cbuf);
            self.cbuf.reserve(need.max(4096));
        }
        Ok(keep_going)
    }

    /// Answer an admin command locally: result set (or 42501) + ReadyForQuery.
    fn answer_admin(&mut self, cmd: &AdminCommand) -> Result<(), SessionError> {
        let who = AdminCaller {
            user: self.user.clone(),
            load_balance_node: None,
        };
        let mut out = BytesMut::new();
        match admin::execute(&self.ctx, cmd, &who) {
            Ok(rs) => {
                rs.encode_row_description(&mut out);
                rs.encode_rows_and_complete(&mut out);
            }
            Err(e) => e.encode(&mut out),
        }
        messages::ready_for_query(&mut out, self.status);
        self.to_client
            .send(&self.client, &out)
            .map_err(SessionError::ClientIo)
    }

    /// Scan what the server sent, track its state, and pass it on in one write.
    fn on_backend_data(&mut self) -> Result<(), SessionError> {
        let Some(b) = self.backend.as_mut() else {
            return Ok(());
        };
        let node = b.node;
        let n = self.scanner.scan(&b.buf, &mut self.events).map_err(|e| {
            tracing::warn!(node, error = %e, "unframeable data from server");
            SessionError::BackendLost { node }
        })?;
        for ev in self.events.drain(..) {
            match ev {
                BackendEvent::ReadyForQuery(s) => {
                    self.outstanding = self.outstanding.saturating_sub(1);
                    self.status = TxStatus::from_byte(s);
                    b.status = self.status;
                }
                BackendEvent::Error { fatal, .. } => self.saw_fatal |= fatal,
                BackendEvent::ParameterStatus(k, v) => {
                    b.set_param(k, v);
                    self.dirty = true;
                }
                BackendEvent::CopyStarted(_) => {}
            }
        }
        if n > 0 {
            self.to_client
                .send(&self.client, &b.buf[..n])
                .map_err(SessionError::ClientIo)?;
            bytes::Buf::advance(&mut b.buf, n);
        }
        Ok(())
    }
}

async fn sleep_unless_zero(d: Duration) {
    if d.is_zero() {
        std::future::pending::<()>().await;
    } else {
        tokio::time::sleep(d).await;
    }
}

async fn sleep_until_stall_limit(stalled: Option<tokio::time::Instant>, limit: Duration) {
    match stalled {
        Some(since) => tokio::time::sleep_until(since + limit).await,
        None => std::future::pending::<()>().await,
    }
}

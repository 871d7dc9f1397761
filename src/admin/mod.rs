//! Admin commands answered by pgpilot itself on the client port, as ordinary
//! result sets (every column `text`, no NULLs, `SELECT n`), so psql and
//! drivers print them like any query:
//!
//! | command | what |
//! | --- | --- |
//! | `SHOW POOL_NODES` | pgpool 4.3+'s 14 columns, pgpool's order and formats |
//! | `SHOW POOL_VERSION` | `pool_version` |
//! | `SHOW POOL_HEALTH_CHECK_STATS` | pgpool's 20 columns |
//! | `SHOW POOL_BACKEND_STATS` | pgpool's 14 columns |
//! | `SHOW POOL_PROCESSES` | one row per client session (pgpilot's model) |
//! | `SHOW POOL_POOLS` | one row per server connection (pgpilot's model) |
//! | `SHOW PGPILOT_NODES` | what pgpool lacks: effective weight, lag in bytes and seconds, replay paused, timeline, LSNs, last error |
//! | `PGPOOL SHOW name` / `PGPOOL SHOW ALL` | pgpool-named settings and their values |
//! | `SHOW PGPILOT_FAILOVER` | the failover or switchover in progress, or the last one |
//! | `SHOW PGPILOT_PEERS` | the pgpilot instances coordinating through etcd: leader, heartbeat, applied epoch |
//! | `SHOW PGPILOT_SLOTS` | the primary's physical replication slots: standby using each, retained WAL, stale ones |
//! | `ATTACH NODE n` | lift node n's hold (detached, fenced old primary, cannot follow) |
//! | `DETACH NODE n` | no traffic to standby n until `ATTACH NODE n` |
//! | `PROMOTE NODE n` | switchover to standby n (or the candidate of a waiting failover) |
//! | `REJOIN NODE n` | rejoin fenced old primary (or diverged standby) n as a standby (`failover.rejoin`) |
//!
//! `ATTACH`/`DETACH`/`PROMOTE`/`REJOIN` answer one row (`node_id`, `result`); a
//! refusal is an error with SQLSTATE 55000 and the reason. `PROMOTE NODE`
//! returns once the switchover has started; `SHOW PGPILOT_FAILOVER` (or
//! `pgpilot promote`, which polls it) follows it to the end. `REJOIN NODE`
//! returns once the rejoin has started; the node's `held_out` in `SHOW
//! PGPILOT_NODES` (or `pgpilot rejoin`, which polls it) follows it. With
//! `failover.mode = "patroni"`, `PROMOTE NODE n` is a Patroni switchover
//! (`cluster::patroni`): it answers once Patroni has done it, with Patroni's
//! answer, or fails with Patroni's refusal; `REJOIN NODE` is refused.
//!
//! With coordination through etcd, `ATTACH`/`DETACH`/`PROMOTE` on an
//! instance that does not lead go to the leading pgpilot
//! ([`goes_to_leader`], [`execute_forwarded`]): the answer waits until the
//! leader has run the command and this instance has applied its effect, and
//! is the leader's (its result, or its refusal as 55000); a leader silent
//! for twice the lease TTL is an error saying so.
//!
//! Only users listed in `admin_users` may run them; others get SQLSTATE
//! 42501. The session decides *when* to answer (simple Query, or the extended
//! protocol's Parse/Describe/Execute); this module only parses and builds
//! result sets. Column meanings are in `views.rs` and docs/monitoring.md.

pub mod cli;
mod failover;
pub(crate) mod format;
mod peers;
mod views;

use bytes::BytesMut;

use crate::config::NodeId;
use crate::context::ProxyContext;
use crate::protocol::messages::{self, PgError};

/// SQLSTATE for a user not allowed to run admin commands.
pub(crate) const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// An admin command pgpilot answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AdminCommand {
    /// `SHOW POOL_NODES`.
    PoolNodes,
    /// `SHOW POOL_VERSION`.
    PoolVersion,
    /// `SHOW POOL_HEALTH_CHECK_STATS`.
    PoolHealthCheckStats,
    /// `SHOW POOL_BACKEND_STATS`.
    PoolBackendStats,
    /// `SHOW POOL_POOLS`.
    PoolPools,
    /// `SHOW POOL_PROCESSES`.
    PoolProcesses,
    /// `SHOW PGPILOT_NODES`.
    PgpilotNodes,
    /// `PGPOOL SHOW name` (lower-cased), or `None` for `PGPOOL SHOW ALL`.
    PgpoolShow(Option<String>),
    /// `SHOW PGPILOT_FAILOVER`.
    PgpilotFailover,
    /// `SHOW PGPILOT_SLOTS`.
    PgpilotSlots,
    /// `SHOW PGPILOT_PEERS`.
    PgpilotPeers,
    /// `ATTACH NODE n`.
    AttachNode(NodeId),
    /// `DETACH NODE n`.
    DetachNode(NodeId),
    /// `PROMOTE NODE n`.
    PromoteNode(NodeId),
    /// `REJOIN NODE n`.
    RejoinNode(NodeId),
}

impl AdminCommand {
    /// The command as a user would write it (for messages).
    pub(crate) fn name(&self) -> String {
        match self {
            AdminCommand::PoolNodes => "SHOW POOL_NODES".into(),
            AdminCommand::PoolVersion => "SHOW POOL_VERSION".into(),
            AdminCommand::PoolHealthCheckStats => "SHOW POOL_HEALTH_CHECK_STATS".into(),
            AdminCommand::PoolBackendStats => "SHOW POOL_BACKEND_STATS".into(),
            AdminCommand::PoolPools => "SHOW POOL_POOLS".into(),
            AdminCommand::PoolProcesses => "SHOW POOL_PROCESSES".into(),
            AdminCommand::PgpilotNodes => "SHOW PGPILOT_NODES".into(),
            AdminCommand::PgpoolShow(None) => "PGPOOL SHOW ALL".into(),
            AdminCommand::PgpoolShow(Some(n)) => format!("PGPOOL SHOW {n}"),
            AdminCommand::PgpilotFailover => "SHOW PGPILOT_FAILOVER".into(),
            AdminCommand::PgpilotSlots => "SHOW PGPILOT_SLOTS".into(),
            AdminCommand::PgpilotPeers => "SHOW PGPILOT_PEERS".into(),
            AdminCommand::AttachNode(n) => format!("ATTACH NODE {n}"),
            AdminCommand::DetachNode(n) => format!("DETACH NODE {n}"),
            AdminCommand::PromoteNode(n) => format!("PROMOTE NODE {n}"),
            AdminCommand::RejoinNode(n) => format!("REJOIN NODE {n}"),
        }
    }

    /// Whether running the command changes something (so describing it
    /// through the extended protocol must not run it).
    pub(crate) fn has_effects(&self) -> bool {
        matches!(
            self,
            AdminCommand::AttachNode(_)
                | AdminCommand::DetachNode(_)
                | AdminCommand::PromoteNode(_)
                | AdminCommand::RejoinNode(_)
        )
    }
}

/// Who asks: the session's user, and its load-balance node (for the
/// `load_balance_node` column of `SHOW POOL_NODES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdminCaller {
    /// The client's user name.
    pub(crate) user: String,
    /// The node the session balances reads to, if it has one.
    pub(crate) load_balance_node: Option<NodeId>,
}

/// A result set of text columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResultSet {
    /// Column names, in order.
    pub(crate) columns: Vec<String>,
    /// Rows; every row has one value per column (empty string for "none").
    pub(crate) rows: Vec<Vec<String>>,
    /// CommandComplete tag, e.g. `SELECT 3`.
    pub(crate) command_tag: String,
}

impl ResultSet {
    /// A result set with tag `SELECT <rows>`.
    pub(crate) fn new(columns: &[&str], rows: Vec<Vec<String>>) -> ResultSet {
        ResultSet {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            command_tag: format!("SELECT {}", rows.len()),
            rows,
        }
    }

    /// Append the RowDescription (every column `text`).
    pub(crate) fn encode_row_description(&self, buf: &mut BytesMut) {
        let cols: Vec<&str> = self.columns.iter().map(String::as_str).collect();
        messages::row_description_text(buf, &cols);
    }

    /// Append one DataRow per row, then CommandComplete.
    pub(crate) fn encode_rows_and_complete(&self, buf: &mut BytesMut) {
        for row in &self.rows {
            messages::data_row_text(buf, row);
        }
        messages::command_complete(buf, &self.command_tag);
    }
}

/// [`parse_bytes`] on a string (the unit tests' entry point).
#[cfg(test)]
pub(crate) fn parse(sql: &str) -> Option<AdminCommand> {
    parse_bytes(sql.as_bytes())
}

/// The words an admin command can start with (lower case).
pub(crate) const FIRST_WORDS: [&[u8]; 6] = [
    b"show", b"pgpool", b"attach", b"detach", b"promote", b"rejoin",
];

/// Recognise an admin command in raw query bytes (as in a Query message, with
/// or without the terminating NUL): case-insensitive, any whitespace between
/// words, optional trailing `;`. Anything else (including several statements)
/// is `None` and goes to PostgreSQL as usual. Rejects ordinary SQL after
/// looking at its first word, before any UTF-8 check, so it is cheap on the
/// hot path.
pub(crate) fn parse_bytes(sql: &[u8]) -> Option<AdminCommand> {
    let sql = sql.strip_suffix(b"\0").unwrap_or(sql);
    let start = sql.iter().position(|b| !b.is_ascii_whitespace())?;
    let head = &sql[start..];
    let starts = |w: &[u8]| head.len() >= w.len() && head[..w.len()].eq_ignore_ascii_case(w);
    if !FIRST_WORDS.iter().any(|w| starts(w)) {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?.trim_end();
    let text = text.trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    if text.contains(';') {
        return None;
    }
    let words: Vec<String> = text
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let cmd = match words.as_slice() {
        ["show", w] => match *w {
            "pool_nodes" => AdminCommand::PoolNodes,
            "pool_version" => AdminCommand::PoolVersion,
            "pool_health_check_stats" => AdminCommand::PoolHealthCheckStats,
            "pool_backend_stats" => AdminCommand::PoolBackendStats,
            "pool_pools" => AdminCommand::PoolPools,
            "pool_processes" => AdminCommand::PoolProcesses,
            "pgpilot_nodes" => AdminCommand::PgpilotNodes,
            "pgpilot_failover" => AdminCommand::PgpilotFailover,
            "pgpilot_slots" => AdminCommand::PgpilotSlots,
            "pgpilot_peers" => AdminCommand::PgpilotPeers,
            _ => return None,
        },
        [verb, "node", n] => {
            let n = NodeId::new(n.parse().ok()?);
            match *verb {
                "attach" => AdminCommand::AttachNode(n),
                "detach" => AdminCommand::DetachNode(n),
                "promote" => AdminCommand::PromoteNode(n),
                "rejoin" => AdminCommand::RejoinNode(n),
                _ => return None,
            }
        }
        ["pgpool", "show", "all"] => AdminCommand::PgpoolShow(None),
        ["pgpool", "show", name] => AdminCommand::PgpoolShow(Some(name.to_string())),
        _ => return None,
    };
    Some(cmd)
}

/// Run an admin command for `who`: 42501 unless the user is in
/// `admin_users`. Never blocks: `SHOW` reads snapshots and counters;
/// `ATTACH`/`DETACH` change node state under the cluster's lock;
/// `PROMOTE NODE` validates and starts a switchover task, `REJOIN NODE` a
/// rejoin task.
pub(crate) fn execute(
    ctx: &ProxyContext,
    cmd: &AdminCommand,
    who: &AdminCaller,
) -> Result<ResultSet, PgError> {
    let cfg = ctx.config.load();
    check_admin(&cfg, cmd, who)?;
    match cmd {
        AdminCommand::PoolNodes => Ok(views::pool_nodes(ctx, who)),
        AdminCommand::PoolVersion => Ok(views::pool_version()),
        AdminCommand::PoolHealthCheckStats => Ok(views::health_check_stats(ctx)),
        AdminCommand::PoolBackendStats => Ok(views::backend_stats(ctx)),
        AdminCommand::PoolPools => Ok(views::pool_pools(ctx)),
        AdminCommand::PoolProcesses => Ok(views::pool_processes(ctx)),
        AdminCommand::PgpilotNodes => Ok(views::pgpilot_nodes(ctx)),
        AdminCommand::PgpoolShow(name) => views::pgpool_show(&cfg, name.as_deref()),
        AdminCommand::PgpilotFailover => Ok(failover::status(ctx)),
        AdminCommand::PgpilotSlots => Ok(failover::slots(ctx)),
        AdminCommand::PgpilotPeers => Ok(peers::peers(ctx)),
        AdminCommand::AttachNode(n) => failover::node_result(*n, ctx.cluster.attach(*n, &cfg)),
        AdminCommand::DetachNode(n) => failover::node_result(*n, ctx.cluster.detach(*n, &cfg)),
        AdminCommand::PromoteNode(n) => failover::node_result(
            *n,
            crate::cluster::switchover::start(ctx.cluster.clone(), ctx.config.clone(), *n),
        ),
        AdminCommand::RejoinNode(n) => failover::node_result(
            *n,
            crate::cluster::rejoin::start(ctx.cluster.clone(), ctx.config.clone(), *n),
        ),
    }
}

/// Whether `cmd` is a node command this instance hands to the leading
/// pgpilot (coordination on, this instance does not decide): the session
/// then awaits [`execute_forwarded`] instead of calling [`execute`].
pub(crate) fn goes_to_leader(ctx: &ProxyContext, cmd: &AdminCommand) -> bool {
    matches!(
        cmd,
        AdminCommand::AttachNode(_) | AdminCommand::DetachNode(_) | AdminCommand::PromoteNode(_)
    ) && ctx.cluster.forwards_commands()
}

/// Whether `cmd` is answered only once another party has run it: a node
/// command on a pgpilot that does not lead (the leading pgpilot runs it), or
/// `PROMOTE NODE` in Patroni mode (Patroni's switchover).
pub(crate) fn waits_elsewhere(ctx: &ProxyContext, cmd: &AdminCommand) -> bool {
    goes_to_leader(ctx, cmd)
        || (matches!(cmd, AdminCommand::PromoteNode(_)) && ctx.cluster.patroni().is_some())
}

/// Run a command [`waits_elsewhere`] names and wait for its outcome.
pub(crate) async fn execute_elsewhere(
    ctx: &ProxyContext,
    cmd: &AdminCommand,
    who: &AdminCaller,
) -> Result<ResultSet, PgError> {
    if let AdminCommand::PromoteNode(n) = cmd
        && ctx.cluster.patroni().is_some()
    {
        let cfg = ctx.config.load_full();
        check_admin(&cfg, cmd, who)?;
        let r = crate::cluster::patroni::switchover(&ctx.cluster, &cfg, *n).await;
        return failover::node_result(*n, r);
    }
    execute_forwarded(ctx, cmd, who).await
}

/// Run a node command through the leading pgpilot (see [`goes_to_leader`]):
/// waits for the leader's outcome, at most twice the lease TTL.
async fn execute_forwarded(
    ctx: &ProxyContext,
    cmd: &AdminCommand,
    who: &AdminCaller,
) -> Result<ResultSet, PgError> {
    let cfg = ctx.config.load_full();
    check_admin(&cfg, cmd, who)?;
    let (command, n) = match cmd {
        AdminCommand::AttachNode(n) => ("attach", *n),
        AdminCommand::DetachNode(n) => ("detach", *n),
        AdminCommand::PromoteNode(n) => {
            // Refused here as the leader would (its mode is this one's).
            if cfg.failover.mode == crate::config::FailoverMode::None {
                let refused = Err(crate::cluster::CommandError::PromotionDisabled);
                return failover::node_result(*n, refused);
            }
            ("promote", *n)
        }
        _ => return execute(ctx, cmd, who),
    };
    failover::node_result(n, ctx.cluster.forward_to_leader(command, n).await)
}

/// The result set `cmd` would return, for the extended protocol's Describe:
/// like [`execute`] for `SHOW` commands, the columns only (no effect) for
/// `ATTACH`/`DETACH`/`PROMOTE`.
pub(crate) fn describe(
    ctx: &ProxyContext,
    cmd: &AdminCommand,
    who: &AdminCaller,
) -> Result<ResultSet, PgError> {
    if cmd.has_effects() {
        check_admin(&ctx.config.load(), cmd, who)?;
        return Ok(failover::node_columns());
    }
    execute(ctx, cmd, who)
}

/// 42501 unless `who` is an admin user.
fn check_admin(
    cfg: &crate::config::Config,
    cmd: &AdminCommand,
    who: &AdminCaller,
) -> Result<(), PgError> {
    if !cfg.is_admin(&who.user) {
        return Err(PgError::error(
            INSUFFICIENT_PRIVILEGE,
            format!(
                "permission denied: {} is for pgpilot admin users",
                cmd.name()
            ),
        )
        .with_hint("list the user in admin_users in pgpilot's configuration"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command_case_and_whitespace_insensitively() {
        let cases = [
            ("SHOW POOL_NODES", AdminCommand::PoolNodes),
            ("show pool_nodes;", AdminCommand::PoolNodes),
            ("  Show\t Pool_Nodes ;; \n", AdminCommand::PoolNodes),
            ("SHOW POOL_VERSION", AdminCommand::PoolVersion),
            (
                "show pool_health_check_stats",
                AdminCommand::PoolHealthCheckStats,
            ),
            ("SHOW pool_backend_stats", AdminCommand::PoolBackendStats),
            ("SHOW POOL_POOLS", AdminCommand::PoolPools),
            ("SHOW POOL_PROCESSES", AdminCommand::PoolProcesses),
            ("SHOW PGPILOT_NODES;", AdminCommand::PgpilotNodes),
            ("PGPOOL SHOW ALL", AdminCommand::PgpoolShow(None)),
            ("SHOW PGPILOT_FAILOVER", AdminCommand::PgpilotFailover),
            ("show pgpilot_slots;", AdminCommand::PgpilotSlots),
            ("attach node 2", AdminCommand::AttachNode(NodeId::new(2))),
            ("DETACH  NODE 1;", AdminCommand::DetachNode(NodeId::new(1))),
            ("Promote Node 0", AdminCommand::PromoteNode(NodeId::new(0))),
            ("REJOIN NODE 0;", AdminCommand::RejoinNode(NodeId::new(0))),
            (
                "pgpool show Health_Check_Period;",
                AdminCommand::PgpoolShow(Some("health_check_period".into())),
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(parse(sql), Some(want.clone()), "{sql:?}");
            let mut msg = sql.as_bytes().to_vec();
            msg.push(0);
            assert_eq!(parse_bytes(&msg), Some(want), "{sql:?} with NUL");
        }
    }

    #[test]
    fn ordinary_sql_is_not_admin() {
        for sql in [
            "SELECT 1",
            "SHOW search_path",
            "SHOW",
            "",
            "   ",
            "SHOW POOL_NODES; SELECT 1",
            "SHOW POOL_NODES extra",
            "showpool_nodes",
            "PGPOOL",
            "PGPOOL SHOW",
            "/* c */ SHOW POOL_NODES",
            "ATTACH NODE",
            "ATTACH NODE x",
            "DETACH NODE -1",
            "PROMOTE NODE 1 2",
            "promote node1",
            "REJOIN NODE",
            "ATTACH PARTITION p FOR VALUES IN (1)",
        ] {
            assert_eq!(parse(sql), None, "{sql:?}");
        }
        assert_eq!(parse_bytes(b"SHOW \xff\xfe"), None);
    }

    #[test]
    fn result_set_encodes_row_description_rows_and_tag() {
        let rs = ResultSet::new(
            &["a", "bb"],
            vec![vec!["1".into(), "".into()], vec!["x".into(), "yz".into()]],
        );
        assert_eq!(rs.command_tag, "SELECT 2");
        let mut buf = BytesMut::new();
        rs.encode_row_description(&mut buf);
        rs.encode_rows_and_complete(&mut buf);
        // RowDescription: 'T', len, field count 2, then "a\0" + 18 bytes ...
        assert_eq!(buf[0], b'T');
        let t_len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        assert_eq!(u16::from_be_bytes([buf[5], buf[6]]), 2);
        assert_eq!(&buf[7..9], b"a\0");
        // type OID of the first column: text (25)
        assert_eq!(u32::from_be_bytes([buf[15], buf[16], buf[17], buf[18]]), 25);
        let mut pos = 1 + t_len;
        let mut rows = Vec::new();
        let mut tag = String::new();
        while pos < buf.len() {
            let t = buf[pos];
            let len = u32::from_be_bytes([buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]])
                as usize;
            let body = &buf[pos + 5..pos + 1 + len];
            match t {
                b'D' => {
                    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
                    let mut vals = Vec::new();
                    let mut p = 2;
                    for _ in 0..n {
                        let l =
                            i32::from_be_bytes([body[p], body[p + 1], body[p + 2], body[p + 3]]);
                        assert!(l >= 0, "no NULLs");
                        p += 4;
                        vals.push(String::from_utf8(body[p..p + l as usize].to_vec()).unwrap());
                        p += l as usize;
                    }
                    rows.push(vals);
                }
                b'C' => tag = String::from_utf8(body[..body.len() - 1].to_vec()).unwrap(),
                other => panic!("unexpected message {other}"),
            }
            pos += 1 + len;
        }
        assert_eq!(rows, rs.rows);
        assert_eq!(tag, "SELECT 2");
    }
}

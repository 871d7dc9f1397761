//! Timeline histories: where the primary's timeline forked from an older
//! one, and whether a node's WAL went past that fork (it *diverged*: it
//! cannot follow the primary without pg_rewind or a new base backup).
//!
//! The primary's history is read from its `pg_wal/<TLI>.history` file with
//! `pg_read_file` (superuser, or `GRANT EXECUTE ON FUNCTION
//! pg_read_file(text)` / `pg_read_server_files`). Each line is `parent-TLI
//! switch-LSN reason`: timeline `parent` ended at `switch-LSN`. A node on
//! timeline `t` with WAL up to `lsn` diverged from a primary on timeline
//! `p > t` when `t` is not in the history (another branch) or `lsn` is past
//! `t`'s switch point. A node on the primary's timeline has not diverged; one
//! on a later timeline than the primary's has.

use super::error::NodeQueryError;
use super::promote::monitor_query;
use super::replication::parse_lsn;
use crate::config::{Config, NodeId};

/// The primary's current timeline and its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct History {
    /// The primary's timeline (`pg_control_checkpoint()`'s, after promotion
    /// the new one once the end-of-recovery checkpoint is written; the
    /// history file decides either way).
    pub(crate) timeline: u32,
    /// `(parent timeline, LSN where it ended)`, oldest first.
    pub(crate) forks: Vec<(u32, u64)>,
}

/// Whether a node's WAL fits the primary's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fit {
    /// Same timeline, or an older one left at or before its switch point.
    Follows,
    /// Its WAL on `timeline` reaches `lsn`, past `switch` where the primary's
    /// history left that timeline (`switch` is `None` when the timeline is
    /// not in the history at all).
    Diverged {
        /// The node's timeline.
        timeline: u32,
        /// How far its WAL reaches.
        lsn: u64,
        /// Where the primary's history left that timeline.
        switch: Option<u64>,
    },
}

impl History {
    /// Parse a history file's text for a primary on `timeline`.
    pub(crate) fn parse(timeline: u32, text: &str) -> History {
        let forks = text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let tli = w.next()?.parse().ok()?;
                let lsn = parse_lsn(w.next()?)?;
                Some((tli, lsn))
            })
            .collect();
        History { timeline, forks }
    }

    /// Where the history left timeline `tli` (`None`: not in it).
    pub(crate) fn switch_point(&self, tli: u32) -> Option<u64> {
        self.forks.iter().find(|(t, _)| *t == tli).map(|(_, l)| *l)
    }

    /// Whether WAL on timeline `tli` reaching `lsn` fits this history.
    pub(crate) fn fit(&self, tli: u32, lsn: u64) -> Fit {
        if tli == self.timeline {
            return Fit::Follows;
        }
        let switch = self.switch_point(tli).filter(|_| tli < self.timeline);
        match switch {
            Some(s) if lsn <= s => Fit::Follows,
            _ => Fit::Diverged {
                timeline: tli,
                lsn,
                switch,
            },
        }
    }
}

/// Read the history of the primary `node` (a fresh query). Its timeline
/// comes from the name of its current WAL file: `pg_control_checkpoint()`
/// keeps the old one until the first checkpoint after a promotion.
pub(crate) async fn history(cfg: &Config, node: NodeId) -> Result<History, NodeQueryError> {
    let sql = "SELECT t::text, CASE WHEN t > 1 THEN \
               pg_read_file('pg_wal/' || lpad(upper(to_hex(t)), 8, '0') || '.history') \
               ELSE '' END FROM (SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))\
               ::bit(32)::int AS t) AS c";
    let rows = monitor_query(cfg, node, sql, cfg.health_check.timeout).await?;
    let row = rows.first().ok_or(NodeQueryError::NoRow { node })?;
    let tli = row
        .first()
        .cloned()
        .flatten()
        .and_then(|t| t.parse().ok())
        .ok_or(NodeQueryError::NoRow { node })?;
    let text = row.get(1).cloned().flatten().unwrap_or_default();
    Ok(History::parse(tli, &text))
}

/// How the WAL of standby `node` (running, in recovery) fits `history`.
/// Its timeline is its WAL receiver's when it streams, else its last
/// restartpoint's; its position is its replay position. A standby that
/// already switched to a later timeline but made no restartpoint there
/// still looks as if on the old one, so WAL files of a later timeline in
/// its `pg_wal` (`pg_ls_waldir()`, granted by pg_monitor) count as proof
/// that it followed: a diverged standby never receives any.
pub(crate) async fn standby_fit(
    cfg: &Config,
    node: NodeId,
    history: &History,
) -> Result<Fit, NodeQueryError> {
    let sql = "SELECT coalesce((SELECT received_tli FROM pg_stat_wal_receiver \
               WHERE status = 'streaming'), c.timeline_id)::text, \
               pg_last_wal_replay_lsn()::text, \
               (SELECT count(*) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$' \
               AND substr(name, 1, 8) > lpad(upper(to_hex(c.timeline_id)), 8, '0'))::text \
               FROM pg_control_checkpoint() AS c";
    let rows = monitor_query(cfg, node, sql, cfg.health_check.timeout).await?;
    let row = rows.first().ok_or(NodeQueryError::NoRow { node })?;
    let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let (Some(tli), Some(lsn)) = (col(0).parse().ok(), parse_lsn(&col(1))) else {
        return Err(NodeQueryError::NoRow { node });
    };
    let later_wal = col(2).parse::<u64>().unwrap_or(0) > 0;
    Ok(match history.fit(tli, lsn) {
        Fit::Diverged { timeline, .. } if later_wal && timeline < history.timeline => Fit::Follows,
        fit => fit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_is_judged_against_the_switch_points() {
        let h = History::parse(
            3,
            "1\t0/3000158\tno recovery target specified\n\n2\t0/5000000\tno recovery target specified\n",
        );
        assert_eq!(h.forks, vec![(1, 0x3000158), (2, 0x5000000)]);
        assert_eq!(h.fit(3, u64::MAX), Fit::Follows);
        assert_eq!(h.fit(1, 0x3000158), Fit::Follows);
        assert_eq!(h.fit(2, 0x4000000), Fit::Follows);
        assert_eq!(
            h.fit(1, 0x3000160),
            Fit::Diverged {
                timeline: 1,
                lsn: 0x3000160,
                switch: Some(0x3000158)
            }
        );
        // A timeline the primary never was on: another branch.
        assert!(matches!(h.fit(4, 1), Fit::Diverged { switch: None, .. }));
        let first = History::parse(1, "");
        assert_eq!(first.fit(1, 7), Fit::Follows);
        assert!(matches!(first.fit(2, 7), Fit::Diverged { .. }));
    }
}

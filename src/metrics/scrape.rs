//! The gauges a scrape fills from the cluster, the pool and the caches
//! (`ScrapeGauges`): built once with the registry, filled at each scrape,
//! never touched on the hot path.

#[allow(clippy::wildcard_imports)]
use super::*;

impl ScrapeGauges {
    pub(super) fn new(r: &Registry) -> ScrapeGauges {
        ScrapeGauges {
            node_up: metric!(
                r,
                IntGaugeVec,
                "pgpilot_node_up",
                "1 when the node is in service (status up or waiting).",
                &["node"]
            ),
            node_reachable: metric!(
                r,
                IntGaugeVec,
                "pgpilot_node_reachable",
                "1 when the latest health-check attempt reached the node (pg_status).",
                &["node"]
            ),
            node_role: metric!(
                r,
                IntGaugeVec,
                "pgpilot_node_role",
                "1 for the role the node reports (pg_is_in_recovery()); one series per role.",
                &["node", "role"]
            ),
            node_primary: metric!(
                r,
                IntGaugeVec,
                "pgpilot_node_primary",
                "1 for the node pgpilot sends writes to.",
                &["node"]
            ),
            lag_bytes: metric!(
                r,
                GaugeVec,
                "pgpilot_node_replication_lag_bytes",
                "WAL bytes the node has not replayed yet (primary LSN - replay LSN); absent when unknown.",
                &["node"]
            ),
            lag_seconds: metric!(
                r,
                GaugeVec,
                "pgpilot_node_replication_lag_seconds",
                "How far behind the node is in time; absent when unknown.",
                &["node"]
            ),
            effective_weight: metric!(
                r,
                GaugeVec,
                "pgpilot_node_effective_weight",
                "Read weight after lag (0 = gets no reads).",
                &["node"]
            ),
            replay_paused: metric!(
                r,
                IntGaugeVec,
                "pgpilot_node_replay_paused",
                "1 when WAL replay is paused on the standby.",
                &["node"]
            ),
            backend_conns: metric!(
                r,
                IntGaugeVec,
                "pgpilot_backend_connections",
                "Server connections per node: idle in the pool, or active (serving a session).",
                &["node", "state"]
            ),
            pool_waiting: metric!(
                r,
                IntGaugeVec,
                "pgpilot_pool_waiting_clients",
                "Sessions queued for a server connection to a node (every slot taken).",
                &["node"]
            ),
            backend_opened: metric!(
                r,
                IntCounterVec,
                "pgpilot_backend_connections_opened_total",
                "Server connections opened.",
                &["node"]
            ),
            cache_hits: metric!(
                r,
                IntCounter,
                "pgpilot_classify_cache_hits_total",
                "Statement classifications served from the cache."
            ),
            cache_misses: metric!(
                r,
                IntCounter,
                "pgpilot_classify_cache_misses_total",
                "Statement classifications computed (cache misses)."
            ),
            primary_available: metric!(
                r,
                IntGauge,
                "pgpilot_primary_available",
                "1 when a primary is known and in service (what /healthz reports)."
            ),
            health_checks: metric!(
                r,
                IntCounterVec,
                "pgpilot_health_checks_total",
                "Health-check rounds (first attempt plus retries), by result.",
                &["node", "result"]
            ),
            health_down_verdicts: metric!(
                r,
                IntCounterVec,
                "pgpilot_health_check_down_total",
                "Rounds where every attempt failed (the node was declared down).",
                &["node"]
            ),
            info: metric!(
                r,
                IntGaugeVec,
                "pgpilot_node_info",
                "Always 1; labels give each node's host and port.",
                &["node", "host", "port"]
            ),
            uptime: metric!(
                r,
                Gauge,
                "pgpilot_uptime_seconds",
                "Seconds since pgpilot started."
            ),
            failover_events: metric!(
                r,
                IntCounterVec,
                "pgpilot_failover_events_total",
                "Failover events: failover/switchover started, finished, failed; candidate refused; promotion; follow; fenced; attach; detach.",
                &["event"]
            ),
            failover_in_progress: metric!(
                r,
                IntGauge,
                "pgpilot_failover_in_progress",
                "1 while a failover or switchover is in progress (no primary takes writes)."
            ),
            failover_last_duration: metric!(
                r,
                Gauge,
                "pgpilot_failover_last_duration_seconds",
                "Duration of the last finished failover or switchover (detection to new primary in service)."
            ),
            slots: slots::SlotMetrics::new(r),
            coordination: coordination::CoordinationMetrics::new(r),
        }
    }

    pub(super) fn fill(&self, ctx: &impl Scrape) {
        let snap = ctx.cluster().snapshot();
        let stats = ctx.cluster().health_stats();
        for v in [
            &self.node_up,
            &self.node_reachable,
            &self.node_role,
            &self.node_primary,
            &self.replay_paused,
            &self.backend_conns,
            &self.pool_waiting,
            &self.info,
        ] {
            v.reset();
        }
        for v in [&self.lag_bytes, &self.lag_seconds, &self.effective_weight] {
            v.reset();
        }
        for n in &snap.nodes {
            let id = n.id.to_string();
            let id = id.as_str();
            self.info
                .with_label_values(&[id, &n.host, &n.port.to_string()])
                .set(1);
            self.node_up
                .with_label_values(&[id])
                .set(n.status.is_usable().into());
            self.node_reachable
                .with_label_values(&[id])
                .set((n.pg_status == crate::cluster::PgStatus::Up).into());
            for role in [Role::Primary, Role::Standby, Role::Unknown] {
                self.node_role
                    .with_label_values(&[id, role.as_str()])
                    .set((n.role == role).into());
            }
            self.node_primary
                .with_label_values(&[id])
                .set((snap.primary == Some(n.id)).into());
            if let Some(b) = n.repl.lag_bytes {
                self.lag_bytes.with_label_values(&[id]).set(b as f64);
            }
            if let Some(s) = n.repl.lag_seconds {
                self.lag_seconds.with_label_values(&[id]).set(s);
            }
            self.effective_weight
                .with_label_values(&[id])
                .set(n.effective_weight);
            if let Some(p) = n.repl.replay_paused {
                self.replay_paused.with_label_values(&[id]).set(p.into());
            }
            let pool = ctx.pool().stats(n.id);
            self.backend_conns
                .with_label_values(&[id, "idle"])
                .set(pool.idle as i64);
            self.backend_conns
                .with_label_values(&[id, "active"])
                .set(pool.open.saturating_sub(pool.idle) as i64);
            self.pool_waiting
                .with_label_values(&[id])
                .set(pool.waiting as i64);
            sync_counter(
                &self.backend_opened.with_label_values(&[id]),
                pool.opened_total,
            );
            if let Some(s) = stats.get(n.id.index()) {
                sync_counter(
                    &self.health_checks.with_label_values(&[id, "success"]),
                    s.success_count,
                );
                sync_counter(
                    &self.health_checks.with_label_values(&[id, "failure"]),
                    s.fail_count,
                );
                sync_counter(
                    &self.health_down_verdicts.with_label_values(&[id]),
                    s.fail_count,
                );
            }
        }
        self.primary_available.set(snap.has_primary().into());
        sync_counter(&self.cache_hits, ctx.classify_cache().hits());
        sync_counter(&self.cache_misses, ctx.classify_cache().misses());
        self.uptime.set(ctx.started().elapsed().as_secs_f64());
        let f = ctx.cluster().failover_report();
        for (event, n) in f.counts.all() {
            sync_counter(&self.failover_events.with_label_values(&[event]), n);
        }
        self.failover_in_progress.set(f.current.is_some().into());
        if let Some(d) = f.last.as_ref().and_then(|t| t.duration) {
            self.failover_last_duration.set(d.as_secs_f64());
        }
        self.slots.fill(&ctx.cluster().replication_slots());
        self.coordination.fill(ctx.cluster());
    }
}

#!/usr/bin/env bash
# Failover benchmark: the kill-the-primary scenario of tests/failover/under_load.rs, run
# ROUNDS times with synchronous and with asynchronous replication, pgpilot
# with default settings. Each round builds a fresh primary + 2 standbys (real
# PostgreSQL on loopback), runs WRITERS autocommit clients inserting through
# pgpilot, stops the primary with `pg_ctl stop -m immediate`, and measures the
# write downtime (kill -> first write acknowledged by the new primary), the
# acknowledged writes missing on the new primary, the time until every
# surviving standby streams from the new primary (target <= 5 s) and, with
# failover.auto_rejoin and rejoin = "pg_rewind", until the old primary streams
# from it again (target <= 30 s; refused with synchronous replication, as the
# old primary stopped uncleanly). Clusters use replication slots and
# wal_log_hints = on. Prints each round and the medians.
#
#   ROUNDS=5 WRITERS=4 MODES="sync async" DETECT=session benches/failover.sh
# DETECT=health turns failover.detect_on_session_error off (detection by the
# health checks' retries alone: period 1s, 2 retries 1s apart).
#
# INSTANCES=2: two pgpilots coordinating through a real etcd (Debian's
# etcd-server, started on loopback each round) in front of the cluster, the
# writers split between them. Reports the write downtime through each, the
# time from the leader's decision (it records the new primary in etcd) to
# the follower's switch (it routes writes there; target <= 100 ms on
# loopback), lost acknowledged writes, promotions and the new timeline
# (examples/failover_bench/two.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
WRITERS=${WRITERS:-4}
MODES=${MODES:-"sync async"}
DETECT=${DETECT:-session}
INSTANCES=${INSTANCES:-1}
cargo build --release --quiet --example failover_bench
for mode in $MODES; do
    echo "== $mode replication, $ROUNDS rounds, $WRITERS writers, detection: $DETECT, $INSTANCES instance(s)"
    PGPILOT_LOG=${PGPILOT_LOG:-error} target/release/examples/failover_bench "$mode" "$ROUNDS" "$WRITERS" "$DETECT" "$INSTANCES"
done

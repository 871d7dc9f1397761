#!/usr/bin/env bash
# Read-your-writes under CPU contention, longer than CI runs it: the stress
# tests of tests/consistency/stress.rs (real PostgreSQL, a primary and two
# streaming standbys the test harness starts on loopback; pgpilot with two
# runtime threads; spinning threads beside it) with more hand-offs.
#   global:  16 pairs of connections; a writer inserts a row and, once it is
#            acknowledged, hands its id to a reader on another connection
#   session: 32 connections, each inserting a row and reading it back
# Each round prints, per mode: hand-offs, time, missing rows (must be 0) and
# reads served by standbys; a miss fails the round and the script.
#
#   benches/handoff.sh                          # 1 round, 200,000 per mode, 2 busy loops
#   ROUNDS=3 HANDOFFS=500000 BUSY=3 benches/handoff.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-1}
HANDOFFS=${HANDOFFS:-200000}
BUSY=${BUSY:-2}

cargo test --quiet --test consistency --no-run
for r in $(seq 1 "$ROUNDS"); do
    echo "== round $r: $HANDOFFS hand-offs per mode, $BUSY busy loops"
    PGPILOT_STRESS_HANDOFFS=$HANDOFFS PGPILOT_STRESS_BUSY=$BUSY \
        cargo test --quiet --test consistency stress:: -- --nocapture --test-threads=1 2>&1 |
        grep -E 'iterations in|panicked|test result'
done

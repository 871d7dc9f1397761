#!/usr/bin/env bash
# Hang hunt (not a test, not a benchmark): short pgbench runs, over and over,
# through pgpilots with several runtime threads while busy loops load the CPUs,
# until one run does not finish. Timing bugs in the relay (a lost wake-up
# leaves a session waiting on a socket that holds data) show here long before
# they show in the test suite: a lost wake-up in the relay's readiness watch hung
# this within 1-18 iterations, and never in an idle run of the tests.
#
# Targets, on one `pgpilot demo` cluster (primary + 2 streaming standbys,
# loopback only): the demo's own pgpilot (routing on), and two pgpilots with
# routing off, one pooling per session and one per transaction. Each
# iteration runs pgbench -S for DURATION seconds through every target in
# every protocol mode (simple, extended, prepared). A run that takes more
# than HANG_AFTER seconds is a hang: the script says which and exits 1,
# leaving the cluster and the pgpilots running for a look (a hung session's
# server connection shows in pg_stat_activity; the script prints the pids to
# kill, the demo with -INT so that it removes its cluster).
#
#   benches/stress.sh                   # 20 iterations, 2 runtime threads, 3 busy loops
#   ITERATIONS=100 BUSY=4 benches/stress.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ITERATIONS=${ITERATIONS:-20}
WORKERS=${WORKERS:-2}       # pgpilot runtime threads: a lost wake-up needs more than one
BUSY=${BUSY:-3}             # busy loops beside the runs
CLIENTS=${CLIENTS:-8}
DURATION=${DURATION:-2}
HANG_AFTER=${HANG_AFTER:-30}

PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
. benches/lib.sh

cargo build --release --quiet
WORK=$(mktemp -d /tmp/pgpilot-stress.XXXXXX)
chmod 755 "$WORK"
DEMO_PID=""; PROXY_PIDS=""; BUSY_PIDS=""; HUNG=0
cleanup() {
    for pid in $BUSY_PIDS; do kill "$pid" 2>/dev/null || true; done
    if [ "$HUNG" = 1 ]; then
        echo "left running for a look: pgpilot demo $DEMO_PID, pgpilots$PROXY_PIDS; files in $WORK"
        return
    fi
    for pid in $PROXY_PIDS; do kill "$pid" 2>/dev/null || true; done
    stop_demo
    rm -rf "$WORK"
}
trap cleanup EXIT

DEMO_PORT=$(free_port)
start_demo "$WORK/demo.log" --workers "$WORKERS" --listen "127.0.0.1:$DEMO_PORT" --metrics-listen "127.0.0.1:$(free_port)"

start_proxy() { # name pool_mode port
    proxy_config "$3" "$2" "$WORKERS" >"$WORK/$1.toml"
    PGPILOT_LOG=warn setsid ./target/release/pgpilot run --config "$WORK/$1.toml" >"$WORK/$1.log" 2>&1 &
    PROXY_PIDS="$PROXY_PIDS $!"
}
SESSION_PORT=$(free_port)
TX_PORT=$(free_port)
start_proxy session session "$SESSION_PORT"
start_proxy transaction transaction "$TX_PORT"
sleep 1

export PGPASSWORD=demo
"$PGBIN/pgbench" -i -q -s 2 -h 127.0.0.1 -p "$(node_port 0)" -U demo demo >/dev/null 2>&1

for _ in $(seq 1 "$BUSY"); do
    (while :; do :; done) &
    BUSY_PIDS="$BUSY_PIDS $!"
done

for i in $(seq 1 "$ITERATIONS"); do
    for target in "routing:$DEMO_PORT" "session:$SESSION_PORT" "transaction:$TX_PORT"; do
        name=${target%%:*}; port=${target##*:}
        for mode in simple extended prepared; do
            set +e
            timeout "$HANG_AFTER" "$PGBIN/pgbench" -n -S -M "$mode" -c "$CLIENTS" -j 2 -T "$DURATION" \
                -h 127.0.0.1 -p "$port" -U demo demo >"$WORK/last.out" 2>&1
            rc=$?
            set -e
            if [ "$rc" = 124 ]; then
                HUNG=1
                echo "HANG: iteration $i, $name pgpilot (port $port), -M $mode: pgbench did not finish in ${HANG_AFTER} s"
                exit 1
            fi
            if ! grep -q "number of failed transactions: 0 " "$WORK/last.out"; then
                echo "iteration $i, $name pgpilot, -M $mode: pgbench failed"
                cat "$WORK/last.out"
                exit 1
            fi
        done
    done
    echo "iteration $i: 9 runs, all finished"
done
echo "no hang in $ITERATIONS iterations ($((ITERATIONS * 9)) pgbench runs, $WORKERS runtime threads, $BUSY busy loops)"

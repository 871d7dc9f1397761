#!/usr/bin/env bash
# Userland instructions per transaction (a benchmark, not a test): pgpilot and
# PgBouncer each run under valgrind's callgrind while pgbench -S pushes
# transactions through them; the instruction count of the proxy process per
# transaction is exact and repeatable, unlike TPS on a shared machine (see
# e2e.sh, whose ratios swing with steal). It counts only the proxy's own code
# and libraries, not the kernel's work for its system calls (the same
# calls for both: 2 sends and 2 receives per transaction) nor PostgreSQL's.
#
# Each target runs twice, with T1 and T2 transactions per client; the
# difference of the totals over the difference of the transactions leaves out
# start-up, log-in (SCRAM) and shut-down.
#   pgbouncer       - Debian's PgBouncer, transaction pooling
#   pgpilot-primary - pgpilot, load_balance = false, session pooling
#   pgpilot-tx      - the same with pool.mode = "transaction"
#
#   benches/instructions.sh              # 16 clients, T1=200, T2=1200
#   CLIENTS=4 T2=3000 benches/instructions.sh
#   KEEP=/tmp/cg benches/instructions.sh  # keep callgrind's files (callgrind_annotate,
#                                          # e.g. --show=I1mr --sort=I1mr for cache misses)
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-16}
T1=${T1:-200}
T2=${T2:-1200}
TARGETS=${TARGETS:-"pgbouncer pgpilot-primary pgpilot-tx"}

for pkg in valgrind pgbouncer; do
    command -v "$pkg" >/dev/null || { echo "installing $pkg"; apt-get install -y -qq "$pkg" >/dev/null; }
done
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
. benches/lib.sh

cargo build --release --quiet
WORK=$(mktemp -d /tmp/pgpilot-instr.XXXXXX)
chmod 777 "$WORK"
DEMO_PID=""
cleanup() {
    pkill -INT -f "callgrind-out-file=$WORK/" 2>/dev/null || true
    stop_demo
    rm -rf "$WORK"
}
trap cleanup EXIT

# The cluster: pgpilot demo's (real PostgreSQL, a primary and two standbys).
start_demo "$WORK/demo.log" --workers 1 --listen "127.0.0.1:$(free_port)" --metrics-listen ""
PRIMARY=$(node_port 0)
export PGPASSWORD=demo
"$PGBIN/pgbench" -i -q -s 10 -h 127.0.0.1 -p "$PRIMARY" -U demo demo >/dev/null 2>&1

PORT=$(free_port)
echo '"demo" "demo"' >"$WORK/userlist.txt"
cat >"$WORK/pgbouncer.ini" <<INI
[databases]
demo = host=127.0.0.1 port=$PRIMARY dbname=demo
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $CLIENTS
max_client_conn = 200
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
for mode in session transaction; do
    {
        proxy_config "$PORT" "$mode" 1
        # Checks are time-driven, not per transaction: rarely, so the two
        # runs' different durations hardly count.
        printf '[health_check]\nperiod = "60s"\n[sr_check]\nperiod = "60s"\n'
    } >"$WORK/$mode.toml"
done
chown -R postgres "$WORK" 2>/dev/null || true

total() { # target transactions_per_client -> instructions of the proxy process
    local out="$WORK/$1.$2.out"
    case $1 in
        pgbouncer)
            if [ "$(id -u)" = 0 ]; then
                setsid runuser -u postgres -- valgrind --tool=callgrind --cache-sim=yes --callgrind-out-file="$out" pgbouncer "$WORK/pgbouncer.ini" >"$WORK/vg.log" 2>&1 &
            else
                setsid valgrind --tool=callgrind --cache-sim=yes --callgrind-out-file="$out" pgbouncer "$WORK/pgbouncer.ini" >"$WORK/vg.log" 2>&1 &
            fi ;;
        pgpilot-primary) PGPILOT_LOG=warn setsid valgrind --tool=callgrind --cache-sim=yes --callgrind-out-file="$out" ./target/release/pgpilot run --config "$WORK/session.toml" >"$WORK/vg.log" 2>&1 & ;;
        pgpilot-tx) PGPILOT_LOG=warn setsid valgrind --tool=callgrind --cache-sim=yes --callgrind-out-file="$out" ./target/release/pgpilot run --config "$WORK/transaction.toml" >"$WORK/vg.log" 2>&1 & ;;
    esac
    for _ in $(seq 1 300); do (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.2; done
    "$PGBIN/pgbench" -S -M simple -c "$CLIENTS" -j 1 -t "$2" -h 127.0.0.1 -p "$PORT" -U demo demo >"$WORK/pgbench.log" 2>&1 ||
        { cat "$WORK/pgbench.log" "$WORK/vg.log" >&2; exit 1; }
    grep -q "number of failed transactions: 0 " "$WORK/pgbench.log" || { cat "$WORK/pgbench.log" >&2; exit 1; }
    pkill -INT -f "callgrind-out-file=$out"
    for _ in $(seq 1 300); do pgrep -f "callgrind-out-file=$out" >/dev/null || break; sleep 0.2; done
    if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$out" "$KEEP/"; fi
    # Instructions and simulated L1 instruction-cache misses (events Ir, I1mr).
    awk '/^(summary|totals):/ { print $2, $5; exit }' "$out"
}

declare -A PER_TX MISSES
for target in $TARGETS; do
    read -r a ma <<<"$(total "$target" "$T1")"
    read -r b mb <<<"$(total "$target" "$T2")"
    PER_TX[$target]=$(( (b - a) / (CLIENTS * (T2 - T1)) ))
    MISSES[$target]=$(awk -v a="$ma" -v b="$mb" -v n=$((CLIENTS * (T2 - T1))) 'BEGIN { printf "%.1f", (b - a) / n }')
    echo "$target: $a instructions for $T1 transactions per client, $b for $T2: ${PER_TX[$target]} per transaction"
done
echo
# The L1i misses are callgrind's simulation of this CPU's instruction cache
# for the proxy alone (no other process evicts its code): they show whether
# the per-transaction code fits the cache, not real miss counts.
echo "pgbench -S -M simple -c $CLIENTS, userland instructions and simulated L1i misses per transaction (callgrind):"
for target in $TARGETS; do
    awk -v t="$target" -v n="${PER_TX[$target]}" -v b="${PER_TX[pgbouncer]:-0}" -v m="${MISSES[$target]}" 'BEGIN {
        printf "  %-16s %7d", t, n
        if (b > 0) printf "   %.2f x pgbouncer", n / b
        printf "   L1i misses %6.1f\n", m }'
done

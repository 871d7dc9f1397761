#!/usr/bin/env bash
# End-to-end throughput benchmark (not a test): pgbench select-only against
#   direct   - the primary itself
#   pgbouncer - Debian's PgBouncer, transaction pooling, in front of the primary
#   pgpilot  - this proxy (release build), in front of the same cluster
# interleaved for ROUNDS rounds; prints the median TPS of each and its ratio to
# direct. Everything runs on loopback; the cluster is `pgpilot demo`'s (real
# PostgreSQL, primary + 2 streaming standbys in a temp dir), removed at the end.
#
#   benches/e2e.sh                      # defaults: 3 rounds x 10 s, 16 clients, simple protocol
#   ROUNDS=5 DURATION=20 MODE=prepared benches/e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
MODE=${MODE:-simple}
EXTRA=${EXTRA:--S}   # pgbench workload flags; EXTRA="" for TPC-B-like
WORKERS=${WORKERS:-0} # pgpilot runtime threads (0 = one per core)

for bin in pgbouncer; do
    command -v "$bin" >/dev/null || { echo "installing $bin"; apt-get install -y -qq pgbouncer >/dev/null; }
done
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGBENCH="$PGBIN/pgbench"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release --quiet
WORK=$(mktemp -d /tmp/pgpilot-bench.XXXXXX)
chmod 755 "$WORK"
DEMO_PID=""; BOUNCER_PID=""
cleanup() {
    [ -n "$BOUNCER_PID" ] && kill "$BOUNCER_PID" 2>/dev/null || true
    if [ -n "$DEMO_PID" ]; then
        kill -INT "$DEMO_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$DEMO_PID" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

PILOT_PORT=$(free_port)
PGPILOT_LOG=warn ./target/release/pgpilot demo --workers "$WORKERS" --listen "127.0.0.1:$PILOT_PORT" >"$WORK/demo.log" 2>&1 &
DEMO_PID=$!
for _ in $(seq 1 300); do grep -q "pgpilot is listening" "$WORK/demo.log" && break; sleep 0.2; done
grep -q "pgpilot is listening" "$WORK/demo.log" || { cat "$WORK/demo.log"; exit 1; }
PRIMARY_PORT=$(sed -n 's/.*node 0: 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/demo.log")

BOUNCER_PORT=$(free_port)
cat >"$WORK/pgbouncer.ini" <<INI
[databases]
demo = host=127.0.0.1 port=$PRIMARY_PORT dbname=demo
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $CLIENTS
max_client_conn = 200
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
echo '"demo" "demo"' >"$WORK/userlist.txt"
chown -R postgres "$WORK" 2>/dev/null || true
if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- pgbouncer "$WORK/pgbouncer.ini" &
else
    pgbouncer "$WORK/pgbouncer.ini" &
fi
BOUNCER_PID=$!
sleep 1

export PGPASSWORD=demo
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PRIMARY_PORT" -U demo demo >/dev/null 2>&1

cpu_ticks() { # pid -> utime+stime of the process (all threads), in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}
TICK_US=$(awk -v hz="$(getconf CLK_TCK)" 'BEGIN { print 1000000 / hz }')

run() { # name port pid -> "tps cpu_us_per_transaction"
    local before after
    before=$(cpu_ticks "$3")
    "$PGBENCH" $EXTRA -M "$MODE" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -h 127.0.0.1 -p "$2" -U demo demo >"$WORK/$1.last" 2>&1
    after=$(cpu_ticks "$3")
    local tps txns
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORK/$1.last")
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORK/$1.last")
    awk -v t="$tps" -v n="$txns" -v d="$((after - before))" -v u="$TICK_US" \
        'BEGIN { if (t == "") exit; printf "%s %.2f\n", t, (n > 0 && d > 0 ? d * u / n : 0) }'
}

BOUNCER_REAL_PID=$(cat "$WORK/pgbouncer.pid" 2>/dev/null || echo "$BOUNCER_PID")
declare -A RESULTS CPU
for r in $(seq 1 "$ROUNDS"); do
    for target in direct pgbouncer pgpilot; do
        case $target in
            direct) port=$PRIMARY_PORT; pid=0 ;;
            pgbouncer) port=$BOUNCER_PORT; pid=$BOUNCER_REAL_PID ;;
            pgpilot) port=$PILOT_PORT; pid=$DEMO_PID ;;
        esac
        out=$(run "$target" "$port" "$pid")
        tps=${out%% *}; cpu=${out##* }
        if [ -z "$out" ]; then echo "pgbench through $target failed:"; cat "$WORK/$target.last"; exit 1; fi
        grep -q "number of failed transactions: 0 " "$WORK/$target.last" || { echo "$target had failed transactions"; cat "$WORK/$target.last"; exit 1; }
        RESULTS[$target]="${RESULTS[$target]:-} $tps"
        CPU[$target]="${CPU[$target]:-} $cpu"
        if [ "$target" = direct ]; then
            printf 'round %d  %-9s %10.0f tps\n' "$r" "$target" "$tps"
        else
            printf 'round %d  %-9s %10.0f tps   proxy CPU %6.1f us/transaction\n' "$r" "$target" "$tps" "$cpu"
        fi
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
DIRECT=$(echo "${RESULTS[direct]}" | median)
echo
echo "pgbench $EXTRA -M $MODE -c $CLIENTS -j $THREADS -T $DURATION, scale $SCALE, $ROUNDS rounds (median):"
BOUNCER=$(echo "${RESULTS[pgbouncer]}" | median)
BOUNCER_CPU=$(echo "${CPU[pgbouncer]}" | median)
for target in direct pgbouncer pgpilot; do
    m=$(echo "${RESULTS[$target]}" | median)
    c=$(echo "${CPU[$target]}" | median)
    awk -v t="$target" -v m="$m" -v d="$DIRECT" -v b="$BOUNCER" -v c="$c" -v bc="$BOUNCER_CPU" 'BEGIN {
        printf "  %-9s %10.0f tps   %.3f x direct   %.3f x pgbouncer", t, m, m/d, m/b
        if (t != "direct") printf "   proxy CPU %.1f us/transaction (%.2f x pgbouncer)", c, c/bc
        printf "\n" }'
done

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
PGPILOT_LOG=warn ./target/release/pgpilot demo --listen "127.0.0.1:$PILOT_PORT" >"$WORK/demo.log" 2>&1 &
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

run() { # name port -> tps
    "$PGBENCH" $EXTRA -M "$MODE" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -h 127.0.0.1 -p "$2" -U demo demo 2>&1 \
        | tee "$WORK/$1.last" | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}

declare -A RESULTS
for r in $(seq 1 "$ROUNDS"); do
    for target in direct pgbouncer pgpilot; do
        case $target in
            direct) port=$PRIMARY_PORT ;;
            pgbouncer) port=$BOUNCER_PORT ;;
            pgpilot) port=$PILOT_PORT ;;
        esac
        tps=$(run "$target" "$port")
        if [ -z "$tps" ]; then echo "pgbench through $target failed:"; cat "$WORK/$target.last"; exit 1; fi
        grep -q "number of failed transactions: 0 " "$WORK/$target.last" || { echo "$target had failed transactions"; cat "$WORK/$target.last"; exit 1; }
        RESULTS[$target]="${RESULTS[$target]:-} $tps"
        printf 'round %d  %-9s %10.0f tps\n' "$r" "$target" "$tps"
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
DIRECT=$(echo "${RESULTS[direct]}" | median)
echo
echo "pgbench $EXTRA -M $MODE -c $CLIENTS -j $THREADS -T $DURATION, scale $SCALE, $ROUNDS rounds (median):"
for target in direct pgbouncer pgpilot; do
    m=$(echo "${RESULTS[$target]}" | median)
    awk -v t="$target" -v m="$m" -v d="$DIRECT" 'BEGIN { printf "  %-9s %10.0f tps   %.3f x direct\n", t, m, m/d }'
done

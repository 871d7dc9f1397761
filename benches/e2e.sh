#!/usr/bin/env bash
# End-to-end throughput benchmark (not a test): pgbench select-only against
#   direct          - the primary itself
#   direct-split    - half the clients straight to each standby: a read splitter
#                     that costs nothing, to show what standby reads cost
#                     PostgreSQL on this machine
#   pgbouncer       - Debian's PgBouncer, transaction pooling, in front of the primary
#                     (the baseline of every "x pgbouncer" ratio)
#   pgbouncer-session - the same PgBouncer build in session pooling mode, which is
#                     how pgpilot-primary pools: what the pooling mode alone costs
#   pgpilot-primary - this proxy with load_balance = false (everything on the
#                     primary: the core proxy, same path as PgBouncer)
#   pgpilot-tx      - the same with pool.mode = "transaction", as PgBouncer pools
#   pgpilot         - this proxy with routing on: reads spread over the standbys
# interleaved for ROUNDS rounds; prints the median TPS of each, its ratio to
# direct and to PgBouncer, the proxy's CPU per transaction and PostgreSQL's
# (all server processes, reaped connections included), and the per-round
# ratios to PgBouncer with their geometric mean and a 95% bootstrap interval. Everything runs on
# loopback; the cluster is `pgpilot demo`'s (real PostgreSQL, primary + 2
# streaming standbys in a temp dir), removed at the end. Every pgpilot and
# PgBouncer get one thread (WORKERS=1), as PgBouncer has.
# Each proxy and pgbench run in their own session (setsid). Linux's scheduler
# autogroups share CPU between sessions, so a proxy that shared pgbench's
# session would get less CPU than one that did not. (Measured: pgpilot in
# pgbench's group was switched out 3x as often per transaction as PgBouncer
# in its own.)
#
#   benches/e2e.sh                      # defaults: 3 rounds x 10 s, 16 clients, simple protocol
#   ROUNDS=5 DURATION=20 MODE=prepared benches/e2e.sh
#   ROUNDS=15 TARGETS="pgpilot-primary" benches/e2e.sh   # a long paired A/B
#   RACE=1 ROUNDS=5 TARGETS="pgpilot-tx" benches/e2e.sh   # head to head with PgBouncer (see RACE below)
#   BASE_BIN=/path/to/old/pgpilot benches/e2e.sh   # before/after: adds base-primary, base-tx
#                     and base (the old binary as pgpilot-primary, pgpilot-tx, pgpilot)
#   TLS=1 ROUNDS=5 benches/e2e.sh       # clients over TLS: pgpilot-tx vs PgBouncer
#                     (transaction pooling, client_tls_sslmode = require), the same
#                     certificate, pgbench with sslmode=require; select-only, then a
#                     connect storm (pgbench -C: a TLS handshake and a login per
#                     transaction); per-round ratios and their medians (see TLS below)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
MODE=${MODE:-simple}
EXTRA=${EXTRA:--S}   # pgbench workload flags; EXTRA="" for TPC-B-like
WORKERS=${WORKERS:-1} # pgpilot runtime threads (0 = one per core)

for bin in pgbouncer; do
    command -v "$bin" >/dev/null || { echo "installing $bin"; apt-get install -y -qq pgbouncer >/dev/null; }
done
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGBENCH="$PGBIN/pgbench"

. benches/lib.sh

cargo build --release --quiet
WORK=$(mktemp -d /tmp/pgpilot-bench.XXXXXX)
chmod 755 "$WORK"
DEMO_PID=""; BOUNCER_PIDS=""; PROXY_PIDS=""
cleanup() {
    for pid in $BOUNCER_PIDS $PROXY_PIDS; do kill "$pid" 2>/dev/null || true; done
    stop_demo
    rm -rf "$WORK"
}
trap cleanup EXIT

PILOT_PORT=$(free_port)
start_demo "$WORK/demo.log" --workers "$WORKERS" --listen "127.0.0.1:$PILOT_PORT" --metrics-listen "127.0.0.1:$(free_port)"
PRIMARY_PORT=$(node_port 0)
STANDBY1_PORT=$(node_port 1)
STANDBY2_PORT=$(node_port 2)

# The same proxy with read routing off, in front of the same cluster, pooling
# per session and per transaction.
start_primary_only() { # name pool_mode port [binary] [load_balance]
    proxy_config "$3" "$2" "$WORKERS" "${5:-false}" >"$WORK/$1.toml"
    PGPILOT_LOG=warn setsid "${4:-./target/release/pgpilot}" run --config "$WORK/$1.toml" >"$WORK/$1.log" 2>&1 &
    PROXY_PIDS="$PROXY_PIDS $!"
    LAST_PID=$!
}
PRIMARY_ONLY_PORT=$(free_port)
start_primary_only pgpilot-primary session "$PRIMARY_ONLY_PORT"
PRIMARY_ONLY_PID=$LAST_PID
TX_PORT=$(free_port)
start_primary_only pgpilot-tx transaction "$TX_PORT"
TX_PID=$LAST_PID
BASE_TARGETS=""
if [ -n "${BASE_BIN:-}" ]; then
    BASE_PRIMARY_PORT=$(free_port)
    start_primary_only base-primary session "$BASE_PRIMARY_PORT" "$BASE_BIN"
    BASE_PRIMARY_PID=$LAST_PID
    BASE_TX_PORT=$(free_port)
    start_primary_only base-tx transaction "$BASE_TX_PORT" "$BASE_BIN"
    BASE_TX_PID=$LAST_PID
    BASE_PORT=$(free_port)
    start_primary_only base session "$BASE_PORT" "$BASE_BIN" true
    BASE_PID=$LAST_PID
    BASE_TARGETS=" base-primary base-tx base"
fi

echo '"demo" "demo"' >"$WORK/userlist.txt"
start_bouncer() { # name pool_mode port -> starts PgBouncer in its own session
    cat >"$WORK/$1.ini" <<INI
[databases]
demo = host=127.0.0.1 port=$PRIMARY_PORT dbname=demo
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $3
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = $2
default_pool_size = $CLIENTS
max_client_conn = 200
logfile = $WORK/$1.log
pidfile = $WORK/$1.pid
${BOUNCER_EXTRA:-}
INI
    chown -R postgres "$WORK" 2>/dev/null || true
    if [ "$(id -u)" = 0 ]; then
        setsid runuser -u postgres -- pgbouncer "$WORK/$1.ini" >/dev/null 2>&1 &
    else
        setsid pgbouncer "$WORK/$1.ini" >/dev/null 2>&1 &
    fi
    BOUNCER_PIDS="$BOUNCER_PIDS $!"
}
BOUNCER_PORT=$(free_port)
SESSION_BOUNCER_PORT=$(free_port)
start_bouncer pgbouncer transaction "$BOUNCER_PORT"
start_bouncer pgbouncer-session session "$SESSION_BOUNCER_PORT"
sleep 1

export PGPASSWORD=demo
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PRIMARY_PORT" -U demo demo >/dev/null 2>&1

cpu_ticks() { # pid -> utime+stime of the process (all threads), in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}
TICK_US=$(awk -v hz="$(getconf CLK_TCK)" 'BEGIN { print 1000000 / hz }')
pg_ticks() { # CPU of every PostgreSQL process, plus what the postmasters reaped
    cat /proc/[0-9]*/stat 2>/dev/null | awk '$2 == "(postgres)" { s += $14 + $15 + $16 + $17 } END { print s + 0 }'
}

machine_ticks() { # -> "busy total steal": all CPUs, in clock ticks, from /proc/stat
    awk '/^cpu / { b = $2 + $3 + $4 + $7 + $8; t = 0; for (i = 2; i <= NF; i++) t += $i; print b, t, $9 }' /proc/stat
}

pgbench() { # name port clients
    setsid -w "$PGBENCH" $EXTRA -M "$MODE" -c "$3" -j "$THREADS" -T "$DURATION" -h 127.0.0.1 -p "$2" -U demo demo >"$WORK/$1.last" 2>&1
}
run() { # name port pid -> "tps proxy_cpu pg_cpu machine_cpu (us per transaction) steal_percent"
    local before after pg_before pg_after tps txns m_before m_after
    before=$(cpu_ticks "$3"); pg_before=$(pg_ticks); m_before=$(machine_ticks)
    if [ "$1" = direct-split ]; then # half the clients to each standby, at once
        # (pgbench ends by itself after DURATION, interrupted or not.)
        pgbench split2 "$STANDBY2_PORT" $((CLIENTS / 2)) &
        local split2=$!
        pgbench "$1" "$2" $((CLIENTS - CLIENTS / 2))
        wait "$split2"
    else
        pgbench "$1" "$2" "$CLIENTS"
    fi
    after=$(cpu_ticks "$3"); pg_after=$(pg_ticks); m_after=$(machine_ticks)
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORK/$1.last")
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORK/$1.last")
    if [ "$1" = direct-split ]; then
        grep -q "number of failed transactions: 0 " "$WORK/split2.last" || { cat "$WORK/split2.last"; return; }
        tps=$(awk -v a="$tps" -v b="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORK/split2.last")" 'BEGIN { print a + b }')
        txns=$((txns + $(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORK/split2.last")))
    fi
    awk -v t="$tps" -v n="$txns" -v d="$((after - before))" -v g="$((pg_after - pg_before))" -v u="$TICK_US" \
        -v m0="$m_before" -v m1="$m_after" 'BEGIN {
            if (t == "") exit
            split(m0, a, " "); split(m1, b, " ")
            busy = b[1] - a[1]; total = b[2] - a[2]; steal = b[3] - a[3]
            printf "%s %.2f %.2f %.2f %.1f\n", t, (n > 0 && d > 0 ? d * u / n : 0), (n > 0 ? g * u / n : 0),
                (n > 0 ? busy * u / n : 0), (total > 0 ? 100 * steal / total : 0) }'
}

bouncer_pid() { # name -> PgBouncer's own pid (for its CPU time)
    for _ in $(seq 1 50); do [ -s "$WORK/$1.pid" ] && break; sleep 0.1; done
    cat "$WORK/$1.pid" 2>/dev/null || { echo "PgBouncer ($1) did not start" >&2; cat "$WORK/$1.log" >&2; exit 1; }
}
BOUNCER_REAL_PID=$(bouncer_pid pgbouncer)
SESSION_BOUNCER_REAL_PID=$(bouncer_pid pgbouncer-session)
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# TLS=1: clients connect over TLS (sslmode=require) to pgpilot-tx-tls and to
# pgbouncer-tls, both serving the same self-signed certificate (ECDSA P-256),
# both pooling per transaction; the nodes are reached in plaintext as in the
# other runs. Interleaved rounds of select-only, then of a connect storm
# (pgbench -C). Prints each run and the median ratio to PgBouncer.
if [ "${TLS:-0}" = 1 ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
        -keyout "$WORK/tls.key" -out "$WORK/tls.pem" >/dev/null 2>&1
    chmod 600 "$WORK/tls.key"
    TLS_PILOT_PORT=$(free_port)
    { proxy_config "$TLS_PILOT_PORT" transaction "$WORKERS"
      printf '[tls]\ncert_file = "%s"\nkey_file = "%s"\n' "$WORK/tls.pem" "$WORK/tls.key"; } >"$WORK/pgpilot-tx-tls.toml"
    PGPILOT_LOG=warn setsid ./target/release/pgpilot run --config "$WORK/pgpilot-tx-tls.toml" >"$WORK/pgpilot-tx-tls.log" 2>&1 &
    PROXY_PIDS="$PROXY_PIDS $!"
    TLS_PILOT_PID=$!
    TLS_BOUNCER_PORT=$(free_port)
    chown -R postgres "$WORK" 2>/dev/null || true
    BOUNCER_EXTRA="client_tls_sslmode = require
client_tls_cert_file = $WORK/tls.pem
client_tls_key_file = $WORK/tls.key" start_bouncer pgbouncer-tls transaction "$TLS_BOUNCER_PORT"
    TLS_BOUNCER_PID=$(bouncer_pid pgbouncer-tls)
    sleep 1
    export PGSSLMODE=require
    for storm in "" "-C"; do
        label=${storm:+connect storm (-C)}; label=${label:-select-only}
        declare -A TLS_TPS=()
        for r in $(seq 1 "$ROUNDS"); do
            order="pgpilot-tx-tls pgbouncer-tls"; ((r % 2)) || order="pgbouncer-tls pgpilot-tx-tls"
            for target in $order; do
                if [ "$target" = pgbouncer-tls ]; then port=$TLS_BOUNCER_PORT; pid=$TLS_BOUNCER_PID
                else port=$TLS_PILOT_PORT; pid=$TLS_PILOT_PID; fi
                EXTRA_SAVED=$EXTRA; EXTRA="$EXTRA $storm"
                out=$(run "$target" "$port" "$pid"); EXTRA=$EXTRA_SAVED
                if [ -z "$out" ]; then echo "pgbench through $target failed:"; cat "$WORK/$target.last"; exit 1; fi
                grep -q "number of failed transactions: 0 " "$WORK/$target.last" || { echo "$target had failed transactions"; cat "$WORK/$target.last"; exit 1; }
                read -r tps cpu pg machine steal <<<"$out"
                TLS_TPS[$target]="${TLS_TPS[$target]:-} $tps"
                printf 'TLS %-22s round %d  %-15s %8.0f tps   proxy CPU %6.1f us/transaction   steal %4.1f%%\n' "$label" "$r" "$target" "$tps" "$cpu" "$steal"
            done
        done
        ratios=$(paste -d' ' <(echo "${TLS_TPS[pgpilot-tx-tls]}" | tr ' ' '\n' | grep -v '^$') \
            <(echo "${TLS_TPS[pgbouncer-tls]}" | tr ' ' '\n' | grep -v '^$') | awk '{ printf "%.3f ", $1 / $2 }')
        printf 'TLS %s: pgpilot-tx-tls %.0f tps, pgbouncer-tls %.0f tps (medians); per round x pgbouncer: %s median %s\n' \
            "$label" "$(echo "${TLS_TPS[pgpilot-tx-tls]}" | median)" "$(echo "${TLS_TPS[pgbouncer-tls]}" | median)" \
            "$ratios" "$(echo "$ratios" | median)"
    done
    exit 0
fi

# TARGETS: a subset for a longer focused run; direct and pgbouncer are the
# baselines of the ratios and always run.
TARGETS=${TARGETS:-"direct direct-split pgbouncer pgbouncer-session pgpilot-primary pgpilot-tx pgpilot$BASE_TARGETS"}
for base in pgbouncer direct; do
    case " $TARGETS " in *" $base "*) ;; *) TARGETS="$base $TARGETS" ;; esac
done
declare -A RESULTS CPU PG MACHINE STEAL
# Each round starts one target later than the last, so no target always runs
# right after the same neighbour (or in the same slot of a round).
rotate() { # round -> TARGETS rotated left by round-1
    local -a t=($TARGETS)
    local n=${#t[@]} k=$(($1 - 1)) i
    for ((i = 0; i < n; i++)); do printf '%s ' "${t[$(((i + k) % n))]}"; done
}
locate() { # target -> sets port (where pgbench connects) and pid (the proxy's; 0 = none)
    case $1 in
        direct) port=$PRIMARY_PORT; pid=0 ;;
        direct-split) port=$STANDBY1_PORT; pid=0 ;;
        pgbouncer) port=$BOUNCER_PORT; pid=$BOUNCER_REAL_PID ;;
        pgbouncer-session) port=$SESSION_BOUNCER_PORT; pid=$SESSION_BOUNCER_REAL_PID ;;
        pgpilot-primary) port=$PRIMARY_ONLY_PORT; pid=$PRIMARY_ONLY_PID ;;
        pgpilot-tx) port=$TX_PORT; pid=$TX_PID ;;
        pgpilot) port=$PILOT_PORT; pid=$DEMO_PID ;;
        base-primary) port=$BASE_PRIMARY_PORT; pid=$BASE_PRIMARY_PID ;;
        base-tx) port=$BASE_TX_PORT; pid=$BASE_TX_PID ;;
        base) port=$BASE_PORT; pid=$BASE_PID ;;
    esac
}

# RACE=1: each proxy target runs at the same time as PgBouncer, CLIENTS/2
# clients each, instead of one target after another. Both then see the same
# machine: the steal and speed swings that dominate the sequential ratios hit
# both at once. They share PostgreSQL, the bottleneck, and its throughput
# splits between them by each proxy's latency, which on a saturated machine
# follows its CPU per transaction (a proxy that needs more CPU waits longer
# for a CPU each time it wakes). Besides the TPS ratio it prints each proxy's
# CPU and run-queue wait per transaction, from the kernel's schedstat.
if [ "${RACE:-0}" = 1 ]; then
    schedstat() { # pid -> "run_ns wait_ns" over all its threads
        cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ r += $1; w += $2 } END { printf "%.0f %.0f\n", r, w }'
    }
    user_sys() { # pid -> "utime stime" of the process, in clock ticks
        awk '{print $14, $15}' "/proc/$1/stat" 2>/dev/null || echo "0 0"
    }
    txns_of() { sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORK/$1.last"; }
    declare -A RATIO RUN WAIT
    RACERS=$(for t in $TARGETS; do case $t in direct* | pgbouncer) ;; *) printf '%s ' "$t" ;; esac; done)
    locate pgbouncer; BPORT=$port; BPID=$pid
    for r in $(seq 1 "$ROUNDS"); do
        for target in $RACERS; do
            locate "$target"
            read -r br0 bw0 <<<"$(schedstat "$BPID")"; read -r tr0 tw0 <<<"$(schedstat "$pid")"
            read -r bu0 bs0 <<<"$(user_sys "$BPID")"; read -r tu0 ts0 <<<"$(user_sys "$pid")"
            # Alternate which one is launched first.
            # (`wait` on the background pgbench alone: the proxies are
            # background jobs of this script too, and never end.)
            if ((r % 2)); then
                pgbench race-pgbouncer "$BPORT" $((CLIENTS / 2)) &
                first=$!
                pgbench "race-$target" "$port" $((CLIENTS / 2))
            else
                pgbench "race-$target" "$port" $((CLIENTS / 2)) &
                first=$!
                pgbench race-pgbouncer "$BPORT" $((CLIENTS / 2))
            fi
            wait "$first"
            read -r br1 bw1 <<<"$(schedstat "$BPID")"; read -r tr1 tw1 <<<"$(schedstat "$pid")"
            read -r bu1 bs1 <<<"$(user_sys "$BPID")"; read -r tu1 ts1 <<<"$(user_sys "$pid")"
            for n in race-pgbouncer "race-$target"; do
                grep -q "number of failed transactions: 0 " "$WORK/$n.last" || { echo "$n failed"; cat "$WORK/$n.last"; exit 1; }
            done
            bn=$(txns_of race-pgbouncer); tn=$(txns_of "race-$target")
            line=$(awk -v bn="$bn" -v tn="$tn" -v br=$((br1 - br0)) -v bw=$((bw1 - bw0)) -v tr=$((tr1 - tr0)) -v tw=$((tw1 - tw0)) 'BEGIN {
                printf "%.3f %.1f %.1f %.1f %.1f", tn / bn, br / bn / 1000, bw / bn / 1000, tr / tn / 1000, tw / tn / 1000 }')
            read -r ratio brun bwait trun twait <<<"$line"
            RATIO[$target]="${RATIO[$target]:-} $ratio"
            RUN[$target]="${RUN[$target]:-} $trun"; WAIT[$target]="${WAIT[$target]:-} $twait"
            RUN[pgbouncer]="${RUN[pgbouncer]:-} $brun"; WAIT[pgbouncer]="${WAIT[pgbouncer]:-} $bwait"
            split=$(awk -v t="$TICK_US" -v bn="$bn" -v tn="$tn" -v bu=$((bu1 - bu0)) -v bs=$((bs1 - bs0)) -v tu=$((tu1 - tu0)) -v ts=$((ts1 - ts0)) 'BEGIN {
                printf "user %.1f vs %.1f, system %.1f vs %.1f", tu * t / tn, bu * t / bn, ts * t / tn, bs * t / bn }')
            printf 'round %d  %-17s %.3f x pgbouncer (%s vs %s transactions)   CPU %5.1f vs %5.1f (%s), run-queue wait %5.1f vs %5.1f us/transaction\n' \
                "$r" "$target" "$ratio" "$tn" "$bn" "$trun" "$brun" "$split" "$twait" "$bwait"
        done
    done
    echo
    echo "race: pgbench $EXTRA -M $MODE, $((CLIENTS / 2)) clients through each proxy at once, -T $DURATION, $ROUNDS rounds (median):"
    for target in $RACERS; do
        printf '  %-17s %.3f x pgbouncer   CPU %5.1f us/tx, run-queue wait %5.1f us/tx   (pgbouncer: %5.1f, %5.1f)   rounds: %s\n' "$target" \
            "$(echo "${RATIO[$target]}" | median)" "$(echo "${RUN[$target]}" | median)" "$(echo "${WAIT[$target]}" | median)" \
            "$(echo "${RUN[pgbouncer]}" | median)" "$(echo "${WAIT[pgbouncer]}" | median)" "${RATIO[$target]# }"
    done
    exit 0
fi

for r in $(seq 1 "$ROUNDS"); do
    for target in $(rotate "$r"); do
        locate "$target"
        out=$(run "$target" "$port" "$pid")
        if [ -z "$out" ]; then echo "pgbench through $target failed:"; cat "$WORK/$target.last"; exit 1; fi
        read -r tps cpu pg machine steal <<<"$out"
        grep -q "number of failed transactions: 0 " "$WORK/$target.last" || { echo "$target had failed transactions"; cat "$WORK/$target.last"; exit 1; }
        RESULTS[$target]="${RESULTS[$target]:-} $tps"
        CPU[$target]="${CPU[$target]:-} $cpu"
        PG[$target]="${PG[$target]:-} $pg"
        MACHINE[$target]="${MACHINE[$target]:-} $machine"
        STEAL[$target]="${STEAL[$target]:-} $steal"
        printf 'round %d  %-17s %8.0f tps   machine CPU %6.1f   PostgreSQL CPU %6.1f' "$r" "$target" "$tps" "$machine" "$pg"
        [ "$pid" != 0 ] && printf '   proxy CPU %5.1f' "$cpu"
        printf ' us/transaction   steal %4.1f%%\n' "$steal"
    done
done

DIRECT=$(echo "${RESULTS[direct]}" | median)
echo
echo "pgbench $EXTRA -M $MODE -c $CLIENTS -j $THREADS -T $DURATION, scale $SCALE, $ROUNDS rounds (median):"
BOUNCER=$(echo "${RESULTS[pgbouncer]}" | median)
BOUNCER_CPU=$(echo "${CPU[pgbouncer]}" | median)
for target in $TARGETS; do
    m=$(echo "${RESULTS[$target]}" | median)
    c=$(echo "${CPU[$target]}" | median)
    g=$(echo "${PG[$target]}" | median)
    w=$(echo "${MACHINE[$target]}" | median)
    awk -v t="$target" -v m="$m" -v d="$DIRECT" -v b="$BOUNCER" -v c="$c" -v bc="$BOUNCER_CPU" -v g="$g" -v w="$w" 'BEGIN {
        printf "  %-17s %8.0f tps   %.3f x direct   %.3f x pgbouncer   machine CPU %5.1f us/tx   PostgreSQL CPU %5.1f us/tx", t, m, m/d, m/b, w, g
        if (t !~ /^direct/) printf "   proxy CPU %5.1f us/tx (%.2f x pgbouncer)", c, (bc > 0 ? c/bc : 0)
        printf "\n" }'
done
# The same comparison paired by round (each target against PgBouncer's run in
# the same round), which is less sensitive to a round where the machine was slow.
per_round() { # array-name invert [max_steal] -> per target: its ratios to PgBouncer's run in the
    # same round (inverted when invert=1) and their median; with max_steal, only
    # the rounds where both runs saw at most that much steal
    local -n values=$1
    for target in $TARGETS; do
        ratios=$(paste -d' ' <(echo "${values[$target]}" | tr ' ' '\n' | grep -v '^$') \
            <(echo "${values[pgbouncer]}" | tr ' ' '\n' | grep -v '^$') \
            <(echo "${STEAL[$target]}" | tr ' ' '\n' | grep -v '^$') \
            <(echo "${STEAL[pgbouncer]}" | tr ' ' '\n' | grep -v '^$') |
            awk -v inv="$2" -v max="${3:-100}" '$3 <= max && $4 <= max { printf "%.3f ", (inv ? $2 / $1 : $1 / $2) }')
        printf '  %-17s %s  median %s\n' "$target" "${ratios:-(none)}" "$(echo "$ratios" | median)"
    done
}
echo "per round, TPS x pgbouncer (median):"
per_round RESULTS 0
# This VM's CPUs are shared: its steal time (printed per run above) swings
# between 0 and 40% from one minute to the next, and TPS with it. The whole
# machine's busy CPU per transaction (every process: pgbench, PostgreSQL, the
# proxy, the kernel; steal excluded) is, on a saturated machine, the CPU it
# actually had over the transactions done: its inverse is TPS corrected for
# steal. PgBouncer's CPU per transaction over the target's, above 1 when the
# target did more with the CPU it had.
echo "per round, transactions per CPU-second x pgbouncer (median):"
per_round MACHINE 1
# The plainest correction: only the rounds in which neither run was robbed.
echo "per round, TPS x pgbouncer, rounds where both runs saw <= ${QUIET_STEAL:=5}% steal (median):"
per_round RESULTS 0 "$QUIET_STEAL"
# Whether a difference stands out of this machine's noise: the geometric mean
# of the per-round TPS ratios with a 95% bootstrap interval. An interval that
# holds 1 means the run cannot tell the target from PgBouncer; more rounds
# narrow it (ROUNDS=15 gave about +-3% here).
echo "per round, TPS x pgbouncer: geometric mean [95% bootstrap interval], rounds above 1:"
for target in $TARGETS; do
    [ "$target" = pgbouncer ] && continue
    paste -d' ' <(echo "${RESULTS[$target]}" | tr ' ' '\n' | grep -v '^$') \
        <(echo "${RESULTS[pgbouncer]}" | tr ' ' '\n' | grep -v '^$') |
        python3 -c '
import math, random, statistics, sys
t = sys.argv[1]
r = [a / b for a, b in (map(float, l.split()) for l in sys.stdin if l.strip())]
if not r:
    sys.exit(print(f"  {t:<17} (no rounds)"))
logs = [math.log(x) for x in r]
rng = random.Random(1)
means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(10000))
lo, hi = math.exp(means[250]), math.exp(means[9749])
print(f"  {t:<17} {math.exp(statistics.fmean(logs)):.3f} [{lo:.3f}, {hi:.3f}]   {sum(x > 1 for x in r)}/{len(r)}")
' "$target"
done

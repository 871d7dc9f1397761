#!/usr/bin/env bash
# Read-your-writes benchmark (not a test): a mixed workload through pgpilot in
# each consistency mode, on one live local cluster (primary + 2 streaming
# standbys from `pgpilot demo`, loopback only):
#   writers: pgbench TPC-B-like (-N: no branch/teller contention), WRITERS clients
#   readers: pgbench -S (select-only), READERS clients, at the same time
# For each mode (eventual, session, global; ROUNDS rounds, interleaved) it prints
# writer TPS and latency, reader TPS, and the share of the select-only readers'
# statements that standbys served (from pgpilot's /metrics), then the medians
# and the ratios to eventual.
#
#   benches/consistency.sh                 # defaults: 3 rounds x 10 s, 4 writers, 12 readers
#   ROUNDS=5 DURATION=20 benches/consistency.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WRITERS=${WRITERS:-4}
READERS=${READERS:-12}
SCALE=${SCALE:-10}
MODES=${MODES:-eventual session global}

PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGBENCH="$PGBIN/pgbench"
. benches/lib.sh

cargo build --release --quiet
WORK=$(mktemp -d /tmp/pgpilot-ryw.XXXXXX)
chmod 755 "$WORK"
DEMO_PID=""; PILOT_PID=""
cleanup() {
    [ -n "$PILOT_PID" ] && kill "$PILOT_PID" 2>/dev/null || true
    stop_demo
    rm -rf "$WORK"
}
trap cleanup EXIT

DEMO_PORT=$(free_port)
start_demo "$WORK/demo.log" --listen "127.0.0.1:$DEMO_PORT" --metrics-listen ""
PORTS=("$(node_port 0)" "$(node_port 1)" "$(node_port 2)")

export PGPASSWORD=demo
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "${PORTS[0]}" -U demo demo >/dev/null 2>&1

start_pilot() { # mode -> sets PILOT_PORT, METRICS_PORT, PILOT_PID
    PILOT_PORT=$(free_port); METRICS_PORT=$(free_port)
    {
        echo "listen = \"127.0.0.1:$PILOT_PORT\""
        echo "admin_users = [\"demo\"]"
        for p in "${PORTS[@]}"; do printf '[[backends]]\nhost = "127.0.0.1"\nport = %s\n' "$p"; done
        printf '[[users]]\nname = "demo"\npassword = "demo"\n'
        printf '[monitor]\nuser = "postgres"\n'
        printf '[metrics]\nlisten = "127.0.0.1:%s"\n' "$METRICS_PORT"
        printf '[routing]\nconsistency = "%s"\n' "$1"
    } >"$WORK/pgpilot-$1.toml"
    PGPILOT_LOG=warn ./target/release/pgpilot --config "$WORK/pgpilot-$1.toml" >"$WORK/pilot-$1.log" 2>&1 &
    PILOT_PID=$!
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$METRICS_PORT/healthz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    cat "$WORK/pilot-$1.log"; exit 1
}

reads_by_standbys() { # -> "standby_reads total_reads"
    curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | awk '
        /^pgpilot_statements_routed_total\{.*kind="read"/ {
            n = $0; sub(/.*node="/, "", n); sub(/".*/, "", n)
            total += $NF; if (n != "0") standby += $NF
        }
        END { printf "%d %d\n", standby, total }'
}

declare -A W_TPS W_LAT R_TPS SHARE
for r in $(seq 1 "$ROUNDS"); do
    for mode in $MODES; do
        start_pilot "$mode"
        "$PGBENCH" -N -c "$WRITERS" -j 1 -T "$DURATION" -h 127.0.0.1 -p "$PILOT_PORT" -U demo demo >"$WORK/w.out" 2>&1 &
        WPID=$!
        "$PGBENCH" -S -c "$READERS" -j 1 -T "$DURATION" -h 127.0.0.1 -p "$PILOT_PORT" -U demo demo >"$WORK/r.out" 2>&1 || true
        wait "$WPID" || true
        for f in w r; do
            grep -q "number of failed transactions: 0 " "$WORK/$f.out" || { echo "$mode: $f failed"; cat "$WORK/$f.out"; exit 1; }
        done
        wt=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORK/w.out")
        wl=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$WORK/w.out")
        rt=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORK/r.out")
        read -r sr tr < <(reads_by_standbys)
        # pgbench -N runs one SELECT per transaction, inside it (on the primary):
        # the select-only readers' share is standby reads / (reads - writer txns).
        wn=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$WORK/w.out")
        share=$(awk -v s="$sr" -v t="$tr" -v w="$wn" 'BEGIN { r = t - w; printf "%.4f", (r > 0 ? s / r : 0) }')
        kill "$PILOT_PID"; wait "$PILOT_PID" 2>/dev/null || true; PILOT_PID=""
        W_TPS[$mode]="${W_TPS[$mode]:-} $wt"; W_LAT[$mode]="${W_LAT[$mode]:-} $wl"
        R_TPS[$mode]="${R_TPS[$mode]:-} $rt"; SHARE[$mode]="${SHARE[$mode]:-} $share"
        printf 'round %d  %-8s writers %7.0f tps %6.2f ms   readers %7.0f tps   select-only reads on standbys %5.1f%%\n' \
            "$r" "$mode" "$wt" "$wl" "$rt" "$(awk -v s="$share" 'BEGIN{print s*100}')"
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo
echo "writers: pgbench -N -c $WRITERS; readers: pgbench -S -c $READERS; ${DURATION}s, scale $SCALE, $ROUNDS rounds (median):"
BASE_W=$(echo "${W_TPS[eventual]:-1}" | median); BASE_R=$(echo "${R_TPS[eventual]:-1}" | median)
BASE_L=$(echo "${W_LAT[eventual]:-1}" | median)
for mode in $MODES; do
    wt=$(echo "${W_TPS[$mode]}" | median); wl=$(echo "${W_LAT[$mode]}" | median)
    rt=$(echo "${R_TPS[$mode]}" | median); sh=$(echo "${SHARE[$mode]}" | median)
    awk -v m="$mode" -v wt="$wt" -v wl="$wl" -v rt="$rt" -v sh="$sh" -v bw="$BASE_W" -v br="$BASE_R" -v bl="$BASE_L" 'BEGIN {
        printf "  %-8s writers %7.0f tps (%.3f x eventual), latency %.2f ms (%+.2f ms)   readers %7.0f tps (%.3f x eventual)   select-only reads on standbys %.1f%%\n",
            m, wt, wt/bw, wl, wl-bl, rt, rt/br, sh*100 }'
done

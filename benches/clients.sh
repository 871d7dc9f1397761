#!/usr/bin/env bash
# Many clients (not a test): pgpilot against Debian's PgBouncer in the same
# run, both pooling per transaction in front of `pgpilot demo`'s primary,
# both asking clients for SCRAM-SHA-256, one thread each.
#
#  1. Idle clients: for each N in NS, open N clients (each logs in and runs
#     `select 1`, then stays idle; examples/idle_clients.rs), and report the
#     pooler's RSS before, with the N clients (read IDLE_SETTLE seconds,
#     default 3, after the last one logged in: pgpilot parks clients idle
#     past pool.park_idle_after), and after they all left, the RSS per idle
#     client and the time to open them.
#  2. Connect storm: `pgbench -S -C -c 8` (a new connection per
#     transaction), ROUNDS interleaved rounds of DURATION seconds.
#  3. Many active clients: `pgbench -S -c ACTIVE` (default 1,000), 20
#     server connections per pooler, ROUNDS interleaved rounds.
# Ratios are pgpilot / PgBouncer per round; the median and the range of the
# rounds are printed.
# The heap one idle session keeps, exactly and by allocation site, is
# measured in process by `cargo bench --bench idle_session` (dhat).
#
#   benches/clients.sh                          # NS="1000 10000", 3 rounds x 10 s
#   NS="1000 10000 100000" ROUNDS=5 benches/clients.sh
#   PARTS=active ROUNDS=5 benches/clients.sh    # only part 3
#
# PARTS (default "idle storm active") picks the parts to run; "race" runs
# part 3 with half the clients through pgpilot and half through its rival
# at the same time. PILOT_BIN (default target/release/pgpilot, built here)
# and BASE_BIN (another pgpilot build, e.g. main's) choose the pgpilot
# binaries: with BASE_BIN set, the ratio parts run it too, as "base", in the
# same interleaved rounds, and "race" races pgpilot against it.
#
# N above the open-file limit (raised here to the hard limit) is skipped
# with a note: each idle client holds one descriptor in the pooler and one
# in the client process.
set -euo pipefail
cd "$(dirname "$0")/.."

NS=${NS:-"1000 10000"}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
ACTIVE=${ACTIVE:-1000}
IDLE_SETTLE=${IDLE_SETTLE:-3} # seconds idle clients wait before the RSS reading
POOL=${POOL:-20}
PARTS=${PARTS:-"idle storm active"}
PILOT_BIN=${PILOT_BIN:-./target/release/pgpilot}
BASE_BIN=${BASE_BIN:-}
has_part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

command -v pgbouncer >/dev/null || { echo "installing pgbouncer"; apt-get install -y -qq pgbouncer >/dev/null; }
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGBENCH="$PGBIN/pgbench"
ulimit -n "$(ulimit -Hn)"
FD_LIMIT=$(ulimit -n)

. benches/lib.sh

cargo build --release --quiet --bin pgpilot --example idle_clients
IDLE=./target/release/examples/idle_clients
WORK=$(mktemp -d /tmp/pgpilot-clients.XXXXXX)
chmod 755 "$WORK"
DEMO_PID=""; PIDS=""
cleanup() {
    for pid in $PIDS; do kill "$pid" 2>/dev/null || true; done
    stop_demo
    rm -rf "$WORK"
}
trap cleanup EXIT

start_demo "$WORK/demo.log" --workers 1 --listen "127.0.0.1:$(free_port)" --metrics-listen "127.0.0.1:$(free_port)"
PRIMARY_PORT=$(node_port 0)
MAX_CLIENTS=$((FD_LIMIT + ACTIVE + 100))

# start_pilot BIN PORT: a pgpilot (BIN) on PORT, transaction pooling, POOL
# server connections per node; its process id in STARTED_PID.
start_pilot() {
    {
        echo "max_client_conn = $MAX_CLIENTS"
        proxy_config "$2" transaction 1 false
        echo "max_connections_per_node = $POOL"
    } >"$WORK/pgpilot-$2.toml"
    PGPILOT_LOG=warn setsid "$1" run --config "$WORK/pgpilot-$2.toml" >"$WORK/pgpilot-$2.log" 2>&1 &
    STARTED_PID=$!
    PIDS="$PIDS $STARTED_PID"
}
PILOT_PORT=$(free_port)
start_pilot "$PILOT_BIN" "$PILOT_PORT"
PILOT_PID=$STARTED_PID
BASE_PORT=""
if [ -n "$BASE_BIN" ]; then
    BASE_PORT=$(free_port)
    start_pilot "$BASE_BIN" "$BASE_PORT"
fi

BOUNCER_PORT=$(free_port)
echo '"demo" "demo"' >"$WORK/userlist.txt"
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
default_pool_size = $POOL
max_client_conn = $MAX_CLIENTS
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
chown -R postgres "$WORK" 2>/dev/null || true
if [ "$(id -u)" = 0 ]; then
    # setpriv, not runuser: runuser's PAM session would lower the open-file
    # limit this script raised, and PgBouncer would refuse clients past it.
    setsid setpriv --reuid=postgres --regid=postgres --init-groups pgbouncer "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
else
    setsid pgbouncer "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
fi
PIDS="$PIDS $!"
for _ in $(seq 1 50); do [ -s "$WORK/pgbouncer.pid" ] && break; sleep 0.1; done
BOUNCER_PID=$(cat "$WORK/pgbouncer.pid")
PIDS="$PIDS $BOUNCER_PID"

export PGPASSWORD=demo
"$PGBENCH" -i -q -s 10 -h 127.0.0.1 -p "$PRIMARY_PORT" -U demo demo >/dev/null 2>&1
for port in "$PILOT_PORT" "$BOUNCER_PORT" $BASE_PORT; do
    for _ in $(seq 1 100); do
        "$PGBIN/psql" -qAt -h 127.0.0.1 -p "$port" -U demo -c 'select 1' demo >/dev/null 2>&1 && break
        sleep 0.1
    done
done

rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
range() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%s..%s", lo, hi}'; }

# idle NAME PORT PID N -> prints one result line
idle() {
    local name=$1 port=$2 pid=$3 n=$4 before with after opened secs
    before=$(rss_kb "$pid")
    rm -f "$WORK/hold"; mkfifo "$WORK/hold"
    "$IDLE" "$port" demo demo demo "$n" <"$WORK/hold" >"$WORK/idle.out" 2>&1 &
    local idle_pid=$!
    exec 9>"$WORK/hold"
    for _ in $(seq 1 3000); do grep -qs '^ready' "$WORK/idle.out" && break; kill -0 "$idle_pid" 2>/dev/null || break; sleep 0.1; done
    # Idle a while before the reading, past pgpilot's pool.park_idle_after
    # (1 s by default): an idle client's cost is what it keeps once parked.
    sleep "$IDLE_SETTLE"
    with=$(rss_kb "$pid")
    read -r opened secs < <(sed -n 's/^opened \([0-9]*\) in \([0-9.]*\) s.*/\1 \2/p' "$WORK/idle.out")
    exec 9>&-
    wait "$idle_pid" || true
    sleep 2 # the pooler sees every client leave
    after=$(rss_kb "$pid")
    awk -v name="$name" -v n="$n" -v o="${opened:-0}" -v s="${secs:-0}" -v b="$before" -v w="$with" -v a="$after" 'BEGIN {
        per = o > 0 ? (w - b) * 1024 / o : 0
        printf "  %-9s N=%-6d opened %6d in %6.2f s   RSS %7.1f MB before, %7.1f MB with them, %7.1f MB after   %6.2f KB per idle client\n",
            name, n, o, s, b / 1024, w / 1024, a / 1024, per / 1024
    }'
    grep -q 'errors 0' "$WORK/idle.out" || sed -n '1,2p' "$WORK/idle.out"
}

if has_part idle; then
    echo "== idle clients (SCRAM login, select 1, then idle; open-file limit $FD_LIMIT)"
    for n in $NS; do
        if [ "$n" -gt $((FD_LIMIT - 200)) ]; then
            echo "  N=$n skipped: the open-file limit here is $FD_LIMIT (raise the hard limit to run it)"
            continue
        fi
        idle pgbouncer "$BOUNCER_PORT" "$BOUNCER_PID" "$n"
        idle pgpilot "$PILOT_PORT" "$PILOT_PID" "$n"
    done
fi

# bench NAME PORT CLIENTS FLAGS -> TPS
bench() {
    setsid -w "$PGBENCH" -S $4 -c "$3" -j 2 -T "$DURATION" -h 127.0.0.1 -p "$2" -U demo demo >"$WORK/$1.last" 2>&1 || true
    sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORK/$1.last" | head -1
}

# rounds LABEL CLIENTS FLAGS: interleaved rounds, the order rotated each
# round; ratios to PgBouncer within each round.
rounds() {
    local label=$1 clients=$2 flags=$3 ratios="" base_ratios="" r t p b x names
    names="pgbouncer pgpilot"
    [ -n "$BASE_PORT" ] && names="$names base"
    for r in $(seq 1 "$ROUNDS"); do
        # rotate the order by the round number
        set -- $names
        for _ in $(seq 2 "$r"); do set -- "$@" "$1"; shift; done
        p=""; b=""; x=""
        for t in "$@"; do
            case $t in
                pgbouncer) b=$(bench pgbouncer "$BOUNCER_PORT" "$clients" "$flags") ;;
                pgpilot) p=$(bench pgpilot "$PILOT_PORT" "$clients" "$flags") ;;
                base) x=$(bench base "$BASE_PORT" "$clients" "$flags") ;;
            esac
        done
        if [ -z "$p" ] || [ -z "$b" ] || { [ -n "$BASE_PORT" ] && [ -z "$x" ]; }; then
            echo "  round $r: a run failed"
            tail -3 "$WORK/pgpilot.last" "$WORK/pgbouncer.last" 2>/dev/null
            continue
        fi
        ratio=$(awk -v p="$p" -v b="$b" 'BEGIN { printf "%.3f", p / b }')
        printf '  round %d  pgpilot %9.1f tps   pgbouncer %9.1f tps   %s x pgbouncer' "$r" "$p" "$b" "$ratio"
        ratios="$ratios $ratio"
        if [ -n "$BASE_PORT" ]; then
            xr=$(awk -v p="$x" -v b="$b" 'BEGIN { printf "%.3f", p / b }')
            printf '   base %9.1f tps   %s x pgbouncer' "$x" "$xr"
            base_ratios="$base_ratios $xr"
        fi
        echo
    done
    [ -n "$ratios" ] && printf '  %s: pgpilot median %s x pgbouncer, rounds %s\n' "$label" "$(echo "$ratios" | median)" "$(echo "$ratios" | range)"
    [ -n "$base_ratios" ] && printf '  %s: base    median %s x pgbouncer, rounds %s\n' "$label" "$(echo "$base_ratios" | median)" "$(echo "$base_ratios" | range)"
    return 0
}

# race LABEL CLIENTS FLAGS: pgpilot and a rival (BASE_BIN's pgpilot if set,
# else PgBouncer) at the same time, half the clients each, so the machine's
# swings hit both alike; ratio pgpilot / rival per round.
race() {
    local label=$1 clients=$2 flags=$3 ratios="" r p x rival rival_port
    rival=pgbouncer; rival_port=$BOUNCER_PORT
    [ -n "$BASE_PORT" ] && { rival=base; rival_port=$BASE_PORT; }
    for r in $(seq 1 "$ROUNDS"); do
        bench pgpilot "$PILOT_PORT" $((clients / 2)) "$flags" >"$WORK/p.tps" &
        local one=$!
        bench "$rival" "$rival_port" $((clients / 2)) "$flags" >"$WORK/x.tps" &
        wait "$one" $!
        p=$(cat "$WORK/p.tps"); x=$(cat "$WORK/x.tps")
        if [ -z "$p" ] || [ -z "$x" ]; then echo "  round $r: a run failed"; continue; fi
        ratio=$(awk -v p="$p" -v b="$x" 'BEGIN { printf "%.3f", p / b }')
        printf '  round %d  pgpilot %9.1f tps   %s %9.1f tps   %s x %s\n' "$r" "$p" "$rival" "$x" "$ratio" "$rival"
        ratios="$ratios $ratio"
    done
    [ -n "$ratios" ] && printf '  %s, at the same time: pgpilot median %s x %s, rounds %s\n' "$label" "$(echo "$ratios" | median)" "$rival" "$(echo "$ratios" | range)"
    return 0
}

if has_part storm; then
    echo "== connect storm: pgbench -S -C -c 8, $ROUNDS rounds x $DURATION s"
    rounds "connect storm" 8 "-C"
fi
if has_part active; then
    echo "== $ACTIVE active clients: pgbench -S -c $ACTIVE, $POOL server connections, $ROUNDS rounds x $DURATION s"
    rounds "$ACTIVE clients" "$ACTIVE" ""
fi
if has_part race; then
    echo "== $ACTIVE active clients, half through each pooler at the same time, $ROUNDS rounds x $DURATION s"
    race "$ACTIVE clients" "$ACTIVE" ""
fi

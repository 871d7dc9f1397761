# Shared by the benchmark scripts (sourced, not run): free loopback ports and
# the live cluster of `pgpilot demo` (real PostgreSQL: a primary and two
# streaming standbys in a temp dir, removed when the demo stops).

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_demo LOG [ARGS…]: run `pgpilot demo ARGS…` in a session of its own
# (so the scheduler does not group it with pgbench), its output in LOG; wait
# until it serves. Sets DEMO_PID; stop_demo ends it.
start_demo() {
    DEMO_LOG=$1
    shift
    PGPILOT_LOG=warn setsid ./target/release/pgpilot demo "$@" >"$DEMO_LOG" 2>&1 &
    DEMO_PID=$!
    for _ in $(seq 1 300); do grep -qs "pgpilot is listening" "$DEMO_LOG" && break; sleep 0.2; done
    grep -q "pgpilot is listening" "$DEMO_LOG" || { cat "$DEMO_LOG"; exit 1; }
}

# node_port N: the port of the demo's node N (0 is the primary).
node_port() { sed -n "s/.*node $1: 127\\.0\\.0\\.1:\\([0-9]*\\).*/\\1/p" "$DEMO_LOG"; }

# proxy_config PORT POOL_MODE [WORKERS] [LOAD_BALANCE]: the TOML of a pgpilot
# on PORT in front of the demo's three nodes, pooling per POOL_MODE, as the
# demo user; read routing off (everything on the primary, PgBouncer's path)
# unless LOAD_BALANCE is true (then the demo's own configuration).
proxy_config() {
    echo "listen = \"127.0.0.1:$1\""
    echo "worker_threads = ${3:-1}"
    for n in 0 1 2; do printf '[[backends]]\nhost = "127.0.0.1"\nport = %s\n' "$(node_port $n)"; done
    printf '[[users]]\nname = "demo"\npassword = "demo"\n'
    printf '[monitor]\nuser = "postgres"\n'
    printf '[metrics]\nlisten = "127.0.0.1:%s"\n' "$(free_port)"
    printf '[routing]\nload_balance = %s\n' "${4:-false}"
    printf '[pool]\nmode = "%s"\n' "$2"
}

# Stop the demo (Ctrl-C: it stops its servers and removes its files) and
# wait up to 20 s for it.
stop_demo() {
    if [ -n "${DEMO_PID:-}" ]; then
        kill -INT "$DEMO_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$DEMO_PID" 2>/dev/null || break; sleep 0.2; done
    fi
}

#!/usr/bin/env bash
# A real Flower deployment on the loopback: one SuperLink, N SuperNodes (each its own process, Flower's default
# subprocess isolation: a fresh `flwr-clientapp` process per message) and `flwr run`, R rounds of the embedded
# benchmark (the synthetic preset with N clients). Prints seconds per round (the first separately: it builds the
# node caches), the payload bytes each round moved, and the bytes that crossed the loopback (every Flower hop:
# SuperLink <-> SuperNodes and SuperNode <-> its ClientApp processes, FAB transfers included). Stops every process
# it started, also on Ctrl-C or error.
#
#   bash profiling/flower_deploy.sh [-n NODES] [-r ROUNDS] [-p BASE_PORT] [-f] [-i] [OUT_DIR] [-- EXTRA_RUN_CONFIG...]
#
# By default the deployment is secure, as a real one must be: TLS on every SuperLink connection (a throwaway CA and a
# SuperLink certificate for 127.0.0.1 from `python -m pfedmoap.flower.credentials`), SuperNode authentication (each
# SuperNode its own key pair, its public key registered with `flwr supernode register` before it starts), and `flwr`
# trusting the federation's CA. -i runs it insecure instead (plaintext, any process may join): a loopback demo only.
#
# -f also measures stock Flower's floor on the same SuperLink and SuperNodes, right after the pfedmoap run: a no-op
# App (profiling/flower_floor) whose nodes reply at once, R rounds of two phases (train + evaluate messages to every
# node) and R rounds of one phase.
#
# Node config keys can be added for every node with NODE_CONFIG_EXTRA (e.g. "worker=false" to measure the
# process-per-message cost without the node worker).
set -euo pipefail
NODES=4 ROUNDS=5 PORT=${PFEDMOAP_DEPLOY_PORT:-19091} FLOOR=0 INSECURE=0
while getopts "n:r:p:fi" opt; do
    case $opt in
    n) NODES=$OPTARG ;;
    r) ROUNDS=$OPTARG ;;
    p) PORT=$OPTARG ;;
    f) FLOOR=1 ;;
    i) INSECURE=1 ;;
    *) echo "usage: $0 [-n NODES] [-r ROUNDS] [-p BASE_PORT] [-f] [-i] [OUT_DIR] [-- EXTRA_RUN_CONFIG...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
OUT=$(mkdir -p "${1:-/tmp/pfedmoap-deploy}" && cd "${1:-/tmp/pfedmoap-deploy}" && pwd)
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
EXTRA="$*"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Flower's commands, and the commands they start by name, from the environment of $PY (activated or not)
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Flower's SuperExec looks for a new message to start a ClientApp for once a second by default (flwr 1.42)
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.05}
WORK=$(mktemp -d /tmp/pfedmoap-deploy.XXXXXX)
export FLWR_HOME=$WORK/flwr-home
mkdir -p "$FLWR_HOME" "$OUT"
rm -rf "$OUT/run" "$OUT"/*.log "$OUT"/floor-*.json
PIDS=()
cleanup() {
    for log in "$WORK"/node-*/state/worker.log; do
        [ -f "$log" ] && cp "$log" "$OUT/worker-$(basename "$(dirname "$(dirname "$log")")").log"
    done
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 1
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    # the node workers (one per SuperNode) exit with their SuperNode; wait for them, then drop the scratch space
    for _ in $(seq 50); do pgrep -f "pfedmoap.flower.node_worker.*$WORK" >/dev/null || break; sleep 0.1; done
    pkill -9 -f "pfedmoap.flower.node_worker.*$WORK" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

CREDS=$WORK/credentials
if [ "$INSECURE" = 1 ]; then
    LINK_SECURITY=(--insecure)
    CONNECTION='insecure = true'
    MODE="insecure (plaintext gRPC, any process that reaches the port may join)"
else
    "$PY" -m pfedmoap.flower.credentials "$CREDS" --nodes "$NODES" >/dev/null
    LINK_SECURITY=(--ssl-ca-certfile "$CREDS/ca.crt" --ssl-certfile "$CREDS/superlink.crt"
                   --ssl-keyfile "$CREDS/superlink.key" --enable-supernode-auth)
    CONNECTION="root-certificates = \"$CREDS/ca.crt\""
    MODE="TLS + SuperNode authentication"
fi
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink.loopback]
address = "127.0.0.1:$PORT"
$CONNECTION
EOF

# K = 9 as in the preset, or every other client with fewer than 10 nodes
EXPERTS=$((NODES - 1 < 9 ? NODES - 1 : 9))

# %.0f: awk prints sums past 2^31 in exponent form (2.3453e+09), which the report cannot parse
lo_bytes() { awk '$1 == "lo:" {printf "%.0f\n", $2 + $10}' /proc/net/dev; }

flower-superlink "${LINK_SECURITY[@]}" --host 127.0.0.1 --port "$PORT" >"$OUT/superlink.log" 2>&1 &
PIDS+=($!)
disown
for _ in $(seq 300); do (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
for k in $(seq 0 $((NODES - 1))); do
    if [ "$INSECURE" = 1 ]; then
        NODE_SECURITY=(--insecure)
    else  # only a registered public key may join
        flwr supernode register "$CREDS/node-$k.pub" loopback >>"$OUT/register.log" 2>&1 \
            || { echo "flwr supernode register failed: see $OUT/register.log" >&2; exit 1; }
        NODE_SECURITY=(--root-certificates "$CREDS/ca.crt" --auth-supernode-private-key "$CREDS/node-$k.key")
    fi
    config="partition-id=$k num-partitions=$NODES feature-cache='$WORK/node-$k/features' state-dir='$WORK/node-$k/state'"
    flower-supernode "${NODE_SECURITY[@]}" --superlink "127.0.0.1:$PORT" --port $((PORT + 10 + k)) \
        --node-config "$config${NODE_CONFIG_EXTRA:+ $NODE_CONFIG_EXTRA}" >"$OUT/supernode-$k.log" 2>&1 &
    PIDS+=($!)
    disown
done

lo0=$(lo_bytes)
t0=$(date +%s.%N)
flwr run . loopback --stream \
    --run-config "clients=$NODES experts=$EXPERTS rounds=$ROUNDS connect-timeout=120 out='$OUT/run'${EXTRA:+ $EXTRA}" \
    >"$OUT/flwr-run.log" 2>&1 || { echo "flwr run failed: see $OUT/flwr-run.log" >&2; tail -20 "$OUT/flwr-run.log" >&2; exit 1; }
t1=$(date +%s.%N)
lo1=$(lo_bytes)
for _ in $(seq 100); do [ -f "$OUT/run/summary.json" ] && break; sleep 0.2; done
if [ "$FLOOR" = 1 ]; then
    for phases in 2 1; do
        flwr run profiling/flower_floor loopback --stream \
            --run-config "phases=$phases rounds=$ROUNDS nodes=$NODES out='$OUT/floor-$phases.json'" \
            >"$OUT/flwr-floor-$phases.log" 2>&1 || { echo "the no-op floor run failed: see $OUT/flwr-floor-$phases.log" >&2; exit 1; }
        for _ in $(seq 100); do [ -f "$OUT/floor-$phases.json" ] && break; sleep 0.2; done
    done
fi

"$PY" - "$OUT" "$NODES" "$ROUNDS" "$lo0" "$lo1" "$t0" "$t1" "$MODE" <<'EOF' | tee "$OUT/deploy.txt"
import json, statistics, sys
out, nodes, rounds, lo0, lo1, t0, t1 = sys.argv[1], *map(int, sys.argv[2:6]), *map(float, sys.argv[6:8])
records = [json.loads(line) for line in open(f"{out}/run/metrics.jsonl")]
summary = json.load(open(f"{out}/run/summary.json"))
secs = [r["seconds"] for r in records]
rest = secs[1:]
print(f"flower deployment on the loopback: {nodes} SuperNodes, {len(records)} of {rounds} rounds, synthetic preset")
print(f"security: {sys.argv[8]}")
print(f"round 1 (builds the node caches): {secs[0]:.2f} s")
if rest:
    print(f"rounds 2-{len(secs)}: {statistics.mean(rest):.2f} s per round (min {min(rest):.2f}, max {max(rest):.2f})")
phase = {k: statistics.mean(r["phase_seconds"].get(k, 0.0) for r in records[1:] or records) for k in ("train", "eval")}
print(f"  of which waiting on the nodes: train {phase['train']:.2f} s, eval {phase['eval']:.2f} s")
down = statistics.mean(r["bytes_down"] for r in records)
up = statistics.mean(r["bytes_up"] for r in records)
print(f"payload per round: {down / 1e3:.1f} kB down, {up / 1e3:.1f} kB up")
print(f"loopback bytes over the whole run (every Flower hop): {(lo1 - lo0) / 1e6:.1f} MB "
      f"({(lo1 - lo0) / 1e6 / max(1, len(records)):.1f} MB per round)")
print(f"flwr run, start to end: {t1 - t0:.1f} s; final mean accuracy {summary['final_mean_acc']:.2f}%, "
      f"failed {sum(r['num_failed'] for r in records)}")
for phases in (2, 1):
    try:
        floor = json.load(open(f"{out}/floor-{phases}.json"))
    except FileNotFoundError:
        continue  # no -f
    rest = floor["seconds"][1:] or floor["seconds"]
    print(f"no-op App (stock Flower's floor), {phases} phase{'s' * (phases > 1)} per round: "
          f"{statistics.mean(rest):.2f} s per round after the first (min {min(rest):.2f}, max {max(rest):.2f})")
EOF

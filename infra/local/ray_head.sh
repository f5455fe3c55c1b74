#!/usr/bin/env bash
# Start / stop a local Ray head that accepts `ray job submit` (dashboard + jobs API on 127.0.0.1).
#   infra/local/ray_head.sh start [--num-cpus N] [--dashboard-port 8265] [--agent-port P] [--client-port P]
#   infra/local/ray_head.sh stop
# Ray 2.60 turns on token authentication by default; a local dev head runs with RAY_AUTH_MODE=disabled
# so that `ray job submit --address http://127.0.0.1:8265` works without a token. Do not do this on a
# shared cluster: there, keep token auth and export RAY_AUTH_MODE=token + the cluster's token.
set -euo pipefail
ACTION="${1:-start}"; shift || true
NUM_CPUS="$(nproc)"; DASH_PORT=8265; GCS_PORT=6379; TEMP_DIR="${RAY_TMPDIR:-/tmp/ray}"; TEMP_DIR_GIVEN=""
AGENT_PORT=""; CLIENT_PORT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-cpus) NUM_CPUS="$2"; shift 2;;
    --dashboard-port) DASH_PORT="$2"; shift 2;;
    --port) GCS_PORT="$2"; shift 2;;
    --temp-dir) TEMP_DIR="$2"; TEMP_DIR_GIVEN=1; shift 2;;
    --agent-port) AGENT_PORT="$2"; shift 2;;
    --client-port) CLIENT_PORT="$2"; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
RAY="${RAY:-$(dirname "$(readlink -f "$0")")/../../.venv/bin/ray}"
[[ -x "$RAY" ]] || RAY=ray
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
case "$ACTION" in
  start)
    # A stale ray_current_cluster file from an earlier `ray stop` makes ray.init() dial a dead head.
    rm -f "$TEMP_DIR/ray_current_cluster"
    # Ray's fixed default ports for the dashboard agent (52365, which serves the jobs API) and the client
    # server (10001) collide when several heads share a machine (concurrent test sessions): the second head's
    # agent then runs without HTTP and `ray job submit` answers "No available agent". Pick free ones.
    free_port() { "$(dirname "$RAY")/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
      || python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
    AGENT_PORT="${AGENT_PORT:-$(free_port)}"; CLIENT_PORT="${CLIENT_PORT:-$(free_port)}"
    "$RAY" start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" --num-cpus "$NUM_CPUS" \
      --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
      --dashboard-agent-listen-port "$AGENT_PORT" --ray-client-server-port "$CLIENT_PORT" \
      --temp-dir "$TEMP_DIR" --disable-usage-stats
    echo "Ray head up: RAY_ADDRESS=http://127.0.0.1:$DASH_PORT (jobs API), ray.init(address='127.0.0.1:$GCS_PORT')"
    ;;
  stop)
    if [[ -n "$TEMP_DIR_GIVEN" ]]; then
      # Stop only the head using this temp dir: `ray stop` kills every Ray instance on the machine, including
      # other users' and concurrent test sessions'. Workers exit on their own once their raylet is gone.
      gcs=$(cat "$TEMP_DIR/ray_current_cluster" 2>/dev/null || echo "no-address")  # e.g. 10.0.0.5:6379
      mine() { for p in /proc/[0-9]*; do
          [[ -r "$p/cmdline" ]] || continue
          mapfile -d '' argv < "$p/cmdline" 2>/dev/null || continue
          cmd="${argv[*]:-} "
          [[ "$cmd" == *"$TEMP_DIR/session_"* || "$cmd" == *"--temp-dir=$TEMP_DIR "* || "$cmd" == *"--address=$gcs "* ]] \
            && echo "${p#/proc/}"
        done; true; }
      pids=$(mine); [[ -n "$pids" ]] && kill -TERM $pids 2>/dev/null || true
      for _ in $(seq 20); do pids=$(mine); [[ -z "$pids" ]] && break; sleep 0.5; done
      [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
    else
      "$RAY" stop --force || true
    fi
    rm -f "$TEMP_DIR/ray_current_cluster"
    ;;
  *) echo "usage: $0 start|stop [options]" >&2; exit 2;;
esac

#!/usr/bin/env bash
# Start / stop a local Ray head that accepts `ray job submit` (dashboard + jobs API on 127.0.0.1).
#   infra/local/ray_head.sh start [--num-cpus N] [--dashboard-port 8265]
#   infra/local/ray_head.sh stop
# Ray 2.60 turns on token authentication by default; a local dev head runs with RAY_AUTH_MODE=disabled
# so that `ray job submit --address http://127.0.0.1:8265` works without a token. Do not do this on a
# shared cluster: there, keep token auth and export RAY_AUTH_MODE=token + the cluster's token.
set -euo pipefail
ACTION="${1:-start}"; shift || true
NUM_CPUS="$(nproc)"; DASH_PORT=8265; GCS_PORT=6379; TEMP_DIR="${RAY_TMPDIR:-/tmp/ray}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-cpus) NUM_CPUS="$2"; shift 2;;
    --dashboard-port) DASH_PORT="$2"; shift 2;;
    --port) GCS_PORT="$2"; shift 2;;
    --temp-dir) TEMP_DIR="$2"; shift 2;;
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
    "$RAY" start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" --num-cpus "$NUM_CPUS" \
      --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
      --temp-dir "$TEMP_DIR" --disable-usage-stats
    echo "Ray head up: RAY_ADDRESS=http://127.0.0.1:$DASH_PORT (jobs API), ray.init(address='127.0.0.1:$GCS_PORT')"
    ;;
  stop)
    "$RAY" stop --force || true
    rm -f "$TEMP_DIR/ray_current_cluster"
    ;;
  *) echo "usage: $0 start|stop [options]" >&2; exit 2;;
esac

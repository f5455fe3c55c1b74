#!/usr/bin/env bash
# A local Ray head: every port on 127.0.0.1, token auth on, `stop` stops only this head (infra/local/ray_head.py).
#   eval "$(infra/local/ray_head.sh start --num-cpus 4)"   # exports RAY_ADDRESS, RAY_API_SERVER_ADDRESS, token
#   ray job submit --working-dir . -- python jobs/embed_cc3m.py ...
#   infra/local/ray_head.sh stop
# Options: --port (GCS, 6379) --dashboard-port (8265) --temp-dir (RAY_TMPDIR or /tmp/clipcap-ray-<uid>)
# --agent-port --client-port --node-ip-address; --no-auth opts out of token auth (never on a shared host).
# Runs with the project's virtualenv (PYTHON, else ./.venv, else python3 on PATH), so the head's workers have
# torch and the project's dependencies.
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
# ROOT first on sys.path, ahead of the current directory (which may hold another checkout's `infra`).
exec "$PY" -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from infra.local.ray_head import main; sys.exit(main(sys.argv[1:]))' "$ROOT" "$@"

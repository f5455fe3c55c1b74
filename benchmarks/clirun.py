"""Run the ``clipcap`` CLI the way a user runs it, for the benchmarks: a new process started from the checkout,
with its own local Ray (``RAY_ADDRESS`` dropped), timed from process start to exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def clipcap_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "-v", *args]  # -v: Ray's and our log lines on stderr


def user_env() -> dict[str, str]:
    """This process's environment without ``RAY_ADDRESS``: the job starts its own local Ray, as a user's would."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def run_clipcap(*args: str) -> tuple[float, dict[str, Any], str, list[str]]:
    """``clipcap ARGS`` to completion: (wall seconds, the JSON report it prints last on stdout, its stderr, the
    command). A non-zero exit raises with the tail of stderr."""
    cmd = clipcap_command(*args)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=user_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"clipcap {args[0]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    report = json.loads("\n".join(lines[next(i for i, x in enumerate(lines) if x.startswith("{")):]))
    return wall, report, proc.stderr, cmd

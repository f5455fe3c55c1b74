"""The fault harness's node kill on a stand-in node (no Ray cluster): a "raylet" process with worker processes
below it, and one of theirs. Runs in ``make test`` (not marked ``faults``): it takes a second."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

from tests.faults.cluster_driver import _descendants, _process_start, freeze_and_kill

# a "raylet" that starts two "workers"; the first starts a child of its own; each prints its pid and sleeps
_TREE = """
import subprocess, sys, time
sleeper = "import os, time; print(os.getpid(), flush=True); time.sleep(120)"
spawner = "import os, subprocess, sys, time; print(os.getpid(), flush=True); " \\
          "subprocess.Popen([sys.executable, '-c', %r]); time.sleep(120)" % sleeper
for code in (spawner, sleeper):
    subprocess.Popen([sys.executable, "-c", code])
time.sleep(120)
"""


def test_freeze_and_kill_takes_down_the_raylet_and_every_process_below_it():
    raylet = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True)
    pids = [int(raylet.stdout.readline()) for _ in range(3)]  # two workers and the grandchild
    node = SimpleNamespace(all_processes={"raylet": [SimpleNamespace(process=raylet)]})
    deadline = time.monotonic() + 30
    while len(_descendants(raylet.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = {pid: _process_start(pid) for pid in pids}
    try:
        killed = freeze_and_kill(node)
        raylet.wait(timeout=10)
        assert killed["raylet"] == [raylet.pid] and killed["node"] == [raylet.pid]
        assert sorted(pids) == killed["workers"]
        deadline = time.monotonic() + 10
        while any(_process_start(p) == started[p] for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in pids if _process_start(p) == started[p]] == []  # none of them runs any more
    finally:
        raylet.kill()
        for pid in pids:  # only our own processes: the same pid and start time
            if _process_start(pid) == started[pid]:
                os.kill(pid, signal.SIGKILL)

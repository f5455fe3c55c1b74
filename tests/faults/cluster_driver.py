"""Runs a fault driver script (``node_kill_*.py``) in its own process, with its own multi-node Ray cluster
(test helper, not a test module).

Ray's Unix sockets live under ``$RAY_TMPDIR/ray/session_<date>_<pid>/sockets/``, and a socket path may not exceed
107 bytes: pytest's ``tmp_path`` is too deep for that, so the cluster gets a short ``/tmp/cf*`` folder of its own.
The driver runs in a new session (process group); whatever it leaves behind (a raylet, a worker, after a timeout
or a crash) is found by that folder in its command line or environment and killed by PID, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _pids_using(marker: str) -> list[int]:
    """PIDs of processes whose command line or environment names ``marker`` (our own temp folder)."""
    me, found = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            blob = (d / "cmdline").read_bytes() + (d / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            found.append(int(d.name))
    return found


def _kill_leftovers(marker: str) -> list[int]:
    pids = _pids_using(marker)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return pids


@contextlib.contextmanager
def short_ray_tmp():
    """A short ``/tmp/cf*`` folder for ``RAY_TMPDIR``; afterwards every process still naming it is killed (by
    PID) and the folder removed. Yields (folder, list that receives the PIDs killed)."""
    ray_tmp, killed = tempfile.mkdtemp(prefix="cf", dir="/tmp"), []
    try:
        yield ray_tmp, killed
    finally:
        killed += _kill_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def run_driver(script: str, args: list[str], *, env: dict[str, str] | None = None,
               timeout: float = 600) -> tuple[dict[str, Any], str]:
    """Run ``tests/faults/<script>`` with ``args``; returns its ``FAULT-RESULT`` JSON and its output tail.

    Fails (AssertionError with the output tail) on a non-zero exit, a timeout or a missing result line."""
    t0, load0 = time.monotonic(), os.getloadavg()[0]
    with short_ray_tmp() as (ray_tmp, left):
        full_env = dict(os.environ, **(env or {}), RAY_TMPDIR=ray_tmp, PYTHONPATH=str(ROOT),
                        RAY_USAGE_STATS_ENABLED="0")
        full_env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests/faults" / script), *args], cwd=ROOT,
                                env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n[cluster_driver] timed out after {timeout:.0f}s"
    load = f"load average {load0:.0f} -> {os.getloadavg()[0]:.0f} on {os.cpu_count()} CPUs"
    tail = f"[cluster_driver] {load}\n" + out[-6000:] + (f"\n[cluster_driver] killed {len(left)} leftover process(es)" if left else "")
    line = next((x for x in out.splitlines() if x.startswith("FAULT-RESULT ")), None)
    assert proc.returncode == 0 and line, tail
    report = json.loads(line.removeprefix("FAULT-RESULT "))
    report["driver_wall_s"] = round(time.monotonic() - t0, 1)
    report["load"] = load  # the wall time means little without it on a shared machine
    report["cluster_start_retries"] = out.count("[cluster_driver] cluster start attempt")
    return report, tail


# --- used inside the driver scripts ---------------------------------------------------------------------------
def start_cluster(worker_cpus: float = 1, workers: int = 2, attempts: int = 3):
    """A head without CPUs (the driver's node: nothing schedulable runs there) + ``workers`` worker nodes, each
    its own raylet, object store and resources (``ray.cluster_utils.Cluster``); the driver is connected.

    Ray gives a starting node 30 s (hard-coded) to register with the GCS; on a loaded 2-core machine a raylet
    started under ``nice`` can miss that. A failed start is torn down (every process of this driver's
    ``RAY_TMPDIR`` but the driver, by PID) and retried, up to ``attempts`` times."""
    import ray
    from ray.cluster_utils import Cluster

    store = 80 * 2**20  # per node; Ray's default (30% of RAM each) would reserve /dev/shm three times over
    for attempt in range(1, attempts + 1):
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store,
                                                                  "include_dashboard": False})
            nodes = [cluster.add_node(num_cpus=worker_cpus, object_store_memory=store) for _ in range(workers)]
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
            return cluster, nodes
        except Exception as exc:  # noqa: BLE001 - start-up timeouts under load: start again from scratch
            if attempt == attempts:
                raise
            print(f"[cluster_driver] cluster start attempt {attempt} failed: {exc!s:.200}", flush=True)
            with contextlib.suppress(Exception):
                ray.shutdown()
            _kill_leftovers(os.environ["RAY_TMPDIR"])
            ray._common.utils.reset_ray_address()
            ray._private.services.find_gcs_addresses.cache_clear()
    raise AssertionError("unreachable")


def actor_processes(class_name: str) -> list[dict[str, Any]]:
    """The live actors of ``class_name`` (e.g. Ray Train's ``RayTrainWorker``), each as its process id and node
    id, from the GCS actor table (where each actor's worker process reports both)."""
    import ray._private.state as state

    return [{"pid": int(a["Pid"]), "node": a["Address"]["NodeID"]}
            for a in state.actors(actor_state_name="ALIVE").values() if a["ActorClassName"] == class_name]


def _process_start(pid: int) -> int | None:
    """The start time (clock ticks after boot) of process ``pid``; ``None`` if there is no such live process (a
    zombie counts as gone: it runs nothing). Start time + pid names one process, whatever pid reuse does."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return None if fields[0] in "ZX" else int(fields[19])


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree (a raylet's workers, and anything they started)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
        except OSError:
            continue
        ppid = int(status.split("\nPPid:\t", 1)[1].split("\n", 1)[0])
        children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _signal(pids, sig) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def freeze_and_kill(node) -> dict[str, list[int]]:
    """Take a ``Cluster`` worker node down at one instant, as a machine loss does: SIGSTOP its raylet and every
    process below it (its worker processes), then SIGKILL them all. The caller then calls ``Cluster.remove_node``
    for the cluster's own bookkeeping (``NodeKiller`` does).

    ``remove_node`` alone SIGKILLs only the node's own processes (the raylet): the worker processes it started
    live on until each notices its raylet is gone (up to ~1 s on this VM), and Ray Train workers went on training
    and reporting checkpoints meanwhile (steps 4 to 12 in one run). Returns the pids: ``raylet``, ``node`` (the
    raylet and the node's other processes), ``workers`` (every process below the raylet)."""
    own = [p.process.pid for procs in node.all_processes.values() for p in procs]
    raylet = _raylet_pid(node)
    stopped: set[int] = set()
    while True:  # a process may start a child between the scan and its SIGSTOP: scan again until none new
        new = [p for p in [*own, *_descendants(raylet)] if p not in stopped]
        if not new:
            break
        _signal(new, signal.SIGSTOP)
        stopped.update(new)
    _signal(stopped, signal.SIGKILL)
    return {"node": sorted(own), "workers": sorted(stopped - set(own)), "raylet": [raylet]}


class NodeKiller:
    """Background thread: once ``ready()`` is true, takes down (``freeze_and_kill``: the raylet and every process
    below it, SIGKILL, no grace) the worker node with the most CPU in use at that moment (so the kill hits running
    work, not an idle node), or, with ``targets`` (a function returning the processes the kill must end, as
    ``actor_processes`` does), the busiest node hosting one of them (CPU in use alone may pick the node running
    only a data task).

    ``info`` records what happened: the node, the targets and where each ran, the pids SIGKILLed, ``probe()`` at
    the kill and once the node's processes are gone, and which of them still ran ``gone_wait_s`` after it
    (``survivors``; ``targets_survived``, the targets among them): a kill that left one running was no kill."""

    def __init__(self, cluster, nodes, ready, *, poll_s: float = 0.1, probe=None, targets=None,
                 gone_wait_s: float = 30.0):
        import threading

        self.cluster, self.nodes, self.ready, self.poll_s = cluster, nodes, ready, poll_s
        self.targets, self.gone_wait_s = targets, gone_wait_s
        self.probe = probe or (lambda: None)  # recorded at the kill (e.g. the units committed so far)
        self.info: dict[str, Any] = {"killed": False}
        self.done = threading.Event()
        self.fired = threading.Event()  # set once the node is removed (or the killer stopped)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> NodeKiller:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _pick(self):
        """(node to kill, its CPU in use, the targets living on it)."""
        import ray._private.state as state

        avail = state.available_resources_per_node()
        total = state.total_resources_per_node()

        def used(node) -> float:
            nid = node.node_id
            return total.get(nid, {}).get("CPU", 0.0) - avail.get(nid, {}).get("CPU", 0.0)

        targets: list[dict[str, Any]] = []
        if self.targets:
            try:
                targets = self.targets()
            except Exception as exc:  # noqa: BLE001 - recorded; the test sees no target on the killed node
                self.info["targets_error"] = repr(exc)
        hosts = {t["node"] for t in targets}
        node = max([n for n in self.nodes if n.node_id in hosts] or self.nodes, key=used)
        self.info["nodes_cpu_in_use"] = {n.node_id[:8]: used(n) for n in self.nodes}
        if self.targets:
            self.info["targets_at_kill"] = [{"pid": t["pid"], "node": t["node"][:8]} for t in targets]
        return node, used(node), [t for t in targets if t["node"] == node.node_id]

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                ready = self.ready()
            except Exception:  # noqa: BLE001 - e.g. the output folder does not exist yet
                ready = False
            if ready:
                try:
                    self._kill()
                except Exception as exc:  # noqa: BLE001 - recorded: the test fails on "killed" and names it
                    self.info["kill_error"] = repr(exc)
                    self.fired.set()
                return
            time.sleep(self.poll_s)

    def _kill(self) -> None:
        node, used, on_node = self._pick()
        self.info.update(probe_at_kill=self.probe(), cpu_in_use_on_killed_node=used,
                         at_s=round(time.monotonic() - self._t0, 1), node=node.node_id[:8],
                         targets_on_node=sorted(t["pid"] for t in on_node))
        raylet = _raylet_pid(node)
        watched = {pid: _process_start(pid) for pid in {raylet, *_descendants(raylet), *(t["pid"] for t in on_node)}}
        pids = freeze_and_kill(node)
        self.cluster.remove_node(node, allow_graceful=False)
        self.info["killed"] = not self.done.is_set()  # the job was still running after the kill
        self.info.update(raylet_pid=pids["raylet"][0], sigkilled_node_pids=pids["node"],
                         sigkilled_worker_pids=pids["workers"])
        self.fired.set()
        t0, alive = time.monotonic(), {pid: st for pid, st in watched.items() if st is not None}
        while alive and time.monotonic() - t0 < self.gone_wait_s:
            alive = {pid: st for pid, st in alive.items() if _process_start(pid) == st}
            if alive:
                time.sleep(0.1)
        self.info.update(survivors=sorted(alive), gone_within_s=round(time.monotonic() - t0, 1),
                         probe_when_gone=self.probe(),
                         targets_survived=sorted(set(alive) & {t["pid"] for t in on_node}))

    def stop(self) -> dict[str, Any]:
        self.done.set()
        self.fired.set()
        self._thread.join(timeout=60 + self.gone_wait_s)
        return self.info


def _raylet_pid(node) -> int:
    import ray._private.ray_constants as constants

    return node.all_processes[constants.PROCESS_TYPE_RAYLET][0].process.pid


@contextlib.contextmanager
def hold_driver_until_kill(killer: NodeKiller, units: int = 1, wait_s: float = 120.0):
    """Make the kill part of the job's timeline: once the driver has committed ``units`` units, its committer
    waits (up to ``wait_s``) until ``killer`` has removed a node. Meanwhile Ray's tasks and actors go on with the
    other units, so the kill always lands mid-job, with units left to do, whatever the machine's speed (a fast
    job could otherwise commit every unit before the killer's next poll)."""
    from pipelines.committer import UnitCommitter

    settle = UnitCommitter._settle

    def held(self, unit, rows):
        result = settle(self, unit, rows)
        if len(self.committed) >= units and not killer.fired.is_set():
            killer.info["driver_held_s"] = round(_timed_wait(killer.fired, wait_s), 1)
        return result

    UnitCommitter._settle = held
    try:
        yield
    finally:
        UnitCommitter._settle = settle


def _timed_wait(event, wait_s: float) -> float:
    t0 = time.monotonic()
    event.wait(wait_s)
    return time.monotonic() - t0


def alive_nodes(expect: int | None = None, wait_s: float = 90.0) -> int:
    """Alive nodes; with ``expect``, wait up to ``wait_s`` for the count to drop to it: GCS marks a killed node
    dead only after its health checks fail, and a short job (caption: ~30 s) can finish first."""
    import ray

    deadline = time.monotonic() + (wait_s if expect is not None else 0.0)
    while True:
        alive = sum(1 for n in ray.nodes() if n["Alive"])
        if expect is None or alive <= expect or time.monotonic() >= deadline:
            return alive
        time.sleep(1.0)


def run_until_done(job: Callable[[], Any], summarize: Callable[[Any], dict[str, Any]],
                   done: Callable[[Any], bool], attempts: int = 3) -> tuple[int, str | None, list[dict[str, Any]]]:
    """Run ``job`` until ``done(result)`` (at most ``attempts`` runs; a lost node may fail a run and the next run
    resumes). Returns (runs, the first run error as text or None, ``summarize(result)`` of each finished run)."""
    runs, first_error, results = 0, None, []
    for _ in range(attempts):
        runs += 1
        try:
            result = job()
        except Exception as exc:  # noqa: BLE001 - a lost node may fail the run: the next run resumes
            first_error = first_error or f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        results.append(summarize(result))
        if done(result):
            break
    return runs, first_error, results

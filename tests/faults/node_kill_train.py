"""Run by ``test_node_faults.py`` in its own process: ``run_training`` with Ray Train (2 workers) on a real 3-node
Ray cluster (``cluster_driver.start_cluster``); once Ray Train has registered its first checkpoint, the worker node
of a training worker is taken down at one instant (``cluster_driver.freeze_and_kill``: its raylet and every worker
process on it SIGKILLed). Ray Train restarts the worker group from the latest registered checkpoint
(``max_failures``); if the run fails instead, a rerun with the same output + name resumes from it. Worker nodes
have 2 logical CPUs so that the survivor alone fits both training workers (0.5 CPU each) and the 1-CPU read task
of the data stream. Prints one JSON line: runs, the kill, the resumes, the final step and how many training
worker actors the job created (2 per attempt: a restart from scratch leaves no resume row, but 4 actors).

"Registered", not "in storage": rank 0 writes ``checkpoint_<step>/`` to storage inside ``ray.train.report``, and
Ray Train's controller registers it (its ``checkpoint_manager_snapshot.json`` names it) only when it next polls the
workers. A node lost in between leaves Ray Train no checkpoint: it restarts from scratch, a correct recovery with
nothing to resume from. ``--kill-when unregistered`` kills in that window, to show it.

    python tests/faults/node_kill_train.py <tables dir> <output dir> [--kill-when registered|unregistered]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(tables_dir: str, out: str, kill_when: str = "registered") -> int:
    import ray
    import ray._private.state as ray_state

    from clipcap_core.training import TrainConfig
    from pipelines.io import storage
    from pipelines.train import checkpoints as train_checkpoints
    from pipelines.train import job as train
    from pipelines.train import state as train_state
    from tests.faults.cluster_driver import (
        NodeKiller,
        actor_processes,
        alive_nodes,
        run_until_done,
        start_cluster,
    )

    cluster, nodes = start_cluster(worker_cpus=2)
    try:
        job = train.TrainJobConfig(
            tables=(tables_dir,), output=out, name="nodekill",
            train=TrainConfig(epochs=2, batch_size=16, lr=1e-2, warmup_steps=5, max_caption_tokens=16),
            run=train_state.RunOptions(checkpoint_every=4, log_every=4, max_failures=2, keep_checkpoints=2,
                                       eval_max_samples=32),
            scale=train_state.ScaleConfig(num_workers=2, cpus_per_worker=0.5, torch_threads=1))
        plan = train.plan_training(job)

        def stored() -> int:  # the latest checkpoint step in storage (0: none yet)
            return max(train_checkpoints.stored_checkpoint_steps(job.run_dir), default=0)

        def registered() -> int:  # the latest checkpoint step Ray Train's controller registered (0: none yet)
            snap = storage.read_json(storage.join(job.run_dir, "checkpoint_manager_snapshot.json")) or {}
            name = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or ""
            return int(name.rpartition("_")[2]) if name.startswith("checkpoint_") else 0

        ready = {"registered": lambda: registered() > 0,
                 "unregistered": lambda: stored() > 0 and registered() == 0}[kill_when]
        killer = NodeKiller(cluster, nodes, ready, poll_s=0.05,
                            probe=lambda: {"stored": stored(), "registered": registered()},
                            targets=lambda: actor_processes("RayTrainWorker")).start()
        runs, first_error, finished = run_until_done(lambda: train.run_training(job), lambda r: r, lambda r: True)
        result = finished[-1] if finished else None
        kill = killer.stop()
        history = result.history if result else (storage.read_json(storage.join(job.run_dir, "history.json")) or [])
        config = storage.read_json(storage.join(job.run_dir, "model/config.json")) if result else None
        print("FAULT-RESULT " + json.dumps({
            "runs": runs, "kill": kill, "first_error": first_error, "total_steps": plan.total_steps,
            "resumes": [r for r in history if r["kind"] == "resume"],
            "epochs": [r["step"] for r in history if r["kind"] == "epoch"],
            "steps_logged": [r["step"] for r in history if r["kind"] == "step"],
            "artifact_step": (config or {}).get("training", {}).get("step"),
            "train_worker_actors": sum(1 for a in ray_state.actors().values()
                                       if a["ActorClassName"] == "RayTrainWorker"),
            "nodes_alive": alive_nodes(expect=2)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("tables_dir")
    parser.add_argument("out")
    parser.add_argument("--kill-when", choices=("registered", "unregistered"), default="registered")
    a = parser.parse_args()
    sys.exit(main(a.tables_dir, a.out, a.kill_when))

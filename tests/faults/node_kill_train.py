"""Run by ``test_node_faults.py`` in its own process: ``run_training`` with Ray Train (2 workers) on a real 3-node
Ray cluster (``cluster_driver.start_cluster``), the worker node of a training worker removed (raylet + every
worker process on it SIGKILLed) once the first checkpoint is stored. Ray Train restarts the worker group from the latest checkpoint
(``max_failures``); if the run fails instead, a rerun with the same output + name resumes from it. Worker nodes
have 2 logical CPUs so that the survivor alone fits both training workers (0.5 CPU each) and the 1-CPU read task
of the data stream. Prints one JSON line: runs, the kill, the resumes and the final step.

    python tests/faults/node_kill_train.py <tables dir> <output dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipelines.train import state as train_state

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(tables_dir: str, out: str) -> int:
    import ray

    from clipcap_core.training import TrainConfig
    from pipelines.io import storage
    from pipelines.train import checkpoints as train_checkpoints
    from pipelines.train import job as train
    from tests.faults.cluster_driver import (
        NodeKiller,
        alive_nodes,
        placement_group_nodes,
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

        killer = NodeKiller(cluster, nodes, lambda: stored() > 0, poll_s=0.05, probe=stored,
                            hosts=placement_group_nodes).start()
        runs, first_error, finished = run_until_done(lambda: train.run_training(job), lambda r: r, lambda r: True)
        result = finished[-1] if finished else None
        kill = killer.stop()
        history = result.history if result else (storage.read_json(storage.join(job.run_dir, "history.json")) or [])
        steps = [r["step"] for r in history if r["kind"] == "step"]
        config = storage.read_json(storage.join(job.run_dir, "model/config.json")) if result else None
        print("FAULT-RESULT " + json.dumps({
            "runs": runs, "kill": kill, "first_error": first_error, "total_steps": plan.total_steps,
            "resumes": [r for r in history if r["kind"] == "resume"],
            "epochs": [r["step"] for r in history if r["kind"] == "epoch"],
            "steps_logged": steps, "artifact_step": (config or {}).get("training", {}).get("step"),
            "nodes_alive": alive_nodes(expect=2)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

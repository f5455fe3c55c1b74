"""Driver side shared by ``clipcap train`` and ``train-clip``: size the workers from the cluster, run the
``TorchTrainer`` over a job's worker loop, then write the run's history files.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
from collections.abc import Callable
from typing import Any, Protocol
from unittest import mock

import ray
import ray.train
from ray.train.torch import TorchTrainer

from clipcap_core.configs import to_dict
from pipelines import console, runtime
from pipelines.io import storage
from pipelines.runtime import ClusterShape
from pipelines.train.state import RunOptions, ScaleConfig, StepPlan
from pipelines.train.steps import Board

log = logging.getLogger(__name__)


class TrainJob(Protocol):
    """What ``fit_workers`` reads of a job config (``TrainJobConfig``, ``ClipTrainJobConfig``)."""

    name: str
    output: str
    run: RunOptions
    scale: ScaleConfig

    @property
    def run_dir(self) -> str: ...


def size_workers(scale: ScaleConfig, cluster: ClusterShape) -> ScaleConfig:
    """``scale`` with its ``None`` / 0 knobs sized from ``cluster`` (explicit values kept: an autoscaler adds
    nodes). GPU: one per worker when there is one for each. CPU: each node's cores less one, as threads and
    reservation; the spare core runs the data tasks (with every core reserved the stream never starts)."""
    workers, use_gpu = scale.num_workers, scale.use_gpu
    if use_gpu is None:
        use_gpu = cluster.gpus > 0 and cluster.gpus >= workers * scale.gpus_per_worker
        if cluster.gpus > 0 and not use_gpu:
            log.warning("train: %d worker(s) x %g GPU do not fit the cluster's %g GPU: training on CPU (--workers "
                        "%d trains on the GPUs; --gpu asks for them anyway)", workers, scale.gpus_per_worker,
                        cluster.gpus, int(cluster.gpus // scale.gpus_per_worker))
    if use_gpu:
        return dataclasses.replace(scale, use_gpu=True, cpus_per_worker=scale.cpus_per_worker or 1.0)
    node = max(1, int(min(cluster.node_cpus or (cluster.cpus,))))
    per_node = math.ceil(workers / max(1, len(cluster.node_cpus)))
    cpus = scale.cpus_per_worker or max(0.25, (node - 1) / per_node)
    return dataclasses.replace(scale, use_gpu=False, cpus_per_worker=cpus,
                               torch_threads=scale.torch_threads or max(1, (node - 1) // per_node))


def describe_workers(scale: ScaleConfig, cluster: ClusterShape) -> str:
    """The one line a training job logs about its resources."""
    device = f"{scale.gpus_per_worker:g} GPU" if scale.use_gpu else "CPU"
    threads = f"{scale.torch_threads} torch thread(s)" if scale.torch_threads else "Ray's default torch threads"
    return (f"train resources: {scale.num_workers} worker(s) on {device}, {scale.cpus_per_worker:g} CPU reserved "
            f"and {threads} each; cluster {cluster.cpus:g} CPU / {cluster.gpus:g} GPU on "
            f"{len(cluster.node_cpus)} node(s)")


def fit_workers(loop: Callable[[dict[str, Any]], Any], job: TrainJob, plan: StepPlan,
                datasets: dict[str, Any] | None, what: str = "train") -> dict[str, Any]:
    """Run ``loop`` on Ray Train workers with config ``{"job", "plan", "progress"}`` (job and plan as
    ``configs.to_dict``, progress the run's ``Board``); rank 0's return value, its history written."""
    runtime.ensure_ray(None, log_to_driver=True)  # the workers' lines, for the job log
    cluster = ClusterShape.from_ray()
    scale = size_workers(job.scale, cluster)
    log.info(describe_workers(scale, cluster))
    job = dataclasses.replace(job, scale=scale)  # type: ignore[type-var]  # the workers read the sized scale
    board = ray.remote(num_cpus=0)(Board).remote()

    def read() -> tuple[int, int, int, str] | None:
        row = ray.get(board.read.remote(), timeout=10)
        return (int(row["step"]), int(row["samples"]), 0, f"loss {row['loss']:.4f}") if row else None

    trainer = TorchTrainer(
        loop, train_loop_config={"job": to_dict(job), "plan": to_dict(plan), "progress": board},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scale.num_workers, use_gpu=scale.use_gpu,
            resources_per_worker={"CPU": scale.cpus_per_worker,
                                  **({"GPU": scale.gpus_per_worker} if scale.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=job.output,
            failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.keep_checkpoints)),
        datasets=datasets,
    )
    progress = console.Progress(what, plan.total_steps, unit="steps", rows="samples", count_errors=False)
    # Ray Train copies this variable from the driver into its controller actor when ``fit`` starts
    poll = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(job.run.poll_interval_s)}
    with mock.patch.dict(os.environ, poll), console.watch(progress, read):
        result = trainer.fit()
    ray.kill(board)
    if result.error:
        raise result.error
    out = dict(result.return_value or {})
    out["history"] = out.get("history", [])
    write_history(out["history"], job.run_dir)
    return out


# --- metrics history ------------------------------------------------------------------------------------
def write_history(history: list[dict[str, Any]], run_dir: str) -> None:
    """``history.json``, ``history.csv`` and ``loss_curve.png`` under ``run_dir``."""
    storage.write_json(history, storage.join(run_dir, "history.json"))
    lead = ["kind", "step", "epoch", "attempt"]
    columns = [c for c in lead if any(c in r for r in history)]
    columns += sorted({k for row in history for k in row} - set(lead))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    storage.write_file(storage.join(run_dir, "history.csv"), buf.getvalue())
    storage.write_file(storage.join(run_dir, "loss_curve.png"), plot_history(history))


def plot_history(history: list[dict[str, Any]]) -> bytes:
    """A PNG of train loss per step and held-out loss per epoch (bytes)."""
    # lazy: matplotlib.pyplot ~1.1 s to import (python -X importtime)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [(r["step"], r["train_loss"]) for r in history if r.get("kind") == "step"]
    evals = [(r["step"], r["val_loss"]) for r in history if r.get("kind") == "epoch" and "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if steps:
        ax.plot(*zip(*steps, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if steps or evals:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()

"""The Ray Train job: ClipCap mapping network (+ LM when tuned) from embedding tables, on 1 CPU or N GPUs.

    result = run_training(TrainJobConfig(tables=("s3://b/embeddings/cc3m/ViT-B-32-openai",), output="s3://b/runs",
                                         name="cc3m-mlp", model="clipcap-mlp", scale=ScaleConfig(num_workers=4)))

Data: the tables stream through Ray Data (``tables.stream_tables``: key-hash held-out split and tokenisation
in the pipeline, padded to ``max_caption_tokens``), one stream over all epochs (file order reshuffled per
epoch); each worker reads its ``get_dataset_shard("train")``, with the first batch requested while the model
is still being built, and trims every batch to its longest caption (per-batch padding). D comes from the tables' schema/metadata; a model
whose ``clip_dim`` differs is an error raised on the driver before any worker starts.

Output layout, ``<output>/<name>/``: Ray's checkpoints (``checkpoint_*``, every ``checkpoint_every`` steps
and each epoch), ``model/`` (the final artifact), ``history.json`` / ``history.csv`` (every logged step
and epoch: losses, samples/s, held-out metrics, attempt) and ``loss_curve.png``.

Fault tolerance: a worker that dies is replaced and the group restarts from the latest checkpoint
(``max_failures``); re-running with the same output + name resumes from it too. The checkpoint holds model,
optimizer, scheduler, step, position in the epoch and the history, so no step count is ever lost.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from clipcap_core.configs import to_dict
from clipcap_core.training import TrainConfig
from pipelines import decap_train, storage, tables
from pipelines.decap_train import DecapOptions
from pipelines.train_loop import (
    BatchTokenizer,
    RunOptions,
    evaluate_model,
    load_tokenizer_for,
    resolve_model_config,
    train_loop,
)

log = logging.getLogger(__name__)

__all__ = ["FaultConfig", "RunOptions", "ScaleConfig", "TrainConfig", "TrainJobConfig", "TrainResult",
           "evaluate_artifact", "run_training"]


@dataclass(frozen=True, kw_only=True)
class ScaleConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu
    torch_threads: int = 0  # 0: Ray's default (OMP_NUM_THREADS = CPUs per worker)


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Test hook: worker ``rank`` exits hard (``os._exit``) once when it reaches ``crash_at_step``.

    ``marker`` (a URI) is written just before the exit; when it exists the crash does not happen again, so
    the restarted group runs through."""

    crash_at_step: int
    marker: str
    rank: int = 0


@dataclass(frozen=True, kw_only=True)
class TrainJobConfig:
    tables: tuple[str, ...]  # embedding table folders or files
    output: str  # storage root; the run lives in <output>/<name>/
    name: str = "clipcap"
    model: str = "tiny"  # preset name (new model) or model artifact URI (warm start)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # dotted ModelConfig keys, presets only
    replay_tables: tuple[str, ...] = ()  # older tables sampled at replay_fraction (nightly)
    replay_fraction: float = 0.0
    replay_seed: int = 0
    heldout_fraction: float = 0.1
    split_salt: str = "clipcap-heldout"
    train: TrainConfig = field(default_factory=TrainConfig)  # hyperparameters (clipcap_core.training)
    run: RunOptions = field(default_factory=RunOptions)  # checkpoints, failures, logging, evaluation
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    fault: FaultConfig | None = None
    decoder: Literal["clipcap", "decap"] = "clipcap"  # decap: text-only training on text tables (decap_train)
    decap: DecapOptions = field(default_factory=DecapOptions)

    def __post_init__(self) -> None:
        if not self.tables:
            raise ValueError("tables: give at least one embedding table folder or file")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.scale.num_workers < 1:
            raise ValueError(f"scale.num_workers must be >= 1, got {self.scale.num_workers}")

    @property
    def embedding_column(self) -> str:
        return decap_train.embedding_column(self.decoder)

    @property
    def run_dir(self) -> str:
        return storage.join(self.output, self.name)

    def split(self, part: str = "train", **kw: Any) -> tables.Split:
        return tables.Split(part=part, heldout_fraction=self.heldout_fraction, salt=self.split_salt, **kw)


@dataclass(frozen=True)
class TrainResult:
    artifact: str  # model artifact URI
    run_dir: str
    history: list[dict[str, Any]]
    metrics: dict[str, float]  # last epoch's held-out metrics


# --- driver ---------------------------------------------------------------------------------------------
def _plan(cfg: TrainJobConfig) -> dict[str, Any]:
    """Everything decided on the driver before workers start: files, D check, model config, step counts."""
    files = tables.list_table_files(cfg.tables)
    replay = tables.list_table_files(cfg.replay_tables) if cfg.replay_tables else []
    info = tables.inspect_tables(files + replay, column=cfg.embedding_column)
    overrides = decap_train.model_overrides(cfg.decoder, cfg.model, cfg.model_overrides)
    model_cfg = resolve_model_config(cfg.model, overrides, info)  # raises on a D mismatch
    decap_train.check_plan(cfg.decoder, cfg.decap, info, model_cfg)
    n_train = tables.count_split(files, cfg.split())
    if replay and cfg.replay_fraction > 0:
        n_train += tables.count_split(
            replay, cfg.split(sample_fraction=cfg.replay_fraction, sample_seed=cfg.replay_seed))
    W, B, E = cfg.scale.num_workers, cfg.train.batch_size, cfg.train.epochs
    if n_train // W < 1:
        raise ValueError(f"{n_train} training rows cannot feed {W} worker(s)")

    def stream_steps(first_epoch: int) -> int:  # batches per worker in a stream of epochs first_epoch..E-1
        return math.ceil(((E - first_epoch) * n_train // W) / B)  # streaming_split(equal=True) floors per worker

    # One stream holds every remaining epoch, so the data pipeline never stops and restarts between epochs.
    # It ends exactly at total_steps; a resumed run streams from the earliest epoch a stored checkpoint is in.
    total = stream_steps(0)
    stored = stored_checkpoint_steps(cfg.run_dir)
    start = max(e for e in range(E + 1) if total - stream_steps(e) <= min(stored)) if stored else 0
    return {"files": files, "replay": replay, "dim": info.dim, "model_config": model_cfg, "n_train": n_train,
            "total_steps": total, "epoch_ends": [round(e * total / E) for e in range(1, E)],
            "stream_start_epoch": start, "stream_first_step": total - stream_steps(start)}


def stored_checkpoint_steps(run_dir: str) -> list[int]:
    """Steps of this run's checkpoints in storage. Ray restores the latest *registered* one, which is among
    them, so a stream starting at or before the earliest covers it; the loop skips batches up to its step."""
    steps = []
    for uri in storage.list_files(run_dir, "/state.json", recursive=True):
        if posixpath.basename(posixpath.dirname(uri)).startswith("checkpoint_"):
            steps.append(int((storage.read_json(uri) or {}).get("step", 0)))
    return steps


def _datasets(cfg: TrainJobConfig, plan: dict[str, Any]) -> dict[str, Any]:
    """The training stream: every remaining epoch of the new tables' train split (+ a seeded replay sample of
    older tables), file order reshuffled per epoch (seeded), tokenised in the pipeline."""
    tokenize = BatchTokenizer(load_tokenizer_for(cfg.model, plan["model_config"]), cfg.train.max_caption_tokens)
    parts = [(f, cfg.split()) for f in plan["files"]]
    if plan["replay"] and cfg.replay_fraction > 0:
        replay = cfg.split(sample_fraction=cfg.replay_fraction, sample_seed=cfg.replay_seed)
        parts += [(f, replay) for f in plan["replay"]]
    stream = []
    for epoch in range(plan["stream_start_epoch"], cfg.train.epochs):
        order = list(parts)
        random.Random(cfg.train.seed * 1000 + epoch).shuffle(order)
        stream += order
    return {"train": tables.stream_tables(stream or parts, tokenize, cfg.train.max_caption_tokens,
                                          column=cfg.embedding_column)}


def run_training(cfg: TrainJobConfig) -> TrainResult:
    """Train (or resume) run ``cfg.name`` under ``cfg.output``; returns the artifact URI and the history."""
    import ray.train
    from ray.train.torch import TorchTrainer

    plan = _plan(cfg)
    storage.check_writable(cfg.output)
    log.info("train %s: %d rows (D=%d), %d worker(s), %d epochs = %d steps (streaming from epoch %d)", cfg.name,
             plan["n_train"], plan["dim"], cfg.scale.num_workers, cfg.train.epochs, plan["total_steps"],
             plan["stream_start_epoch"] + 1)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": to_dict(cfg), "plan": {
            "model_config": to_dict(plan["model_config"]),
            **{k: plan[k] for k in ("files", "replay", "dim", "total_steps", "epoch_ends", "stream_start_epoch",
                                    "stream_first_step")}}},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scale.num_workers, use_gpu=cfg.scale.use_gpu,
            resources_per_worker={"CPU": cfg.scale.cpus_per_worker,
                                  **({"GPU": cfg.scale.gpus_per_worker} if cfg.scale.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=cfg.output,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
        datasets=_datasets(cfg, plan),
    )
    with _env(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=str(cfg.run.poll_interval_s)):  # read by the controller actor
        result = trainer.fit()
    if result.error:
        raise result.error
    out = result.return_value or {}
    history = out.get("history", [])
    write_history(history, cfg.run_dir)
    return TrainResult(artifact=out["artifact"], run_dir=cfg.run_dir, history=history,
                       metrics=out.get("metrics", {}))


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block (Ray Train copies a list of them, this one
    included, from the driver into its controller actor when ``fit`` starts)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- metrics history ------------------------------------------------------------------------------------
def write_history(history: list[dict[str, Any]], run_dir: str) -> None:
    """``history.json``, ``history.csv`` and ``loss_curve.png`` under ``run_dir``."""
    import csv
    import io

    storage.write_json(history, storage.join(run_dir, "history.json"))
    lead = ["kind", "step", "epoch", "attempt"]
    columns = [c for c in lead if any(c in r for r in history)]
    columns += sorted({k for row in history for k in row} - set(lead))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    fs, path = storage.filesystem(storage.join(run_dir, "history.csv"))
    with fs.open(path, "w") as f:
        f.write(buf.getvalue())
    fs, path = storage.filesystem(storage.join(run_dir, "loss_curve.png"))
    with fs.open(path, "wb") as f:
        f.write(plot_history(history))


def plot_history(history: list[dict[str, Any]]) -> bytes:
    """A PNG of train loss per step and held-out loss per epoch (bytes)."""
    import io

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


# --- evaluation of a saved model --------------------------------------------------------------------------
def evaluate_artifact(uri: str, heldout: pa.Table, *, device: str = "cpu", max_tokens: int = 32,
                      batch_size: int = 64) -> dict[str, float]:
    """Held-out loss and caption metrics of the model artifact at ``uri`` on ``heldout`` (key/caption/embedding)."""
    from clipcap_core.artifacts import load_model

    loaded = load_model(uri, device=device)
    t0 = time.perf_counter()
    metrics = evaluate_model(loaded.model, loaded.tokenizer, heldout, max_tokens=max_tokens, batch_size=batch_size)
    log.info("evaluated %s on %d rows in %.1fs: %s", uri, heldout.num_rows, time.perf_counter() - t0, metrics)
    return metrics

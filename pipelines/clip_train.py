"""``clipcap train-clip``, driver side: contrastive CLIP training / fine-tuning with Ray Train on webdataset shards.

    result = run_clip_training(ClipTrainJobConfig(
        shards=("s3://b/raw/mydomain",), output="s3://b/clip-runs", name="vitb32-mydomain",
        model=ClipModelSpec(model_name="ViT-B-32", pretrained="openai"), train=ClipTrainConfig(lr=1e-5, epochs=3),
        scale=ScaleConfig(num_workers=8, use_gpu=True)))
    # result.weights: <output>/<name>/model/<name>.safetensors -> `clipcap embed --model ViT-B-32 --pretrained ...`

Data: img2dataset shards (image + ``.txt`` caption per sample) -> one Ray Data read task per (shard, epoch),
shard order reshuffled per epoch (seeded), decode + seeded crop + tokenise in the tasks (``clip_data``) ->
``streaming_split`` -> each worker iterates uint8 pixel / token batches. One stream covers every remaining
epoch (as ``clipcap train``). A salted key hash holds ``heldout_fraction`` of the samples out; rank 0 evaluates
retrieval R@1/5/10 on (at most ``run.eval_max_samples`` of) them at epoch ends.

Run layout, ``<output>/<name>/``: Ray's ``checkpoint_*`` (every ``run.checkpoint_every`` steps and each epoch;
model, optimizer, scheduler, step, history), ``model/`` (``<name>.safetensors``, ``open_clip_config.json``,
``clipcap_clip.json``, ``README.md`` model card), ``history.json`` / ``.csv``, ``loss_curve.png``.
Re-running with the same output and name resumes from the latest checkpoint; a dead worker is replaced and the
group restarts from it (``run.max_failures``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from clipcap_core.clip_training import ClipModelSpec, ClipTrainConfig
from clipcap_core.configs import to_dict
from pipelines import clip_data, storage, tables
from pipelines.train import FaultConfig, ScaleConfig, _env, stored_checkpoint_steps, write_history
from pipelines.train_loop import RunOptions

log = logging.getLogger(__name__)

__all__ = ["ClipTrainJobConfig", "ClipTrainResult", "run_clip_training"]


@dataclass(frozen=True, kw_only=True)
class ClipTrainJobConfig:
    shards: tuple[str, ...]  # webdataset shard folders or .tar files (img2dataset output)
    output: str  # storage root; the run lives in <output>/<name>/
    name: str = "clip"
    model: ClipModelSpec = field(default_factory=ClipModelSpec)
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    run: RunOptions = field(default_factory=lambda: RunOptions(log_every=10, eval_max_samples=512))
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    heldout_fraction: float = 0.05
    split_salt: str = "clipcap-heldout"
    read_cpus: float = 0.5  # CPU reserved per data task (decode + crop + tokenise)
    # "stream": Ray Data tasks decode every epoch (any size, augmentation); "memory": each worker decodes its
    # shards once and iterates in RAM (small sets: no per-epoch decode, no split coordinator); "auto": memory
    # when augment is "none" and a worker's share fits in memory_limit_mb.
    data: Literal["auto", "stream", "memory"] = "auto"
    memory_limit_mb: int = 2048
    fault: FaultConfig | None = None

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("shards: give at least one webdataset shard folder or .tar file")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.scale.num_workers < 1:
            raise ValueError(f"scale.num_workers must be >= 1, got {self.scale.num_workers}")
        if self.data == "memory" and self.train.augment != "none":
            raise ValueError("data='memory' decodes once, so it cannot augment: use augment='none' or data='stream'")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty folder name, got {self.name!r}")

    @property
    def run_dir(self) -> str:
        return storage.join(self.output, self.name)

    def split(self, part: str = "train") -> tables.Split:
        return tables.Split(part=part, heldout_fraction=self.heldout_fraction, salt=self.split_salt)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ClipTrainResult:
    model_dir: str  # <run>/model/
    weights: str  # the safetensors file: `--pretrained` for embed / caption / train-clip
    run_dir: str
    history: list[dict[str, Any]]
    metrics: dict[str, float]  # last held-out retrieval metrics


def prep_for(cfg: ClipTrainJobConfig, part: str = "train") -> clip_data.PairPrep:
    from clipcap_core.encoders import preprocess_spec

    spec = preprocess_spec(cfg.model.encoder_config())
    size = spec.size if isinstance(spec.size, int) else int(spec.size[0])
    return clip_data.PairPrep(model_name=cfg.model.model_name, size=size, interpolation=spec.interpolation,
                              augment=cfg.train.augment if part == "train" else "none",
                              crop_scale=cfg.train.crop_scale, seed=cfg.train.seed, split=cfg.split(part))


def plan(cfg: ClipTrainJobConfig) -> dict[str, Any]:
    """Checks and step counts, on the driver, before any worker starts (bad configs fail here)."""
    from clipcap_core.encoders import validate_config

    validate_config(cfg.model.encoder_config())
    shards = clip_data.list_shards(cfg.shards)
    counts = [int(cfg.split().mask(k).sum()) if k else 0 for k in map(clip_data.shard_keys, shards)]
    n_train = sum(counts)
    W, B, E = cfg.scale.num_workers, cfg.train.batch_size, cfg.train.epochs
    mode = data_mode(cfg, n_train)
    per_worker = min(sum(counts[r::W]) for r in range(W)) if mode == "memory" else n_train // W
    if per_worker < B:
        raise ValueError(f"{n_train} training pairs in {len(shards)} shard(s) cannot fill one batch of {B} on each of "
                         f"{W} worker(s); lower --batch-size or add data")
    if mode == "memory":  # every worker: its own shards, a seeded permutation per epoch, equal batch counts
        spe = per_worker // B
        return {"shards": shards, "n_train": n_train, "mode": mode, "total_steps": E * spe,
                "epoch_ends": [e * spe for e in range(1, E)], "steps_per_epoch": spe,
                "stream_start_epoch": 0, "stream_first_step": 0}

    def stream_steps(first_epoch: int) -> int:  # full batches per worker (drop_last: equal on every rank)
        return ((E - first_epoch) * n_train // W) // B

    total = stream_steps(0)
    stored = stored_checkpoint_steps(cfg.run_dir)
    start = max(e for e in range(E + 1) if total - stream_steps(e) <= min(stored)) if stored else 0
    return {"shards": shards, "n_train": n_train, "mode": mode, "total_steps": total,
            "epoch_ends": [round(e * total / E) for e in range(1, E)], "stream_start_epoch": start,
            "stream_first_step": total - stream_steps(start)}


def data_mode(cfg: ClipTrainJobConfig, n_train: int) -> str:
    if cfg.data != "auto":
        return cfg.data
    size = prep_for(cfg).size
    need_mb = n_train / cfg.scale.num_workers * (size * size * 3 + 8 * 77) / 2**20
    return "memory" if cfg.train.augment == "none" and need_mb <= cfg.memory_limit_mb else "stream"


def _dataset(cfg: ClipTrainJobConfig, p: dict[str, Any]) -> Any:
    items: list[tuple[str, int]] = []
    for epoch in range(p["stream_start_epoch"], cfg.train.epochs):
        order = list(p["shards"])
        random.Random(cfg.train.seed * 1000 + epoch).shuffle(order)
        items += [(s, epoch) for s in order]
    return clip_data.stream_pairs(items or [(p["shards"][0], 0)], prep_for(cfg), num_cpus=cfg.read_cpus)


def run_clip_training(cfg: ClipTrainJobConfig) -> ClipTrainResult:
    """Train (or resume) CLIP run ``cfg.name`` under ``cfg.output``; returns the weights and the history."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.clip_train_loop import clip_train_loop

    p = plan(cfg)
    storage.check_writable(cfg.output)
    log.info("train-clip %s: %s from %s, %d pairs in %d shard(s), %d worker(s) x batch %d, %d epochs = %d steps "
             "(data: %s; streaming from epoch %d)", cfg.name, cfg.model.model_name, cfg.model.pretrained or "scratch",
             p["n_train"], len(p["shards"]), cfg.scale.num_workers, cfg.train.batch_size, cfg.train.epochs,
             p["total_steps"], p["mode"], p["stream_start_epoch"] + 1)
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        clip_train_loop,
        train_loop_config={"job": to_dict(cfg), "plan": {k: v for k, v in p.items()}},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scale.num_workers, use_gpu=cfg.scale.use_gpu,
            resources_per_worker={"CPU": cfg.scale.cpus_per_worker,
                                  **({"GPU": cfg.scale.gpus_per_worker} if cfg.scale.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=cfg.output,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
        datasets={"train": _dataset(cfg, p)} if p["mode"] == "stream" else None,
    )
    with _env(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=str(cfg.run.poll_interval_s)):
        result = trainer.fit()
    if result.error:
        raise result.error
    out = result.return_value or {}
    history = out.get("history", [])
    write_history(history, cfg.run_dir)
    log.info("train-clip %s: done in %.0f s -> %s", cfg.name, time.perf_counter() - t0, out.get("weights"))
    return ClipTrainResult(model_dir=out["model_dir"], weights=out["weights"], run_dir=cfg.run_dir,
                           history=history, metrics=out.get("metrics", {}))


def pairs_per_second(history: list[dict[str, Any]]) -> float:
    """Mean training throughput over the logged step windows (pairs/s, all workers)."""
    rates = [r["samples_per_s"] for r in history if r.get("kind") == "step" and math.isfinite(r["samples_per_s"])]
    return sum(rates) / len(rates) if rates else float("nan")

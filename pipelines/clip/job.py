"""``clipcap train-clip``, driver side: contrastive CLIP training / fine-tuning with Ray Train on webdataset shards.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from clipcap_core.clip_training import ClipModelSpec, ClipTrainConfig
from clipcap_core.encoders import fetch_pretrained, preprocess_spec, validate_config
from pipelines.clip import data as clip_data
from pipelines.io import storage, tables
from pipelines.train.checkpoints import stream_start
from pipelines.train.runner import fit_workers
from pipelines.train.state import (
    FaultConfig,
    RunOptions,
    ScaleConfig,
    StepPlan,
    StreamSpec,
    check_heldout_fraction,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ClipTrainJobConfig:
    """The ``clipcap train-clip`` config: each field is a flag (``pipelines.commands.flags``); ``CLI_FLAGS`` names
    the renamed flags and the fields set by ``--config`` / ``--set`` only (None)."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {
        "shards": "--input", "run.eval_max_samples": "--eval-max-samples", "split_salt": None, "read_cpus": None,
        "data": None, "memory_limit_mb": None, "fault": None,
    }
    shards: tuple[str, ...]  # webdataset shard folders or .tar files, img2dataset output (local, s3://, ...)
    output: str  # storage root; the run lives in <output>/<name>/
    name: str = "clip"  # run name (re-running with the same name resumes)
    model: ClipModelSpec = field(default_factory=ClipModelSpec)
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    run: RunOptions = field(default_factory=lambda: RunOptions(log_every=10, eval_max_samples=512))
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    heldout_fraction: float = 0.05  # samples held out by key hash for retrieval eval
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
        check_heldout_fraction(self.heldout_fraction)
        if self.data == "memory" and self.train.augment != "none":
            raise ValueError("data='memory' decodes once, so it cannot augment: use augment='none' or data='stream'")
        if self.train.group_size > 1 and (self.heldout_fraction > 0 or self.data == "stream"
                                          or self.train.augment != "none"):
            raise ValueError("train.group_size > 1 keeps groups of consecutive pairs in memory data: it needs "
                             "heldout_fraction 0 (a held-out sample would break its group), augment 'none' and "
                             "data 'memory' or 'auto'")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty folder name, got {self.name!r}")

    @property
    def run_dir(self) -> str:
        return storage.join(self.output, self.name)

    def split(self, part: str = "train") -> tables.Split:
        return tables.Split(part=part, heldout_fraction=self.heldout_fraction, salt=self.split_salt)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class ClipTrainPlan(StepPlan):
    """What the driver decided before the workers start (sent to them with the job config)."""

    shards: tuple[str, ...]
    mode: Literal["stream", "memory"]  # see ClipTrainJobConfig.data
    steps_per_epoch: int = 0  # "memory": every epoch is this many steps on every worker


@dataclass(frozen=True)
class ClipTrainResult:
    model_dir: str  # <run>/model/
    weights: str  # the safetensors file: `--clip-pretrained` for embed / train-clip / eval-clip
    run_dir: str
    history: list[dict[str, Any]]
    metrics: dict[str, float]  # last held-out retrieval metrics


def prep_for(cfg: ClipTrainJobConfig, part: str = "train") -> clip_data.PairPrep:
    spec = preprocess_spec(cfg.model.encoder_config())
    size = spec.size if isinstance(spec.size, int) else int(spec.size[0])
    return clip_data.PairPrep(model_name=cfg.model.model_name, size=size, interpolation=spec.interpolation,
                              augment=cfg.train.augment if part == "train" else "none",
                              crop_scale=cfg.train.crop_scale, seed=cfg.train.seed, split=cfg.split(part))


def plan(cfg: ClipTrainJobConfig) -> ClipTrainPlan:
    """Checks and step counts, on the driver, before any worker starts (bad configs fail here)."""
    validate_config(cfg.model.encoder_config())
    fetch_pretrained(cfg.model.encoder_config())
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
        return ClipTrainPlan(shards=tuple(shards), n_train=n_train, mode=mode, total_steps=E * spe,
                             epoch_ends=tuple(e * spe for e in range(1, E)), steps_per_epoch=spe)

    def stream_steps(first_epoch: int) -> int:  # full batches per worker (drop_last: equal on every rank)
        return ((E - first_epoch) * n_train // W) // B

    total = stream_steps(0)
    start, first_step = stream_start(cfg.run_dir, E, stream_steps)
    return ClipTrainPlan(shards=tuple(shards), n_train=n_train, mode=mode, total_steps=total,
                         epoch_ends=tuple(round(e * total / E) for e in range(1, E)), stream_start_epoch=start,
                         stream_first_step=first_step)


def data_mode(cfg: ClipTrainJobConfig, n_train: int) -> Literal["stream", "memory"]:
    if cfg.data != "auto":
        return cfg.data
    if cfg.train.group_size > 1:
        return "memory"
    size = prep_for(cfg).size
    need_mb = n_train / cfg.scale.num_workers * (size * size * 3 + 8 * 77) / 2**20
    return "memory" if cfg.train.augment == "none" and need_mb <= cfg.memory_limit_mb else "stream"


def _dataset(cfg: ClipTrainJobConfig, p: ClipTrainPlan) -> Any:
    items: list[tuple[str, int]] = []
    for epoch in range(p.stream_start_epoch, cfg.train.epochs):
        order = list(p.shards)
        random.Random(cfg.train.seed * 1000 + epoch).shuffle(order)
        items += [(s, epoch) for s in order]
    return clip_data.stream_pairs(items or [(p.shards[0], 0)], prep_for(cfg), num_cpus=cfg.read_cpus)


def stream_spec(cfg: ClipTrainJobConfig, p: ClipTrainPlan) -> StreamSpec | None:
    """How each worker reads the pair stream: whole steps' batches (the last short one dropped, as contrastive
    batches must be full), prefetch ``run.prefetch_batches``; ``None`` when every epoch is done."""
    if p.stream_start_epoch >= cfg.train.epochs:
        return None
    return StreamSpec(rows=cfg.train.batch_size, prefetch_batches=cfg.run.prefetch_batches, drop_last=True,
                      shuffle_buffer=cfg.run.shuffle_buffer, dtypes={"pixels": "uint8", "tokens": "int64"})


def run_clip_training(cfg: ClipTrainJobConfig) -> ClipTrainResult:
    """Train (or resume) CLIP run ``cfg.name`` under ``cfg.output``; returns the weights and the history."""
    p = plan(cfg)
    storage.check_writable(cfg.output)
    log.info("train-clip %s: %s from %s, %d pairs in %d shard(s), %d worker(s) x batch %d, %d epochs = %d steps "
             "(data: %s; streaming from epoch %d)", cfg.name, cfg.model.model_name, cfg.model.pretrained or "scratch",
             p.n_train, len(p.shards), cfg.scale.num_workers, cfg.train.batch_size, cfg.train.epochs,
             p.total_steps, p.mode, p.stream_start_epoch + 1)
    t0 = time.perf_counter()
    stream = p.mode == "stream"
    out = fit_workers("pipelines.clip.worker:clip_train_loop", cfg, p, {"train": _dataset(cfg, p)} if stream else None,
                      stream_spec(cfg, p) if stream else None, what="train-clip")
    log.info("train-clip %s: done in %.0f s -> %s", cfg.name, time.perf_counter() - t0, out.get("weights"))
    return ClipTrainResult(model_dir=out["model_dir"], weights=out["weights"], run_dir=cfg.run_dir,
                           history=out["history"], metrics=out.get("metrics", {}))

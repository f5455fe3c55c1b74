"""``clipcap train-clip``: contrastive CLIP training / fine-tuning with Ray Train on webdataset shards. The driver
plans and starts the workers; each worker builds the model (towers locked as asked), runs the shared step loop
(``pipelines.train.steps``) on the pair stream or on in-memory batches, and rank 0 writes the model folder.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import ray.train.torch
import torch

from clipcap_core import uris
from clipcap_core.clip_eval import retrieval
from clipcap_core.clip_training import (
    ClipModelSpec,
    ClipTrainConfig,
    build_clip,
    clip_loss,
    encode_batches,
    grouped_order,
    lock_towers,
    make_optimizer_and_scheduler,
    make_scaler,
    save_clip_weights,
    shape_init,
    train_step,
)
from clipcap_core.configs import from_dict, to_dict
from clipcap_core.encoders import _open_clip, fetch_pretrained, preprocess_spec, validate_config
from pipelines.clip import data as clip_data
from pipelines.io import storage, tables
from pipelines.train.checkpoints import epoch_order, stream_plan
from pipelines.train.runner import fit_workers
from pipelines.train.state import (
    FaultConfig,
    RunOptions,
    ScaleConfig,
    StepPlan,
    StreamSpec,
    check_heldout_fraction,
)
from pipelines.train.steps import WorkerRun, run_steps, stream_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ClipTrainJobConfig:
    """The ``clipcap train-clip`` config: each field is a flag; ``CLI_FLAGS`` renames or hides (None) a few."""

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

    return ClipTrainPlan(shards=tuple(shards), n_train=n_train, mode=mode, **stream_plan(cfg.run_dir, E, stream_steps))


def data_mode(cfg: ClipTrainJobConfig, n_train: int) -> Literal["stream", "memory"]:
    if cfg.data != "auto":
        return cfg.data
    if cfg.train.group_size > 1:
        return "memory"
    size = prep_for(cfg).size
    need_mb = n_train / cfg.scale.num_workers * (size * size * 3 + 8 * 77) / 2**20
    return "memory" if cfg.train.augment == "none" and need_mb <= cfg.memory_limit_mb else "stream"


def _dataset(cfg: ClipTrainJobConfig, p: ClipTrainPlan) -> Any:
    items = epoch_order(p.shards, cfg.train.seed, p.stream_start_epoch, cfg.train.epochs)
    return clip_data.stream_pairs(items or [(p.shards[0], 0)], prep_for(cfg), num_cpus=cfg.read_cpus)


def stream_spec(cfg: ClipTrainJobConfig, p: ClipTrainPlan) -> StreamSpec | None:
    """How each worker reads the pair stream (full batches only: contrastive); ``None`` when every epoch is done."""
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
    out = fit_workers(clip_train_loop, cfg, p, {"train": _dataset(cfg, p)} if stream else None, what="train-clip")
    log.info("train-clip %s: done in %.0f s -> %s", cfg.name, time.perf_counter() - t0, out.get("weights"))
    return ClipTrainResult(model_dir=out["model_dir"], weights=out["weights"], run_dir=cfg.run_dir,
                           history=out["history"], metrics=out.get("metrics", {}))


# --- worker -------------------------------------------------------------------------------------------
def evaluate_retrieval(model: Any, heldout: tuple[np.ndarray, Any, list[str]], precision: str = "fp32"
                       ) -> dict[str, float]:
    """Retrieval R@1/5/10 both ways on held-out pairs (``clip_eval.retrieval``), with the model's temperature."""
    pixels, tokens, captions = heldout
    if not captions:
        return {}
    img, txt = encode_batches(model, pixels, tokens, precision=precision)
    out = {f"heldout_{k}": v for k, v in retrieval(img, txt, captions).items()}
    out["logit_scale"] = float(getattr(model, "module", model).logit_scale.exp().item())
    return out


class ClipRun(WorkerRun):
    """This worker's CLIP model (towers locked as asked), optimizer, loss, restored state, (rank 0) held-out pairs."""

    label, unit, epoch_samples = "train-clip", "pairs", False

    def __init__(self, job: ClipTrainJobConfig, plan: ClipTrainPlan, board: Any = None):
        super().__init__(job, plan, board)
        hp = self.hp
        self.model = build_clip(job.model, seed=hp.seed, device=self.device)
        shape_init(self.model, hp)
        lock_towers(self.model, hp)
        self.optimizer, self.scheduler = make_optimizer_and_scheduler(self.model, hp, plan.total_steps)
        self.resume()
        self.loss_fn = clip_loss(hp, self.rank, self.world)
        self.heldout: tuple[np.ndarray, Any, list[str]] | None = None
        if self.rank == 0 and job.heldout_fraction > 0:
            self.heldout = clip_data.load_pairs(list(plan.shards), prep_for(job, "heldout"), job.run.eval_max_samples)

    def evaluate(self) -> dict[str, float]:
        return {} if self.heldout is None else evaluate_retrieval(self.model, self.heldout, self.hp.precision)


def memory_batches(job: ClipTrainJobConfig, plan: ClipTrainPlan, rank: int, world: int, start_step: int,
                   device: Any) -> Any:
    """``data="memory"``: this worker's shards decoded once; batches for steps ``start_step``.. from a seeded
    permutation per epoch (the same after a restart) of groups of ``train.group_size`` consecutive pairs."""
    pixels, tokens, _ = clip_data.load_pairs(list(plan.shards[rank::world]), prep_for(job, "train"))
    pixels = torch.from_numpy(pixels)
    B, spe = job.train.batch_size, plan.steps_per_epoch
    order = None
    for step in range(start_step, plan.total_steps):
        epoch, i = divmod(step, spe)
        if order is None or i == 0:
            gen = torch.Generator().manual_seed(job.train.seed * 100003 + epoch * 1009 + rank)
            order = grouped_order(len(tokens), job.train.group_size, gen)
        idx = order[i * B:(i + 1) * B]
        yield {"pixels": pixels[idx].to(device), "tokens": tokens[idx].to(device)}


def clip_train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """What each Ray Train worker runs (config from ``runner.fit_workers``)."""
    job, plan = from_dict(ClipTrainJobConfig, config["job"]), from_dict(ClipTrainPlan, config["plan"])
    hp = job.train
    stream_mode, spec = plan.mode == "stream", stream_spec(job, plan)
    run = ClipRun(job, plan, config.get("progress"))
    if not stream_mode:
        batches = memory_batches(job, plan, run.rank, run.world, run.state.step, run.device)
    else:
        batches = None if spec is None else stream_batches(spec, run.device)
    net = ray.train.torch.prepare_model(run.model, move_to_device=False) if run.world > 1 else run.model
    scaler = make_scaler(hp, run.device)

    def step(batch: dict[str, Any]) -> float:
        return train_step(net, batch["pixels"], batch["tokens"], run.optimizer, run.scheduler, hp, run.loss_fn,
                          scaler)

    run_steps(run, batches, step, skip=run.state.step - plan.stream_first_step if stream_mode else 0)
    if run.rank != 0:
        return None
    return save_model_dir(job, plan, run)


# --- the final model folder ---------------------------------------------------------------------------------
def save_model_dir(job: ClipTrainJobConfig, plan: ClipTrainPlan, run: ClipRun) -> dict[str, Any]:
    """Rank 0: ``<run>/model/`` = weights (safetensors), open_clip config, our provenance JSON, model card."""
    model, state, metrics = run.model, run.state, run.metrics
    model_dir = storage.join(job.run_dir, "model")
    weights = storage.join(model_dir, f"{job.name}.safetensors")
    info = {"schema": 1, "model_name": job.model.model_name, "init": to_dict(job.model),
            "weights": posixpath.basename(weights), "step": state.step, "epochs": state.epoch,
            "train": {**to_dict(job.train), "warmup_steps": job.train.warmup_for(plan.total_steps)},
            "pairs": plan.n_train, "shards": len(plan.shards),
            "heldout_fraction": job.heldout_fraction, "split_salt": job.split_salt, "metrics": metrics}
    fs, path = uris.filesystem(model_dir)
    storage.ensure_dir(fs, path)
    with tempfile.TemporaryDirectory(prefix="clipcap-clip-model-") as d:
        local = os.path.join(d, "w.safetensors")
        save_clip_weights(model, local)
        fs.put_file(local, uris.filesystem(weights)[1])
    oc_cfg = {"model_cfg": _open_clip().get_model_config(info["model_name"]),
              "preprocess_cfg": dict(getattr(model, "module", model).visual.preprocess_cfg)}
    storage.write_json(oc_cfg, storage.join(model_dir, "open_clip_config.json"))
    storage.write_json(info, storage.join(model_dir, "clipcap_clip.json"))
    with fs.open(uris.filesystem(storage.join(model_dir, "README.md"))[1], "w") as f:
        f.write(model_card(info))
    return {"model_dir": model_dir, "weights": weights, "history": state.history, "metrics": metrics}


def model_card(info: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """A short Markdown model card: what it is, how it was trained, held-out figures, how to use it."""
    m = info.get("metrics", {})
    lines = [f"# CLIP `{info['model_name']}` trained with `clipcap train-clip`", "",
             f"- init: {info['init'].get('pretrained') or 'from scratch (seeded)'}",
             f"- data: {info['pairs']} training pairs in {info['shards']} shard(s); held out by key hash: "
             f"{info['heldout_fraction']:.0%} (salt `{info['split_salt']}`)",
             f"- steps: {info['step']} ({info['epochs']} epochs), batch {info['train']['batch_size']} per worker, "
             f"lr {info['train']['lr']}, weight decay {info['train']['weight_decay']}, "
             f"warm-up {info['train']['warmup_steps']}, precision {info['train']['precision']}", ""]
    if m:
        lines += ["## Held-out retrieval", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in m.items() if isinstance(v, float)]
        lines.append("")
    for title, table in (extra or {}).items():
        lines += [f"## {title}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in table.items()]
        lines.append("")
    lines += ["## Use", "", f"    clipcap embed --clip {info['model_name']} --clip-pretrained <this folder>/{info['weights']} ...",
              f"    clipcap train-clip --clip {info['model_name']} --clip-pretrained <this folder>/{info['weights']} ...", ""]
    return "\n".join(lines)

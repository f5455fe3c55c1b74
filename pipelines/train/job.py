"""The Ray Train job: ClipCap mapping network (+ LM when tuned) from embedding tables, on 1 CPU or N GPUs."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pyarrow as pa
import ray.train.torch
import torch

from clipcap_core.artifacts import load_model, save_model
from clipcap_core.configs import from_dict, to_dict
from clipcap_core.model import ModelConfig
from clipcap_core.training import TrainConfig, make_optimizer_and_scheduler, make_scaler, train_step
from pipelines import exitcodes
from pipelines.exitcodes import JobFailed
from pipelines.io import storage, tables
from pipelines.train.checkpoints import epoch_order, stream_plan
from pipelines.train.runner import fit_workers
from pipelines.train.setup import (
    BatchTokenizer,
    DecapOptions,
    add_noise,
    build_memory,
    build_or_load_model,
    check_plan,
    embedding_column,
    evaluate_model,
    is_preset_name,
    load_tokenizer_for,
    model_overrides,
    recipe_for,
    resolve_model_config,
    to_core_batch,
)
from pipelines.train.state import (
    FaultConfig,
    RunOptions,
    ScaleConfig,
    StepPlan,
    StreamSpec,
    check_heldout_fraction,
)
from pipelines.train.steps import WorkerRun, loss_health, run_steps, split_batches, stream_batches

READ_ROWS = 1024  # rows per Ray Data batch (a whole number of training batches; see steps.split_batches)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainJobConfig:
    """The ``clipcap train`` config: each field is a flag; ``CLI_FLAGS`` renames or hides (None) a few."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {
        "tables": "--input", "model_overrides": None, "replay_tables": None, "replay_fraction": None,
        "replay_seed": None, "split_salt": None, "fault": None,
    }
    tables: tuple[str, ...]  # embedding table folders or files (local, s3://, ...)
    output: str  # storage root; the run lives in <output>/<name>/
    name: str = "clipcap"  # run name (re-running with the same name resumes)
    model: str = "tiny"  # preset (tiny, clipcap-mlp, ...) or model artifact URI to warm-start from
    model_overrides: dict[str, Any] = field(default_factory=dict)  # dotted ModelConfig keys, presets only
    replay_tables: tuple[str, ...] = ()  # older tables sampled at replay_fraction (nightly)
    replay_fraction: float = 0.0
    replay_seed: int = 0
    heldout_fraction: float = 0.1  # fraction of keys held out for evaluation
    split_salt: str = "clipcap-heldout"
    train: TrainConfig = field(default_factory=TrainConfig)  # hyperparameters (clipcap_core.training)
    run: RunOptions = field(default_factory=RunOptions)  # checkpoints, failures, logging, evaluation
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    fault: FaultConfig | None = None
    decoder: Literal["clipcap", "decap"] = "clipcap"
    """decap: train on the text_embedding of text tables (clipcap embed-text), no images (decap_train)"""
    decap: DecapOptions = field(default_factory=DecapOptions)
    strict: bool = False
    """fail (exit 2) on rows with a non-finite vector, an empty caption or a duplicate key instead of dropping
    them into the run's input_errors table"""

    def __post_init__(self) -> None:
        if not self.tables:
            raise ValueError("tables: give at least one embedding table folder or file")
        check_heldout_fraction(self.heldout_fraction)

    @property
    def embedding_column(self) -> str:
        return embedding_column(self.decoder)

    @property
    def run_dir(self) -> str:
        return storage.join(self.output, self.name)

    def split(self, part: str = "train", **kw: Any) -> tables.Split:
        return tables.Split(part=part, heldout_fraction=self.heldout_fraction, salt=self.split_salt, **kw)

    def splits(self, files: Sequence[str], replay: Sequence[str]) -> dict[str, tables.Split]:
        """The train split of each new table file and a seeded sample of each replayed one."""
        out = {f: self.split() for f in files}
        if replay and self.replay_fraction > 0:
            sample = self.split(sample_fraction=self.replay_fraction, sample_seed=self.replay_seed)
            out.update({f: sample for f in replay})
        return out


@dataclass(frozen=True, kw_only=True)
class TrainPlan(StepPlan):
    """What the driver decided before the workers start (sent to them with the job config)."""

    files: tuple[str, ...]  # the new tables' files
    replay: tuple[str, ...] = ()  # older tables' files, sampled at replay_fraction
    dim: int  # D of the tables
    model_config: ModelConfig  # resolved: preset + overrides with D and CLIP of the tables, or the artifact's
    train: TrainConfig = field(default_factory=TrainConfig)  # the effective recipe: flags over the preset's (or warm-start artifact's), warm-up in steps
    repeats: dict[str, tuple[int, ...]] = field(default_factory=dict)  # rows of repeated keys (tables.Audit)
    input_errors: dict[str, int] = field(default_factory=dict)  # rows dropped before training, by reason


@dataclass(frozen=True)
class TrainJobResult:
    artifact: str  # model artifact URI
    run_dir: str
    history: list[dict[str, Any]]
    metrics: dict[str, float]  # last epoch's held-out metrics
    health: dict[str, Any] = field(default_factory=dict)  # steps.loss_health: did the loss fall
    input_errors: dict[str, int] = field(default_factory=dict)  # rows dropped before training, by reason


# --- driver ---------------------------------------------------------------------------------------------
def plan_training(cfg: TrainJobConfig) -> TrainPlan:
    """Everything decided on the driver before workers start: files, D check, model config, step counts."""
    return plan_and_audit(cfg)[0]


def plan_and_audit(cfg: TrainJobConfig) -> tuple[TrainPlan, tables.Audit]:
    """``plan_training``, with the audit of every table row (the rows that cannot train, as an errors table)."""
    files = tables.list_table_files(cfg.tables)
    replay = tables.list_table_files(cfg.replay_tables) if cfg.replay_tables else []
    info = tables.inspect_tables(files + replay, column=cfg.embedding_column)
    overrides = model_overrides(cfg.decoder, cfg.model, cfg.model_overrides)
    model_cfg = resolve_model_config(cfg.model, overrides, info)  # raises on a D mismatch
    check_plan(cfg.decoder, cfg.decap, info, model_cfg)
    audit = tables.audit_tables(files + replay, column=cfg.embedding_column, splits=cfg.splits(files, replay))
    check_audit(audit, strict=cfg.strict)
    n_train = audit.kept  # one pass over the tables checks every row and counts the training rows
    W = cfg.scale.num_workers
    if n_train // W < 1:
        raise ValueError(f"{n_train} training rows cannot feed {W} worker(s)")

    def stream_steps(hp: TrainConfig, first_epoch: int) -> int:  # batches per worker, epochs first_epoch..E-1
        return math.ceil(((hp.epochs - first_epoch) * n_train // W) / hp.batch_size)  # equal=True floors

    hp = cfg.train.for_run(recipe_for(cfg.model), lambda c: stream_steps(c, 0))
    return TrainPlan(files=tuple(files), replay=tuple(replay), dim=info.dim, model_config=model_cfg, train=hp,
                     repeats=audit.repeats, input_errors=audit.counts(), n_train=n_train,
                     **stream_plan(cfg.run_dir, hp.epochs, lambda e: stream_steps(hp, e))), audit


def check_audit(audit: tables.Audit, *, strict: bool) -> None:
    """``strict``: any row that cannot train refuses the run (before any work); else they are dropped."""
    if strict and audit.errors.num_rows:
        first = audit.errors.slice(0, 3).to_pylist()
        raise ValueError(f"--strict: {audit.errors.num_rows} row(s) cannot train ({audit.counts()}); first: "
                         + "; ".join(f"{r['key']!r} in {r['source']}: {r['error']}" for r in first))


def describe_recipe(model: str, hp: TrainConfig, total_steps: int) -> str:
    """The effective recipe in one line (logged once, before the workers start)."""
    return (f"train recipe ({'preset ' + model if is_preset_name(model) else 'from ' + model}): lr {hp.lr:g}, "
            f"warm-up {hp.warmup_steps} of {total_steps} steps, batch {hp.batch_size}, {hp.epochs} epochs, "
            f"{hp.max_caption_tokens} caption tokens, weight decay {hp.weight_decay:g}, "
            f"label smoothing {hp.label_smoothing or 0:g}, {hp.precision}")


def _datasets(cfg: TrainJobConfig, plan: TrainPlan) -> dict[str, Any]:
    """The training stream: every remaining epoch of the train split (+ replay sample), tokenised in the pipeline."""
    tokenize = BatchTokenizer(load_tokenizer_for(cfg.model, plan.model_config), cfg.train.max_caption_tokens)
    parts = list(cfg.splits(plan.files, plan.replay).items())
    stream = [part for part, _ in epoch_order(parts, cfg.train.seed, plan.stream_start_epoch, cfg.train.epochs)]
    return {"train": tables.stream_tables(stream or parts, tokenize, cfg.train.max_caption_tokens,
                                          column=cfg.embedding_column, repeats=plan.repeats)}


def stream_spec(cfg: TrainJobConfig, plan: TrainPlan) -> StreamSpec | None:
    """How each worker reads the stream: ``READ_ROWS`` rows per Ray batch (whole steps), prefetch as
    ``run.prefetch_batches`` steps; ``None`` when every epoch is done."""
    hp = cfg.train
    if plan.stream_start_epoch >= hp.epochs:
        return None
    rows = hp.batch_size * max(1, READ_ROWS // hp.batch_size)
    return StreamSpec(rows=rows, prefetch_batches=max(1, -(-cfg.run.prefetch_batches * hp.batch_size // rows)),
                      shuffle_buffer=cfg.run.shuffle_buffer,
                      dtypes={"embedding": "float32", "tokens": "int64", "mask": "float32"})


def run_training(cfg: TrainJobConfig) -> TrainJobResult:
    """Train (or resume) run ``cfg.name`` under ``cfg.output``; returns the artifact URI and the history."""
    plan, audit = plan_and_audit(cfg)
    cfg = dataclasses.replace(cfg, train=plan.train)
    storage.check_writable(cfg.output)
    hp = plan.train
    log.info(describe_recipe(cfg.model, hp, plan.total_steps))
    if hp.warmup_steps >= plan.total_steps:  # the peak learning rate is never reached: said, not run silently
        log.warning(f"warm-up of {hp.warmup_steps} steps is not shorter than the run ({plan.total_steps} steps): the "
                    f"learning rate never reaches its peak {hp.lr:g}; set --warmup-steps or --warmup-fraction lower")
    if plan.input_errors:
        errors_uri = storage.join(cfg.run_dir, "input_errors.parquet")
        log.warning("train %s: dropped %s row(s) that cannot train (%s); listed in %s", cfg.name,
                    sum(plan.input_errors.values()), plan.input_errors, errors_uri)
        storage.atomic_write_table(audit.errors, errors_uri)
    log.info("train %s: %d rows (D=%d), %d worker(s), %d epochs = %d steps (streaming from epoch %d)", cfg.name,
             plan.n_train, plan.dim, cfg.scale.num_workers, cfg.train.epochs, plan.total_steps,
             plan.stream_start_epoch + 1)
    out = fit_workers(worker_loop, cfg, plan, _datasets(cfg, plan))
    if out.get("failure"):
        raise JobFailed(f"train {cfg.name}: {out['failure']}; no model was written", exitcodes.UNHEALTHY)
    health = out.get("health") or {}
    if health.get("warning"):
        log.warning("train %s: %s", cfg.name, health["warning"])
    return TrainJobResult(artifact=out["artifact"], run_dir=cfg.run_dir, history=out["history"],
                          metrics=out.get("metrics", {}), health=health, input_errors=plan.input_errors)


# --- worker -------------------------------------------------------------------------------------------
class ClipCapRun(WorkerRun):
    """This worker's ClipCap model, optimizer, restored state and (rank 0) held-out rows."""

    may_miss = "lm."  # a frozen LM is not in checkpoints: it is rebuilt from its source

    def __init__(self, job: TrainJobConfig, plan: TrainPlan, board: Any = None):
        super().__init__(job, plan, board)
        hp = self.hp
        self.model, self.tokenizer = build_or_load_model(job.model, plan.model_config, seed=hp.seed,
                                                         device=self.device)
        self.optimizer, self.scheduler = make_optimizer_and_scheduler(self.model, hp, plan.total_steps)
        if not self.resume() and self.rank == 0:  # the run record opens with the effective recipe
            self.state.history.append({"kind": "recipe", "step": 0, "epoch": 0, "attempt": self.state.attempt,
                                       **{f"recipe_{k}": v for k, v in to_dict(hp).items()},
                                       **{f"dropped_{k.replace(' ', '_')}": n for k, n in plan.input_errors.items()}})
        torch.manual_seed(hp.seed * 1000 + 100 * self.state.attempt + self.rank)  # dropout: per worker and attempt
        self.heldout = None
        if self.rank == 0 and job.heldout_fraction > 0:
            self.heldout = tables.read_split(list(plan.files), job.split("heldout"), max_rows=job.run.eval_max_samples,
                                             column=job.embedding_column, repeats=plan.repeats)

    def checkpoint_weights(self) -> dict[str, Any]:
        """Weights that change in training: all but a frozen LM (rebuilt from its source on restore)."""
        frozen_lm = self.model.config.lm.freeze
        return {k: v for k, v in self.model.state_dict().items() if not (frozen_lm and k.startswith(self.may_miss))}

    def evaluate(self) -> dict[str, float]:
        if self.heldout is None or not self.heldout.num_rows:
            return {}
        return evaluate_model(self.model, self.tokenizer, self.heldout, max_tokens=self.hp.max_caption_tokens)


def worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """What each Ray Train worker runs (config from ``runner.fit_workers``)."""
    job, plan = from_dict(TrainJobConfig, config["job"]), from_dict(TrainPlan, config["plan"])
    hp = job.train
    spec = stream_spec(job, plan)
    run = ClipCapRun(job, plan, config.get("progress"))
    batches = None if spec is None else split_batches(stream_batches(spec, run.device), hp.batch_size)
    noise = job.decap.noise_std if job.decoder == "decap" else 0.0
    net = ray.train.torch.prepare_model(run.model, move_to_device=False) if run.world > 1 else run.model
    scaler = make_scaler(hp, run.device)

    def step(batch: dict[str, Any]) -> float:
        core = to_core_batch(batch)
        if noise:  # CapDec: the decoder learns to caption from near, not exact, text embeddings
            core.embeds = add_noise(core.embeds, noise)
        return train_step(net, core, run.optimizer, run.scheduler, hp, scaler)

    run_steps(run, batches, step, skip=run.state.step - plan.stream_first_step)
    if run.rank != 0:
        return None
    if run.failure:  # nothing is saved: the last checkpoint holds the last finite weights
        return {"failure": run.failure, "history": run.state.history}
    return save_artifact(job, plan, run)


def save_artifact(job: TrainJobConfig, plan: TrainPlan, run: ClipCapRun) -> dict[str, Any]:
    """Rank 0: the final model artifact (with its training provenance) and the loop's return value."""
    artifact = storage.join(job.run_dir, "model")
    memory = None
    if job.decoder == "decap":  # seeded, so a resumed run stores the same memory
        memory = build_memory(job.decap, list(plan.files), job.split(), repeats=plan.repeats)
    state = run.state
    health = loss_health(state.history, plan.total_steps)
    if health.get("loss_fell") is False:
        state.history.append({"kind": "warning", "step": state.step, "warning": health["warning"]})
    save_model(run.model, run.tokenizer, artifact, metrics=run.metrics, decap=memory, extra={"training": {
        "run": job.name, "step": state.step, "epochs": state.epoch, "tables": list(plan.files),
        "replay": list(plan.replay), "replay_fraction": job.replay_fraction, "init": job.model,
        "train": to_dict(job.train), "decoder": job.decoder,
        "decap": to_dict(job.decap) if memory is not None else None, "health": health,
        "input_errors": plan.input_errors}})
    return {"artifact": artifact, "history": state.history, "metrics": run.metrics, "health": health}


# --- evaluation of a saved model --------------------------------------------------------------------------
def evaluate_artifact(uri: str, heldout: pa.Table, *, device: str = "cpu", max_tokens: int = 32,
                      batch_size: int = 64) -> dict[str, float]:
    """Held-out loss and caption metrics of the model artifact at ``uri`` on ``heldout`` (key/caption/embedding)."""
    loaded = load_model(uri, device=device)
    t0 = time.perf_counter()
    metrics = evaluate_model(loaded.model, loaded.tokenizer, heldout, max_tokens=max_tokens, batch_size=batch_size)
    log.info("evaluated %s on %d rows in %.1fs: %s", uri, heldout.num_rows, time.perf_counter() - t0, metrics)
    return metrics

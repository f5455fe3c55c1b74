"""Prefix-length sweep (the paper's study): Ray Tune over prefix lengths x mapping types."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from ray import tune

from clipcap_core.configs import from_dict, to_dict
from clipcap_core.training import TrainConfig, iterate_batches, train_loop
from pipelines import console
from pipelines.io import schemas, storage, tables
from pipelines.train.setup import build_or_load_model, evaluate_model, recipe_for, resolve_model_config

log = logging.getLogger(__name__)

COLUMNS = ("mapping", "prefix_length", "freeze_lm", "bleu4", "cider", "exact_match", "val_loss", "mapping_params",
           "train_rows", "seconds")


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """The ``clipcap sweep`` config: each field is a flag; ``CLI_FLAGS`` renames or hides (None) a few."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"tables": "--input", "presets": None,
                                                  "model_overrides": None}
    tables: tuple[str, ...]  # embedding table folders or files
    output: str  # where results and Tune state go (<output>/<name>/)
    name: str = "prefix-sweep"  # sweep name (results under <output>/<name>/)
    prefix_lengths: tuple[int, ...] = (1, 10, 20)  # prefix lengths k tried
    mappings: tuple[Literal["mlp", "transformer"], ...] = ("mlp", "transformer")  # mapping networks tried
    # Base preset per mapping type (paper: MLP + tuned GPT-2, transformer + frozen GPT-2).
    presets: dict[str, str] = field(default_factory=lambda: {"mlp": "tiny", "transformer": "tiny-transformer"})
    train: TrainConfig = field(default_factory=TrainConfig)
    heldout_fraction: float = 0.1  # fraction of keys held out for evaluation
    eval_max_samples: int = 500  # held-out samples evaluated per trial at most
    max_train_rows: int = 100_000
    """training rows per trial at most (a sweep compares settings on a sample, not the whole corpus)"""
    trial_cpus: float = 1.0  # CPUs per trial
    trial_gpus: float = 0.0  # GPUs per trial
    max_concurrent: int = 0  # trials running at once at most (0: as many as resources allow)
    # Dotted overrides of every setting's preset (e.g. {"tokenizer": "word-scenes"}); the swept keys win.
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prefix_lengths or min(self.prefix_lengths) < 1:
            raise ValueError(f"prefix_lengths must be >= 1, got {self.prefix_lengths}")
        missing = sorted(set(self.mappings) - set(self.presets))
        if missing:
            raise ValueError(f"no base preset for mapping(s) {missing}; set presets")


def _overrides(mapping: str, k: int, freeze_lm: bool | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"mapping.kind": mapping, "mapping.prefix_length": k}
    if mapping == "transformer":
        out["mapping.clip_length"] = k
    if freeze_lm is not None:
        out["lm.freeze"] = freeze_lm
    return out


@dataclass
class TrainedSetting:
    """One setting trained in a trial's process: the model, its tokenizer, the held-out rows and run figures."""

    model: Any
    tokenizer: Any
    heldout: Any  # pa.Table of the key-hash held-out rows (at most eval_max_samples)
    max_tokens: int
    train_rows: int
    train_loss: float
    seconds: float


def train_setting(sweep: SweepConfig, mapping: str, k: int, *, freeze_lm: bool | None = None,
                  seed: int | None = None) -> TrainedSetting:
    """Train setting (mapping, k[, LM frozen][, seed]) in this process on the train split (``None``: the preset's)."""
    files = tables.list_table_files(sweep.tables)
    info = tables.inspect_tables(files)
    preset = sweep.presets[mapping]
    model_cfg = resolve_model_config(preset, {**sweep.model_overrides, **_overrides(mapping, k, freeze_lm)}, info)
    device = "cuda" if sweep.trial_gpus and torch.cuda.is_available() else "cpu"
    hp = sweep.train.with_recipe(recipe_for(preset))
    if seed is not None:
        hp = dataclasses.replace(hp, seed=seed)
    model, tokenizer = build_or_load_model(preset, model_cfg, seed=hp.seed, device=device)
    train_t = tables.read_split(files, tables.Split(part="train", heldout_fraction=sweep.heldout_fraction),
                                max_rows=sweep.max_train_rows)
    held = tables.read_split(files, tables.Split(part="heldout", heldout_fraction=sweep.heldout_fraction),
                             max_rows=sweep.eval_max_samples)
    captions, emb = train_t.column(schemas.CAPTION).to_pylist(), tables.embeddings_numpy(train_t)
    steps = hp.epochs * -(-len(captions) // hp.batch_size)
    t0 = time.perf_counter()
    result = train_loop(model, lambda epoch: iterate_batches(tokenizer, captions, emb, hp, epoch=epoch), hp,
                        total_steps=steps)
    return TrainedSetting(model, tokenizer, held, int(hp.max_caption_tokens), len(captions),
                          float(np.mean(result.epoch_losses[-1:])), time.perf_counter() - t0)


def _trial(config: dict[str, Any]) -> None:
    """One setting: train in this process, report held-out loss and caption metrics at the end."""
    sweep = from_dict(SweepConfig, config["sweep"])
    mapping, k = config["mapping"], int(config["prefix_length"])
    run = train_setting(sweep, mapping, k)
    metrics = evaluate_model(run.model, run.tokenizer, run.heldout, max_tokens=run.max_tokens)
    n_params = sum(p.numel() for p in run.model.mapping.parameters())
    tune.report({**metrics, "mapping": mapping, "prefix_length": k, "freeze_lm": run.model.config.lm.freeze,
                 "mapping_params": int(n_params), "train_rows": run.train_rows, "train_loss": run.train_loss,
                 "seconds": run.seconds})


def run_sweep(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Run every (mapping, prefix length) setting as a Tune trial; returns and saves the results table."""
    space = {"sweep": to_dict(cfg), "mapping": tune.grid_search(list(cfg.mappings)),
             "prefix_length": tune.grid_search(list(cfg.prefix_lengths))}
    progress = TrialsDone(len(cfg.mappings) * len(cfg.prefix_lengths))
    rows = sorted(({c: m.get(c) for c in COLUMNS} for m in run_trials(cfg, _trial, space, "sweep", [progress])),
                  key=lambda r: (str(r["mapping"]), int(r["prefix_length"])))
    save_results(rows, storage.join(cfg.output, cfg.name))
    return rows


def run_trials(cfg: SweepConfig, trial: Any, space: dict[str, Any], what: str, callbacks: Sequence[Any] = ()
               ) -> list[dict[str, Any]]:
    """Every setting of the grid ``space`` as a Tune trial of ``trial`` (after the checks that need none)."""
    info = tables.inspect_tables(tables.list_table_files(cfg.tables))  # table / model problems fail here
    for mapping in cfg.mappings:
        for k in cfg.prefix_lengths:
            resolve_check(cfg, mapping, k, info)
    storage.check_writable(cfg.output)
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": cfg.trial_cpus, "gpu": cfg.trial_gpus}), param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent or None),
        run_config=tune.RunConfig(name=cfg.name, storage_path=cfg.output, verbose=0, callbacks=list(callbacks)))
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} {what} trial(s) failed; first: {errors[0]}")
    return [r.metrics for r in grid]


class TrialsDone(tune.Callback):
    """A Tune callback (it runs on the driver) advancing the operator's progress line as trials end."""

    def __init__(self, total: int) -> None:
        self.progress = console.Progress("sweep", total, unit="trials", rows="trials", count_errors=False)
        self.failed = 0

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks with the experiment: not the stream
        return {"progress": None, "failed": self.failed}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.update(1, 1)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed += 1
        if self.progress is not None:
            self.progress.note = f"{self.failed} failed"
            self.progress.update(1, 1)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.progress is not None:
            self.progress.close()


def resolve_check(cfg: SweepConfig, mapping: str, k: int, info: tables.TableInfo) -> None:
    resolve_model_config(cfg.presets[mapping], {**cfg.model_overrides, **_overrides(mapping, k)}, info)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the sweep (one row per setting)."""
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def save_results(rows: list[dict[str, Any]], out_dir: str) -> None:
    storage.write_json(rows, storage.join(out_dir, "results.json"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    for name, text in (("results.csv", buf.getvalue()), ("results.md", format_table(rows) + "\n")):
        storage.write_file(storage.join(out_dir, name), text)

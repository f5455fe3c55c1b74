"""Nightly retraining: fresh embedding shards -> warm-started candidate -> held-out comparison -> promotion.
All state lives in one folder, so the job is stateless and safe to re-run: nothing new is a no-op.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from clipcap_core import uris
from clipcap_core.training import TrainConfig
from pipelines.io import storage, tables
from pipelines.lease import Lease
from pipelines.train.job import TrainJobConfig, evaluate_artifact, run_training
from pipelines.train.state import RunOptions, ScaleConfig

log = logging.getLogger(__name__)

Metric = Literal["cider", "bleu4", "exact_match", "clip_score", "val_loss"]  # clipcap_core.metrics
LOWER_IS_BETTER = {"val_loss"}


@dataclass(frozen=True, kw_only=True)
class NightlyConfig:
    """The ``clipcap nightly`` config: each field is a flag; ``CLI_FLAGS`` renames or hides (None) a few."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"tables": "--input", "eval_num_gpus": "--eval-gpus",
                                                  "lock_ttl_s": None}
    tables: tuple[str, ...]  # embedding table folders to watch for new shards (or files)
    state: str  # state folder: manifest, held-out set, production pointer, history
    initial_model: str = "tiny"  # preset or artifact URI used while nothing is in production
    train: TrainConfig = field(default_factory=TrainConfig)  # hyperparameters of each night's fine-tuning
    run: RunOptions = field(default_factory=RunOptions)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    replay_ratio: float = 1.0  # replayed older rows per new row (seeded sample of older shards)
    heldout_fraction: float = 0.1  # fraction of keys held out (frozen on the first run)
    heldout_max: int = 1000  # rows frozen into the held-out set (heldout.parquet) on the first run
    metric: Metric = "cider"  # held-out metric that decides promotion
    tolerance: float = 0.02  # how much worse (absolute) a candidate may be and still promote
    lock_ttl_s: float = 12 * 3600.0          # a lock not renewed this long is stale (crashed run)
    eval_num_gpus: float = 0.0  # GPUs for the evaluation task (when Ray is initialised)


@dataclass(frozen=True)
class NightlyResult:
    decision: Literal["noop", "promoted", "refused"]
    reason: str
    run: str | None = None
    new_shards: tuple[str, ...] = ()
    candidate: str | None = None
    candidate_metrics: dict[str, float] | None = None
    production_metrics: dict[str, float] | None = None
    pointer: dict[str, Any] | None = None


# --- state files ------------------------------------------------------------------------------------------
def state_paths(state: str) -> dict[str, str]:
    return {name: storage.join(state, rel) for name, rel in (
        ("manifest", "manifest.json"), ("heldout", "heldout.parquet"), ("pointer", "production.json"),
        ("history", "history"), ("candidates", "candidates"), ("lock", "lock.json"))}


def read_pointer(state: str) -> dict[str, Any] | None:
    """The production pointer (what serving loads), or None before the first promotion."""
    return storage.read_json(state_paths(state)["pointer"])


def read_history(state: str) -> list[dict[str, Any]]:
    """Every decision record, oldest first."""
    files = storage.list_files(state_paths(state)["history"], ".json")
    return [storage.read_json(f) for f in files]


def shard_sizes(files: Sequence[str]) -> dict[str, int]:
    out = {}
    for uri in files:
        fs, path = uris.filesystem(uri)
        out[uri] = int(fs.size(path))
    return out


def new_shards(current: dict[str, int], manifest: dict[str, Any] | None) -> list[str]:
    """Shards not in the manifest, or rewritten since (size changed)."""
    seen = (manifest or {}).get("shards", {})
    return sorted(u for u, size in current.items() if seen.get(u) != size)


def decide(candidate: dict[str, float], production: dict[str, float] | None, metric: str,
           tolerance: float, health: dict[str, Any] | None = None) -> tuple[bool, str]:
    """(promote?, reason): not worse beyond ``tolerance`` on ``metric``, finite loss, a training loss that fell."""
    if health and health.get("loss_fell") is False:
        return False, f"candidate refused: {health.get('warning', 'its training loss did not fall')}"
    loss = candidate.get("val_loss", float("nan"))
    if not math.isfinite(loss):
        return False, f"candidate validation loss is not finite ({loss})"
    if metric not in candidate or (production is not None and metric not in production):
        # e.g. clip_score when the CLIP could not be loaded for evaluation: never promote on a missing number
        return False, f"{metric} missing from the held-out metrics ({sorted(candidate)})"
    if production is None:
        return True, f"no production model yet; candidate {metric}={candidate[metric]:.4f}"
    c, p = candidate[metric], production[metric]
    worse_by = (c - p) if metric in LOWER_IS_BETTER else (p - c)
    verdict = f"candidate {metric}={c:.4f} vs production {p:.4f} (tolerance {tolerance})"
    if worse_by > tolerance:
        return False, f"{verdict}: worse by {worse_by:.4f}"
    return True, f"{verdict}: not worse beyond tolerance"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _run_id(fresh: Sequence[str]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{hashlib.sha1('|'.join(fresh).encode()).hexdigest()[:8]}"


def ensure_heldout(cfg: NightlyConfig, files: Sequence[str]) -> pa.Table:
    """The fixed held-out set: frozen into ``heldout.parquet`` on the first run, read back afterwards."""
    uri = state_paths(cfg.state)["heldout"]
    if uris.exists(uri):
        fs, path = uris.filesystem(uri)
        with fs.open(path, "rb") as f:
            return pq.read_table(f)
    held = tables.read_split(files, tables.Split(part="heldout", heldout_fraction=cfg.heldout_fraction),
                             max_rows=cfg.heldout_max)
    if held.num_rows == 0:
        raise ValueError(f"the held-out split of {len(files)} shard(s) is empty; add data or raise heldout_fraction")
    storage.atomic_write_table(held, uri)
    return held


# --- the run ----------------------------------------------------------------------------------------------
def _evaluate(uris: list[str], heldout: pa.Table, cfg: NightlyConfig) -> list[dict[str, float]]:
    """Metrics of each artifact on the same held-out set, in one Ray task (GPU if asked) when Ray is up."""
    if ray.is_initialized():
        device = "cuda" if cfg.eval_num_gpus else "cpu"
        task = ray.remote(num_cpus=1, num_gpus=cfg.eval_num_gpus)(
            lambda us, t: [evaluate_artifact(u, t, device=device) for u in us])
        return ray.get(task.remote(uris, heldout))
    return [evaluate_artifact(u, heldout) for u in uris]


def _train_candidate(cfg: NightlyConfig, run: str, fresh: list[str], old: list[str],
                     sizes_rows: dict[str, int], pointer: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    new_rows = sum(sizes_rows[f] for f in fresh)
    old_rows = sum(sizes_rows[f] for f in old)
    fraction = min(1.0, cfg.replay_ratio * new_rows / old_rows) if old_rows else 0.0
    seed = int(hashlib.sha1(run.split("-", 1)[1].encode()).hexdigest()[:8], 16) ^ cfg.train.seed
    job = TrainJobConfig(
        tables=tuple(fresh), replay_tables=tuple(old) if fraction > 0 else (), replay_fraction=fraction,
        replay_seed=seed, output=state_paths(cfg.state)["candidates"], name=run,
        model=pointer["model"] if pointer else cfg.initial_model, train=cfg.train, run=cfg.run, scale=cfg.scale,
        heldout_fraction=cfg.heldout_fraction,
    )
    log.info("nightly %s: training on %d new shard(s) (%d rows) + replay %.3f of %d older rows, from %s",
             run, len(fresh), new_rows, fraction, old_rows, job.model)
    replay = {"tables": list(job.replay_tables), "fraction": fraction, "seed": seed, "new_rows": new_rows,
              "old_rows": old_rows, "init": job.model}
    result = run_training(job)
    replay["health"] = result.health
    return result.artifact, replay


def run_nightly(cfg: NightlyConfig) -> NightlyResult:
    """One nightly run. No new shards -> returns ``noop`` and writes nothing."""
    paths = state_paths(cfg.state)
    files = tables.list_table_files(cfg.tables)
    sizes = shard_sizes(files)
    manifest = storage.read_json(paths["manifest"])
    fresh = new_shards(sizes, manifest)
    if not fresh:
        return NightlyResult(decision="noop", reason=f"no new shards among {len(files)} (manifest {paths['manifest']})")
    run = _run_id(fresh)
    with Lease(paths["lock"], run=run, stale_after_s=cfg.lock_ttl_s,
               override=f"delete {paths['lock']} if that run is dead"):
        return _night(cfg, run, files, fresh, sizes)


def _night(cfg: NightlyConfig, run: str, files: list[str], fresh: list[str], sizes: dict[str, int]) -> NightlyResult:
    """One night's training, evaluation and decision, holding the state folder's lease."""
    paths = state_paths(cfg.state)
    info = tables.inspect_tables(files)  # same D / CLIP model everywhere, before any work
    old = [f for f in files if f not in fresh]
    rows = dict(zip(info.files, info.rows, strict=True))
    heldout = ensure_heldout(cfg, files)
    pointer = read_pointer(cfg.state)
    candidate, replay = _train_candidate(cfg, run, fresh, old, rows, pointer)
    cand_m, *rest = _evaluate([candidate] + ([pointer["model"]] if pointer else []), heldout, cfg)
    prod_m = rest[0] if rest else None
    promote, reason = decide(cand_m, prod_m, cfg.metric, cfg.tolerance, replay.get("health"))
    record = {"run": run, "at": _now(), "decision": "promoted" if promote else "refused", "reason": reason,
              "candidate": candidate, "candidate_metrics": cand_m, "production": pointer and pointer["model"],
              "production_metrics": prod_m, "new_shards": fresh, "metric": cfg.metric,
              "tolerance": cfg.tolerance, "heldout_rows": heldout.num_rows, "training": replay}
    if promote:
        previous = {k: pointer[k] for k in ("model", "version", "run")} if pointer else None
        pointer = {"model": candidate, "version": (pointer["version"] + 1) if pointer else 1, "run": run,
                   "promoted_at": record["at"], "reason": reason, "metrics": cand_m, "previous": previous}
        storage.write_json(pointer, paths["pointer"])  # the one atomic switch serving sees
    storage.write_json(record, storage.join(paths["history"], f"{run}.json"))
    # The watermark moves on refusal too: the shards join the replay pool instead of blocking every night.
    storage.write_json({"shards": sizes, "run": run, "updated_at": record["at"]}, paths["manifest"])
    log.info("nightly %s: %s (%s)", run, record["decision"], reason)
    return NightlyResult(decision=record["decision"], reason=reason, run=run, new_shards=tuple(fresh),
                         candidate=candidate, candidate_metrics=cand_m, production_metrics=prod_m,
                         pointer=read_pointer(cfg.state))

"""What runs inside each Ray Train worker of ``clipcap train-clip``: the CLIP model and its held-out pairs, the
contrastive step, in-memory batches (``data="memory"``), and (rank 0) the final model folder with its model card.
The step loop, checkpoints and reporting are shared with ``clipcap train`` (``pipelines.train.steps``, ``pipelines.train.checkpoints``).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from typing import Any

import numpy as np
import torch

from clipcap_core import uris
from clipcap_core.clip_eval import retrieval
from clipcap_core.clip_training import (
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
from clipcap_core.encoders import _open_clip
from pipelines.clip import data as clip_data
from pipelines.clip.job import ClipTrainJobConfig, ClipTrainPlan, prep_for
from pipelines.io import storage
from pipelines.train.state import EarlyStream
from pipelines.train.steps import WorkerRun, run_steps


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

    def __init__(self, job: ClipTrainJobConfig, plan: ClipTrainPlan):
        hp = job.train
        super().__init__(plan, job.run, epochs=hp.epochs, batch_size=hp.batch_size,
                         torch_threads=job.scale.torch_threads, fault=job.fault)
        self.job, self.hp = job, hp
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
    permutation per epoch (the same after a restart, so a resumed run sees the batches it would have seen), of groups
    of ``train.group_size`` consecutive pairs."""
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


def clip_train_loop(config: dict[str, Any], stream: EarlyStream | None) -> dict[str, Any] | None:
    """The per-worker loop (``state.worker_entry`` calls it; config: ``{"job": ClipTrainJobConfig, "plan":
    ClipTrainPlan}`` as ``configs.to_dict``); ``stream`` the worker's shard of the pair stream, already started
    (``None`` in memory mode)."""
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray.train
    import ray.train.torch

    job, plan = from_dict(ClipTrainJobConfig, config["job"]), from_dict(ClipTrainPlan, config["plan"])
    hp = job.train
    batches = None if stream is None else stream.torch(ray.train.torch.get_device())
    stream_mode = plan.mode == "stream"
    run = ClipRun(job, plan)
    if not stream_mode:
        batches = memory_batches(job, plan, run.rank, run.world, run.state.step, run.device)
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

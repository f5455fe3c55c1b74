"""What runs inside each Ray Train worker of ``clipcap train-clip``: model set-up, resume, the contrastive step
loop, checkpoints, held-out retrieval, and (rank 0) the final model folder with its model card.

The driver (``pipelines.clip_train``) has checked the model and shards and counted the steps; this loop only
trains. Every worker steps on equal full batches (``drop_last``), so all ranks all-gather features of the same
shape at every step; rank 0 evaluates and writes checkpoints; all workers report at the same steps.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
from typing import Any

import numpy as np

from clipcap_core.clip_training import ClipModelSpec, ClipTrainConfig
from clipcap_core.configs import from_dict
from pipelines import clip_data, storage
from pipelines.train_loop import Primed, RunOptions, _maybe_crash


# --- checkpoints ------------------------------------------------------------------------------------------
def save_checkpoint(directory: str, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    import torch

    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, os.path.join(directory, "weights.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(state, f)


def load_checkpoint(checkpoint: Any, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    import torch

    with checkpoint.as_directory() as d:
        blob = torch.load(os.path.join(d, "weights.pt"), map_location="cpu", weights_only=True)
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
    try:
        model.load_state_dict(blob["model"], strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"checkpoint does not fit the model (another --model?): {exc}") from exc
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return state


# --- held-out evaluation ------------------------------------------------------------------------------------
def evaluate_retrieval(model: Any, heldout: tuple[np.ndarray, Any, list[str]], precision: str = "fp32"
                       ) -> dict[str, float]:
    """Retrieval R@1/5/10 both ways on held-out pairs (``clip_eval.retrieval``), with the model's temperature."""
    from clipcap_core.clip_eval import retrieval
    from clipcap_core.clip_training import encode_batches

    pixels, tokens, captions = heldout
    if not captions:
        return {}
    img, txt = encode_batches(model, pixels, tokens, precision=precision)
    out = {f"heldout_{k}": v for k, v in retrieval(img, txt, captions).items()}
    out["logit_scale"] = float(getattr(model, "module", model).logit_scale.exp().item())
    return out


class _Loop:
    """Per-worker state: model, optimizer, restored step/epoch/history, reporting and epoch ends."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch
        import torch

        from clipcap_core.clip_training import (
            build_clip,
            clip_loss,
            lock_towers,
            make_optimizer_and_scheduler,
        )

        self.job, self.plan = config["job"], config["plan"]
        self.hp = from_dict(ClipTrainConfig, self.job["train"])
        self.opts = from_dict(RunOptions, self.job["run"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if self.job["scale"]["torch_threads"]:
            torch.set_num_threads(int(self.job["scale"]["torch_threads"]))
        self.device = ray.train.torch.get_device()
        self.model = build_clip(from_dict(ClipModelSpec, self.job["model"]), seed=self.hp.seed, device=self.device)
        lock_towers(self.model, self.hp)
        self.optimizer, self.scheduler = make_optimizer_and_scheduler(self.model, self.hp, self.plan["total_steps"])
        ckpt = ray.train.get_checkpoint()
        self.state = (load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler) if ckpt else
                      {"step": 0, "epoch": 0, "attempt": 0, "history": []})
        self.state["attempt"] += 1
        if ckpt and self.rank == 0:
            self.state["history"].append({"kind": "resume", "step": self.state["step"], "epoch": self.state["epoch"],
                                          "attempt": self.state["attempt"]})
            print(f"[clipcap train-clip] resumed from step {self.state['step']} (epoch {self.state['epoch'] + 1}), "
                  f"attempt {self.state['attempt']}", flush=True)
        self.loss_fn = clip_loss(self.hp, self.rank, self.world)
        self.heldout = self._heldout() if self.rank == 0 else None
        self.metrics: dict[str, float] = {}
        self.window: list[float] = []
        self.start_epoch()

    def _heldout(self) -> tuple[np.ndarray, Any, list[str]] | None:
        if self.job["heldout_fraction"] <= 0:
            return None
        from pipelines.clip_train import ClipTrainJobConfig, prep_for

        cfg = from_dict(ClipTrainJobConfig, self.job)
        return clip_data.load_pairs(self.plan["shards"], prep_for(cfg, "heldout"), self.opts.eval_max_samples)

    def start_epoch(self) -> None:
        self.losses: list[float] = []
        self.seen, self.wait = 0, 0.0
        self.t_epoch = self.t_window = time.perf_counter()

    def report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        import ray.train

        name = f"checkpoint_{self.state['step']:08d}"
        if checkpoint and self.rank == 0:
            with tempfile.TemporaryDirectory(prefix="clipcap-clip-ckpt-") as d:
                save_checkpoint(d, self.model, self.optimizer, self.scheduler, self.state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
        else:
            ray.train.report(metrics, checkpoint_dir_name=name if checkpoint else None)

    def log_step(self) -> None:
        if self.rank != 0 or not self.window:
            return
        now, st = time.perf_counter(), self.state
        rate = len(self.window) * self.hp.batch_size * self.world / max(now - self.t_window, 1e-9)
        row = {"kind": "step", "step": st["step"], "epoch": st["epoch"], "train_loss": float(np.mean(self.window)),
               "lr": float(self.scheduler.get_last_lr()[0]), "samples_per_s": rate, "attempt": st["attempt"]}
        st["history"].append(row)
        print(f"[clipcap train-clip] epoch {st['epoch'] + 1} step {st['step']}/{self.plan['total_steps']} loss "
              f"{row['train_loss']:.4f} lr {row['lr']:.2e} {rate:.1f} pairs/s (attempt {st['attempt']})", flush=True)
        self.window, self.t_window = [], now

    def end_epoch(self) -> None:
        st = self.state
        elapsed = time.perf_counter() - self.t_epoch
        st["epoch"] += 1
        fresh: dict[str, float] = {}
        due = st["epoch"] % self.opts.eval_every == 0 or st["epoch"] == self.hp.epochs
        if due and self.heldout is not None:
            fresh = self.metrics = evaluate_retrieval(self.model, self.heldout, self.hp.precision)
        if self.rank == 0:
            row = {"kind": "epoch", "step": st["step"], "epoch": st["epoch"], "attempt": st["attempt"],
                   "train_loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                   "samples_per_s": self.seen * self.world / max(elapsed, 1e-9), "seconds": elapsed,
                   "data_wait_s": self.wait, **fresh}
            st["history"].append(row)
            print(f"[clipcap train-clip] epoch {st['epoch']}/{self.hp.epochs} done: " + " ".join(
                f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
        self.report({"step": st["step"], "epoch": st["epoch"], **fresh}, checkpoint=True)
        self.start_epoch()


def memory_batches(job: dict[str, Any], plan: dict[str, Any], rank: int, world: int, start_step: int,
                   device: Any) -> Any:
    """``data="memory"``: this worker's shards decoded once; batches for steps ``start_step``.. from a seeded
    permutation per epoch (the same after a restart, so a resumed run sees the batches it would have seen)."""
    import torch

    from pipelines.clip_train import ClipTrainJobConfig, prep_for

    cfg = from_dict(ClipTrainJobConfig, job)
    pixels, tokens, _ = clip_data.load_pairs(plan["shards"][rank::world], prep_for(cfg, "train"))
    pixels = torch.from_numpy(pixels)
    B, spe = cfg.train.batch_size, plan["steps_per_epoch"]
    order = None
    for step in range(start_step, plan["total_steps"]):
        epoch, i = divmod(step, spe)
        if order is None or i == 0:
            gen = torch.Generator().manual_seed(cfg.train.seed * 100003 + epoch * 1009 + rank)
            order = torch.randperm(len(tokens), generator=gen)
        idx = order[i * B:(i + 1) * B]
        yield {"pixels": pixels[idx].to(device), "tokens": tokens[idx].to(device)}


def clip_train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """The per-worker loop run by ``TorchTrainer`` (config: ``{"job": ClipTrainJobConfig dict, "plan": ...}``)."""
    import ray.train
    import ray.train.torch
    import torch

    from clipcap_core.clip_training import make_scaler, train_step

    job, plan = config["job"], config["plan"]
    opts = from_dict(RunOptions, job["run"])
    hp = from_dict(ClipTrainConfig, job["train"])
    done = plan["stream_start_epoch"] >= hp.epochs
    stream = plan["mode"] == "stream"
    batches = None if done or not stream else Primed(ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=hp.batch_size, drop_last=True, device=ray.train.torch.get_device(),
        prefetch_batches=opts.prefetch_batches, local_shuffle_buffer_size=opts.shuffle_buffer or None,
        dtypes={"pixels": torch.uint8, "tokens": torch.int64}))
    loop = _Loop(config)
    st, ends = loop.state, plan["epoch_ends"]
    if not stream:
        batches = memory_batches(job, plan, loop.rank, loop.world, st["step"], loop.device)
    net = ray.train.torch.prepare_model(loop.model, move_to_device=False) if loop.world > 1 else loop.model
    scaler = make_scaler(hp, loop.device)
    if st["epoch"] < hp.epochs and batches is not None:
        skip = st["step"] - plan["stream_first_step"] if stream else 0
        if skip < 0:
            raise RuntimeError(f"restored step {st['step']} precedes the data stream; rerun the job")
        t_ready = time.perf_counter()
        for i, batch in enumerate(batches):
            loop.wait += time.perf_counter() - t_ready
            if st["step"] >= plan["total_steps"]:
                break
            if i >= skip:
                loss = train_step(net, batch["pixels"], batch["tokens"], loop.optimizer, loop.scheduler, hp,
                                  loop.loss_fn, scaler)
                loop.losses.append(loss)
                loop.window.append(loss)
                loop.seen += int(batch["tokens"].shape[0])
                st["step"] += 1
                _maybe_crash(job.get("fault"), loop.rank, st["step"])
                if st["step"] % opts.log_every == 0:
                    loop.log_step()
                if st["epoch"] < len(ends) and st["step"] == ends[st["epoch"]]:
                    loop.end_epoch()
                elif st["step"] % opts.checkpoint_every == 0:
                    loop.report({"step": st["step"], "epoch": st["epoch"], "train_loss": loss}, checkpoint=True)
            t_ready = time.perf_counter()
        if st["epoch"] < hp.epochs:
            loop.end_epoch()
    if loop.rank != 0:
        return None
    return save_model_dir(job, plan, loop.model, st, loop.metrics)


# --- the final model folder ---------------------------------------------------------------------------------
def save_model_dir(job: dict[str, Any], plan: dict[str, Any], model: Any, state: dict[str, Any],
                   metrics: dict[str, float]) -> dict[str, Any]:
    """Rank 0: ``<run>/model/`` = weights (safetensors), open_clip config, our provenance JSON, model card."""
    from clipcap_core.clip_training import save_clip_weights
    from clipcap_core.encoders import _open_clip

    model_dir = storage.join(job["output"], job["name"], "model")
    weights = storage.join(model_dir, f"{job['name']}.safetensors")
    info = {"schema": 1, "model_name": job["model"]["model_name"], "init": job["model"],
            "weights": posixpath.basename(weights), "step": state["step"], "epochs": state["epoch"],
            "train": job["train"], "pairs": plan["n_train"], "shards": len(plan["shards"]),
            "heldout_fraction": job["heldout_fraction"], "split_salt": job["split_salt"], "metrics": metrics}
    fs, path = storage.filesystem(model_dir)
    storage.ensure_dir(fs, path)
    with tempfile.TemporaryDirectory(prefix="clipcap-clip-model-") as d:
        local = os.path.join(d, "w.safetensors")
        save_clip_weights(model, local)
        fs.put_file(local, storage.filesystem(weights)[1])
    oc_cfg = {"model_cfg": _open_clip().get_model_config(info["model_name"]),
              "preprocess_cfg": dict(getattr(model, "module", model).visual.preprocess_cfg)}
    storage.write_json(oc_cfg, storage.join(model_dir, "open_clip_config.json"))
    storage.write_json(info, storage.join(model_dir, "clipcap_clip.json"))
    with fs.open(storage.filesystem(storage.join(model_dir, "README.md"))[1], "w") as f:
        f.write(model_card(info))
    return {"model_dir": model_dir, "weights": weights, "history": state["history"], "metrics": metrics}


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
    lines += ["## Use", "", f"    clipcap embed --model {info['model_name']} --pretrained <this folder>/{info['weights']} ...",
              f"    clipcap train-clip --model {info['model_name']} --pretrained <this folder>/{info['weights']} ...", ""]
    return "\n".join(lines)


__all__ = ["clip_train_loop", "evaluate_retrieval", "model_card", "save_model_dir"]

"""What runs inside each Ray Train worker of ``clipcap train``: the ClipCap model and its held-out set, the step,
and (rank 0) the final model artifact.
"""

from __future__ import annotations

from typing import Any

import torch

from clipcap_core.configs import from_dict, to_dict
from clipcap_core.training import make_optimizer_and_scheduler, make_scaler, train_step
from pipelines.io import storage, tables
from pipelines.train.job import TrainJobConfig, TrainPlan
from pipelines.train.setup import add_noise, build_memory, build_or_load_model, evaluate_model, to_core_batch
from pipelines.train.state import EarlyStream
from pipelines.train.steps import WorkerRun, loss_health, run_steps, split_batches


class ClipCapRun(WorkerRun):
    """This worker's ClipCap model, optimizer, restored state and (rank 0) held-out rows."""

    may_miss = "lm."  # a frozen LM is not in checkpoints: it is rebuilt from its source

    def __init__(self, job: TrainJobConfig, plan: TrainPlan):
        hp = job.train
        super().__init__(plan, job.run, epochs=hp.epochs, batch_size=hp.batch_size,
                         torch_threads=job.scale.torch_threads, fault=job.fault)
        self.job, self.hp = job, hp
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


def worker_loop(config: dict[str, Any], stream: EarlyStream | None) -> dict[str, Any] | None:
    """The per-worker loop (``state.worker_entry`` calls it; config: ``{"job": TrainJobConfig, "plan":
    TrainPlan}`` as ``configs.to_dict``).
    """
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray.train
    import ray.train.torch

    job, plan = from_dict(TrainJobConfig, config["job"]), from_dict(TrainPlan, config["plan"])
    hp = job.train
    batches = None if stream is None else split_batches(stream.torch(ray.train.torch.get_device()), hp.batch_size)
    run = ClipCapRun(job, plan)
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
    # lazy: safetensors.torch + torch ~6.7 s to import (python -X importtime)
    from clipcap_core.artifacts import save_model

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

"""What runs inside each Ray Train worker: model set-up, resume, the step loop, checkpoints, held-out metrics.

``train_loop(config)`` is the ``TorchTrainer`` loop of ``pipelines.train`` (the driver side). The
driver has already validated the tables, resolved the model config (``resolve_model_config``) and counted
the steps; the loop only trains. Rank 0 evaluates, writes checkpoints and saves the final artifact; every
worker calls ``ray.train.report`` at the same steps (equal data shards give equal batch counts).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipcap_core.configs import from_dict, to_dict
from pipelines import decap_train, storage, tables


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How the job runs (the hyperparameters are ``clipcap_core.training.TrainConfig``)."""

    checkpoint_every: int = 500  # steps; and at the end of every epoch
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    log_every: int = 50  # steps between progress lines / history rows
    eval_max_samples: int = 256  # held-out rows evaluated at the end of each epoch (rank 0)
    eval_every: int = 1  # epochs between held-out evaluations (the last epoch is always evaluated)
    prefetch_batches: int = 4
    shuffle_buffer: int = 0  # rows; 0: stream order (files are reshuffled every epoch)
    # How often Ray Train's controller polls the workers (Ray's default: 2 s). A report waits for the poll that
    # takes the previous one, so with 2 s every report costs up to 2 s, and a crash loses reports not yet taken.
    poll_interval_s: float = 0.25

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "keep_checkpoints", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")


# --- model set-up (driver and workers) ----------------------------------------------------------------------
def is_preset(model: str) -> bool:
    from clipcap_core.presets import PRESETS

    return model in PRESETS


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(d.get(p), dict):
            raise ValueError(f"model override {key!r}: {p!r} is not a config section")
        d = d[p]
    if last not in d:
        raise ValueError(f"model override {key!r}: unknown key {last!r} (known: {', '.join(sorted(d))})")
    d[last] = value


def resolve_model_config(model: str, overrides: dict[str, Any], info: tables.TableInfo) -> Any:
    """The ModelConfig to train: a preset (+ dotted overrides) or a saved artifact's, checked against the tables.

    A preset takes D and the CLIP model from the tables (they made the embeddings); an explicit ``clip_dim``
    override or an artifact with another D is a clear error, raised before any worker starts."""
    from clipcap_core.encoders import EncoderConfig
    from clipcap_core.model import ModelConfig
    from clipcap_core.presets import preset_config

    if is_preset(model):
        data = to_dict(preset_config(model))
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        if "clip_dim" in overrides:
            tables.check_model_dim(info, int(overrides["clip_dim"]), what="model config (clip_dim override)")
        data["clip_dim"] = info.dim
        if info.clip_model:
            data["encoder"] = to_dict(EncoderConfig(model_name=info.clip_model,
                                                    pretrained=info.clip_pretrained or None))
        return from_dict(ModelConfig, data)
    if overrides:
        raise ValueError(f"model overrides {sorted(overrides)} apply to presets only; {model!r} is an artifact "
                         "(warm start keeps its architecture)")
    cfg = read_artifact_config(model)
    tables.check_model_dim(info, cfg.clip_dim, what=f"model artifact {model}")
    if info.clip_model and cfg.encoder.model_name and info.clip_model != cfg.encoder.model_name:
        raise ValueError(f"CLIP mismatch: the embedding tables were made with {info.clip_model!r} but model artifact "
                         f"{model} was trained on {cfg.encoder.model_name!r} embeddings (same D, different space)")
    return cfg


def read_artifact_config(uri: str) -> Any:
    from clipcap_core.artifacts import read_config

    return read_config(uri)


def build_model(model: str, model_cfg: Any, *, seed: int, device: str | Any = "cpu") -> tuple[Any, Any]:
    """(ClipCapModel, tokenizer): a seeded new model for a preset, the saved one for an artifact (warm start)."""
    import torch

    if is_preset(model):
        from clipcap_core.model import build_model as core_build
        from clipcap_core.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_cfg.tokenizer_source)
        torch.manual_seed(seed)
        return core_build(model_cfg, tokenizer).to(device), tokenizer
    from clipcap_core.artifacts import load_model

    loaded = load_model(model, device=str(device))
    return loaded.model, loaded.tokenizer


def load_tokenizer_for(model: str, model_cfg: Any) -> Any:
    from clipcap_core.tokenizer import load_tokenizer

    if is_preset(model):
        return load_tokenizer(model_cfg.tokenizer_source)
    from clipcap_core.artifacts import read_metadata

    return load_tokenizer(storage.join(model, read_metadata(model)["weights"]["tokenizer"]))


class BatchTokenizer:
    """captions -> (tokens (B,T) int64, mask (B,T) float32), exactly as ``training.collate`` builds them
    (each caption's ids + end-of-text, at most ``max_tokens``, right-padded with the pad token), but with one
    batched call per block into the Rust tokenizer. Pickles as the Rust tokenizer alone, so the Ray Data tasks
    that run it never import transformers (seconds per fresh worker process)."""

    def __init__(self, tokenizer: Any, max_tokens: int):
        self.max_tokens = max_tokens
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend if backend is not None and hasattr(backend, "encode_batch_fast") else None
        self.tokenizer = None if self.backend is not None else tokenizer  # slow tokenizers: the HF call

    def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.backend is not None:  # no offsets, no BatchEncoding: ~2x the HF call
            ids = [e.ids for e in self.backend.encode_batch_fast(list(captions), add_special_tokens=False)]
        else:
            ids = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        T = min(self.max_tokens, max((len(x) for x in ids), default=0) + 1)
        tokens = np.full((len(ids), T), self.pad, dtype=np.int64)
        mask = np.zeros((len(ids), T), dtype=np.float32)
        for i, row in enumerate(ids):
            n = min(len(row), self.max_tokens - 1)
            tokens[i, :n] = row[:n]
            tokens[i, n] = self.eos  # every caption ends with end-of-text, a target too (generation learns to stop)
            mask[i, : n + 1] = 1.0
        return tokens, mask


class Primed:
    """Iterate ``iterable`` with its first item requested at once, in a background thread: the data stream
    starts (its tasks, workers, first blocks) while the model is being built and the checkpoint restored."""

    _END = object()

    def __init__(self, iterable: Any):
        import threading

        self._it, self._first, self._error = iter(iterable), self._END, None
        self._thread = threading.Thread(target=self._fetch, name="clipcap-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._it)
        except StopIteration:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            self._error = exc

    def __iter__(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not self._END:
            yield self._first
            yield from self._it


# --- evaluation (rank 0 each epoch; also used on saved artifacts) ----------------------------------------------
def evaluate_model(model: Any, tokenizer: Any, heldout: pa.Table, *, max_tokens: int = 40,
                   batch_size: int = 64) -> dict[str, float]:
    """Held-out loss + greedy-caption metrics (exact match, BLEU-4, CIDEr, CLIPScore) of ``model`` on ``heldout``
    (``clipcap_core.evaluation.heldout_metrics``, the code ``clipcap evaluate`` uses)."""
    from clipcap_core.clipscore import scorer_for
    from clipcap_core.training import collate, evaluate_captions, evaluate_loss

    captions = heldout.column("caption").to_pylist()
    emb = tables.embeddings_numpy(heldout)
    batches = (collate(tokenizer, captions[s: s + batch_size], emb[s: s + batch_size], max_tokens)
               for s in range(0, len(captions), batch_size))
    metrics = {"val_loss": evaluate_loss(model, batches)}
    scores = evaluate_captions(model, tokenizer, emb, captions, max_length=max_tokens, batch_size=batch_size,
                               clip_scorer=scorer_for(model.config.encoder, emb.shape[1]))
    metrics.update({k: float(v) for k, v in scores.items() if k != "n"})
    return metrics


def to_core_batch(batch: dict[str, Any]) -> Any:
    """A Ray Data batch (padded to max tokens) -> ``training.Batch`` trimmed to its longest caption."""
    from clipcap_core.training import Batch

    mask = batch["mask"]
    T = int(mask.sum(1).max())  # per-batch padding: drop columns that are padding in every row
    return Batch(batch["embedding"], batch["tokens"][:, :T], mask[:, :T])


# --- checkpoints ------------------------------------------------------------------------------------------------
def _trainable_state(model: Any) -> dict[str, Any]:
    """Weights that change in training: all but a frozen LM (rebuilt from its source on restore)."""
    frozen_lm = model.config.lm.freeze
    return {k: v for k, v in model.state_dict().items() if not (frozen_lm and k.startswith("lm."))}


def save_checkpoint(directory: str, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    import torch

    torch.save({"model": _trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, os.path.join(directory, "weights.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(state, f)


def load_checkpoint(checkpoint: Any, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore from a Ray checkpoint; returns its state (step, epoch, batch_in_epoch, attempt, history)."""
    import torch

    with checkpoint.as_directory() as d:
        blob = torch.load(os.path.join(d, "weights.pt"), map_location="cpu", weights_only=True)
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
    missing, unexpected = model.load_state_dict(blob["model"], strict=False)
    if unexpected or any(not k.startswith("lm.") for k in missing):
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return state


# --- the loop -------------------------------------------------------------------------------------------------
def _maybe_crash(fault: dict[str, Any] | None, rank: int, step: int) -> None:
    """Fault-injection hook (``TrainJobConfig.fault``): exit this worker process hard, once."""
    if fault and rank == fault["rank"] and step == fault["crash_at_step"] and not storage.exists(fault["marker"]):
        storage.write_json({"step": step, "rank": rank, "pid": os.getpid()}, fault["marker"])
        print(f"[clipcap train] fault injection: worker rank {rank} exits at step {step}", flush=True)
        os._exit(1)


class _Run:
    """Per-worker run state: reporting (+ rank-0 checkpoints), progress lines, epoch ends, history rows."""

    def __init__(self, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                 ctx: dict[str, Any]):
        self.model, self.tokenizer, self.optimizer, self.scheduler, self.state = (
            model, tokenizer, optimizer, scheduler, state)
        self.rank, self.world, self.hp, self.heldout = ctx["rank"], ctx["world"], ctx["hp"], ctx["heldout"]
        self.total_steps, self.eval_every = ctx["total_steps"], ctx["eval_every"]
        self.metrics: dict[str, float] = {}
        self.window: list[float] = []
        self.start_epoch()

    def start_epoch(self) -> None:
        self.losses: list[float] = []
        self.seen, self.wait = 0, 0.0
        self.t_epoch = self.t_window = time.perf_counter()

    def report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        import ray.train

        name = f"checkpoint_{self.state['step']:08d}"
        if checkpoint and self.rank == 0:
            with tempfile.TemporaryDirectory(prefix="clipcap-ckpt-") as d:
                save_checkpoint(d, self.model, self.optimizer, self.scheduler, self.state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
        else:
            ray.train.report(metrics, checkpoint_dir_name=name if checkpoint else None)

    def log_step(self) -> None:
        st = self.state
        if self.rank != 0 or not self.window:
            return
        now = time.perf_counter()
        rate = len(self.window) * self.hp.batch_size * self.world / max(now - self.t_window, 1e-9)
        row = {"kind": "step", "step": st["step"], "epoch": st["epoch"], "train_loss": float(np.mean(self.window)),
               "lr": float(self.scheduler.get_last_lr()[0]), "samples_per_s": rate, "attempt": st["attempt"]}
        st["history"].append(row)
        print(f"[clipcap train] epoch {st['epoch'] + 1} step {st['step']}/{self.total_steps} "
              f"loss {row['train_loss']:.4f} lr {row['lr']:.2e} {rate:.1f} samples/s (attempt {st['attempt']})",
              flush=True)
        self.window, self.t_window = [], now

    def end_epoch(self) -> None:
        """Held-out metrics (rank 0), a history row, a checkpoint; every worker reports at the same step."""
        st = self.state
        elapsed = time.perf_counter() - self.t_epoch
        st["epoch"] += 1
        due = st["epoch"] % self.eval_every == 0 or st["epoch"] == self.hp.epochs
        fresh: dict[str, float] = {}
        if due and self.heldout is not None and self.heldout.num_rows:
            fresh = self.metrics = evaluate_model(self.model, self.tokenizer, self.heldout,
                                                  max_tokens=self.hp.max_caption_tokens)
        if self.rank == 0:
            row = {"kind": "epoch", "step": st["step"], "epoch": st["epoch"], "attempt": st["attempt"],
                   "train_loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                   "samples_per_s": self.seen * self.world / max(elapsed, 1e-9), "samples": self.seen * self.world,
                   "seconds": elapsed, "data_wait_s": self.wait, **fresh}
            st["history"].append(row)
            print(f"[clipcap train] epoch {st['epoch']}/{self.hp.epochs} done: " + " ".join(
                f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
        self.report({"step": st["step"], "epoch": st["epoch"], **fresh}, checkpoint=True)
        self.start_epoch()


def _setup(config: dict[str, Any]) -> tuple[Any, ...]:
    """Model, optimizer, restored state, held-out set of this worker (the loop's first half)."""
    import ray.train
    import ray.train.torch
    import torch

    from clipcap_core.model import ModelConfig
    from clipcap_core.training import TrainConfig, make_optimizer_and_scheduler

    job, plan = config["job"], config["plan"]
    hp = from_dict(TrainConfig, job["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if job["scale"]["torch_threads"]:
        torch.set_num_threads(int(job["scale"]["torch_threads"]))
    device = ray.train.torch.get_device()
    model, tokenizer = build_model(job["model"], from_dict(ModelConfig, plan["model_config"]), seed=hp.seed,
                                   device=device)
    optimizer, scheduler = make_optimizer_and_scheduler(model, hp, plan["total_steps"])
    ckpt = ray.train.get_checkpoint()
    state = (load_checkpoint(ckpt, model, optimizer, scheduler) if ckpt else
             {"step": 0, "epoch": 0, "attempt": 0, "history": []})
    state["attempt"] += 1
    if rank == 0 and ckpt:
        state["history"].append({"kind": "resume", "step": state["step"], "epoch": state["epoch"],
                                 "attempt": state["attempt"]})
        print(f"[clipcap train] resumed from step {state['step']} (epoch {state['epoch'] + 1}), "
              f"attempt {state['attempt']}", flush=True)
    torch.manual_seed(hp.seed * 1000 + 100 * state["attempt"] + rank)  # dropout: per worker and attempt
    heldout = None
    if rank == 0 and job["heldout_fraction"] > 0:
        split = tables.Split(part="heldout", heldout_fraction=job["heldout_fraction"], salt=job["split_salt"])
        heldout = tables.read_split(plan["files"], split, max_rows=job["run"]["eval_max_samples"],
                                    column=decap_train.embedding_column(job["decoder"]))
    opts = from_dict(RunOptions, job["run"])
    run = _Run(model, tokenizer, optimizer, scheduler, state, {"rank": rank, "world": world, "hp": hp,
               "heldout": heldout, "total_steps": plan["total_steps"], "eval_every": opts.eval_every})
    return run, device


def train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """The per-worker loop run by ``TorchTrainer`` (config: ``{"job": TrainJobConfig dict, "plan": ...}``).

    The worker's data shard is one stream over every remaining epoch; epochs end at ``epoch_ends`` (the
    last one when the stream ends, at ``total_steps``). After a restart the batches before the restored step are
    skipped (read, not trained on)."""
    import ray.train
    import ray.train.torch
    import torch

    from clipcap_core.training import TrainConfig, make_scaler, train_step

    job, plan = config["job"], config["plan"]
    opts = from_dict(RunOptions, job["run"])
    hp = from_dict(TrainConfig, job["train"])
    done = plan["stream_start_epoch"] >= hp.epochs
    batches = None if done else Primed(ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=hp.batch_size, device=ray.train.torch.get_device(), prefetch_batches=opts.prefetch_batches,
        local_shuffle_buffer_size=opts.shuffle_buffer or None,
        dtypes={"embedding": torch.float32, "tokens": torch.int64, "mask": torch.float32}))
    run, device = _setup(config)
    state, ends = run.state, plan["epoch_ends"]
    noise = float(job["decap"]["noise_std"]) if job["decoder"] == "decap" else 0.0
    net = ray.train.torch.prepare_model(run.model, move_to_device=False) if run.world > 1 else run.model
    scaler = make_scaler(hp, device)
    if state["epoch"] < hp.epochs and batches is not None:
        skip = state["step"] - plan["stream_first_step"]
        if skip < 0:
            raise RuntimeError(f"restored step {state['step']} precedes the data stream (epoch "
                               f"{plan['stream_start_epoch']}); rerun the job to rebuild the stream")
        run.start_epoch()
        t_ready = time.perf_counter()
        for i, batch in enumerate(batches):
            run.wait += time.perf_counter() - t_ready  # blocked on the data pipeline (input-bound if large)
            if i >= skip:
                core = to_core_batch(batch)
                if noise:  # CapDec: the decoder learns to caption from near, not exact, text embeddings
                    core.embeds = decap_train.add_noise(core.embeds, noise)
                loss = train_step(net, core, run.optimizer, run.scheduler, hp, scaler)
                run.losses.append(loss)
                run.window.append(loss)
                run.seen += int(batch["tokens"].shape[0])
                state["step"] += 1
                _maybe_crash(job.get("fault"), run.rank, state["step"])
                if state["step"] % opts.log_every == 0:
                    run.log_step()
                if state["epoch"] < len(ends) and state["step"] == ends[state["epoch"]]:
                    run.end_epoch()
                elif state["step"] % opts.checkpoint_every == 0:
                    run.report({"step": state["step"], "epoch": state["epoch"], "train_loss": loss}, checkpoint=True)
            t_ready = time.perf_counter()
        if state["epoch"] < hp.epochs:  # the last epoch ends with the stream
            run.end_epoch()
    if run.rank != 0:
        return None
    return _finish(job, plan, run.model, run.tokenizer, state, run.metrics)


def _finish(job: dict[str, Any], plan: dict[str, Any], model: Any, tokenizer: Any, state: dict[str, Any],
            metrics: dict[str, float]) -> dict[str, Any]:
    """Rank 0: the final model artifact (with its training provenance) and the loop's return value."""
    from clipcap_core.artifacts import save_model

    artifact = storage.join(job["output"], job["name"], "model")
    memory = None
    if job["decoder"] == "decap":  # seeded, so a resumed run stores the same memory
        split = tables.Split(part="train", heldout_fraction=job["heldout_fraction"], salt=job["split_salt"])
        memory = decap_train.build_memory(from_dict(decap_train.DecapOptions, job["decap"]), plan["files"], split)
    save_model(model, tokenizer, artifact, metrics=metrics, decap=memory, extra={"training": {
        "run": job["name"], "step": state["step"], "epochs": state["epoch"], "tables": plan["files"],
        "replay": plan["replay"], "replay_fraction": job["replay_fraction"], "init": job["model"],
        "train": job["train"], "decoder": job["decoder"], "decap": job["decap"] if memory is not None else None}})
    return {"artifact": artifact, "history": state["history"], "metrics": metrics}

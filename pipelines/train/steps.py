"""The step loop every Ray Train worker runs (``clipcap train`` and ``train-clip``): restore, steps, progress,
history rows, checkpoints, epoch ends with held-out metrics, the fault-injection hook.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from clipcap_core import uris
from clipcap_core.training import NonFiniteError, batch_rows_note
from pipelines.io import storage
from pipelines.train.checkpoints import checkpoint_name, load_checkpoint, save_checkpoint
from pipelines.train.state import (
    FaultConfig,
    RunState,
    StepPlan,
    StreamSpec,
)


def split_batches(batches: Iterable[dict[str, Any]], size: int) -> Iterator[dict[str, Any]]:
    """Cut each batch of ``batches`` (columns of equal length) into consecutive batches of ``size`` rows."""
    for batch in batches:
        n = len(next(iter(batch.values())))
        if n <= size:
            yield batch
            continue
        for s in range(0, n, size):
            yield {k: v[s: s + size] for k, v in batch.items()}


def loss_health(history: list[dict[str, Any]], total_steps: int, *, after: float = 0.5,
                min_drop: float = 0.02) -> dict[str, Any]:
    """Did the training loss fall (by ``min_drop``, relative)? The mean logged loss of the run's first tenth
    against the mean past ``after`` of it; ``{}`` when the history is too short to tell."""
    rows = [(r["step"], r["train_loss"]) for r in history if r.get("kind") == "step"
            and np.isfinite(r.get("train_loss", np.nan))]
    if len(rows) < 2:
        rows = [(r["step"], r["train_loss"]) for r in history if r.get("kind") == "epoch"
                and np.isfinite(r.get("train_loss", np.nan))]
    if len(rows) < 2:
        return {}
    early = [loss for s, loss in rows if s <= max(0.1 * total_steps, rows[0][0])]
    late = [loss for s, loss in rows if s >= after * total_steps and s > rows[0][0]]
    if not early or not late:
        return {}
    first, last = float(np.mean(early)), float(np.mean(late))
    out: dict[str, Any] = {"loss_fell": last < first * (1 - min_drop), "early_loss": first, "late_loss": last}
    if not out["loss_fell"]:
        out["warning"] = (f"training loss did not fall: {first:.4f} in the first tenth of the run, {last:.4f} "
                          f"past {after:.0%} of it (check the learning rate, warm-up and data)")
    return out


def maybe_crash(fault: FaultConfig | None, rank: int, step: int) -> None:
    """Fault-injection hook (the job's ``fault``): exit this worker process hard, once."""
    if fault and rank == fault.rank and step == fault.crash_at_step and not uris.exists(fault.marker):
        storage.write_json({"step": step, "rank": rank, "pid": os.getpid()}, fault.marker)
        say(f"[clipcap train] fault injection: worker rank {rank} exits at step {step}")
        os._exit(1)


def say(line: str) -> None:
    """A worker's progress line on stderr (Ray Train's patched ``print`` would show it twice)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Board:
    """The latest step, samples and loss of a run (a Ray actor): rank 0 posts, the driver's progress line reads."""

    def __init__(self) -> None:
        self.latest: dict[str, float] = {}

    def post(self, row: dict[str, float]) -> None:
        self.latest = row

    def read(self) -> dict[str, float]:
        return self.latest


POST_EVERY_S = 1.0  # rank 0 posts at most this often (one fire-and-forget actor call)


def stream_batches(spec: StreamSpec, device: Any) -> Iterable[dict[str, Any]]:
    """This worker's shard of the ``train`` dataset as tensors of the spec's dtypes on ``device``."""
    return ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=spec.rows, prefetch_batches=spec.prefetch_batches, drop_last=spec.drop_last,
        local_shuffle_buffer_size=spec.shuffle_buffer or None, device=device,
        dtypes={k: getattr(torch, v) for k, v in spec.dtypes.items()}, pin_memory=torch.device(device).type == "cuda")


class WorkerRun:
    """Per-worker run state: restore, reporting (+ rank-0 checkpoints), progress lines, epoch ends, history rows."""

    label: ClassVar[str] = "train"  # in progress lines: [clipcap <label>]
    unit: ClassVar[str] = "samples"  # in progress lines: <rate> <unit>/s
    epoch_samples: ClassVar[bool] = True  # epoch rows carry "samples" (all workers)
    may_miss: ClassVar[str | None] = None  # weight-name prefix a checkpoint may leave out (see checkpoint_weights)
    board: Any = None  # the run's Board actor, where rank 0 posts its progress

    model: Any
    optimizer: Any
    scheduler: Any

    def __init__(self, job: Any, plan: StepPlan, board: Any = None):
        """``job``: a ``TrainJobConfig`` or ``ClipTrainJobConfig`` (its ``train``, ``run``, ``scale``, ``fault``)."""
        self.job, self.hp, self.plan, self.board = job, job.train, plan, board
        self.opts, self.fault = job.run, job.fault
        self.epochs, self.batch_size = job.train.epochs, job.train.batch_size
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if job.scale.torch_threads:
            torch.set_num_threads(int(job.scale.torch_threads))
        self.device = ray.train.torch.get_device()
        self.state = RunState()
        self.metrics: dict[str, float] = {}  # the latest held-out metrics
        self.window: list[float] = []  # losses since the last progress line
        self.failure: str | None = None  # why the run stopped early (a non-finite loss or gradient)
        self._posted = 0.0  # when rank 0 last posted to the board
        self.start_epoch()

    def resume(self) -> bool:
        """Restore the latest checkpoint Ray hands this worker group (if any) and count this attempt."""
        ckpt = ray.train.get_checkpoint()
        if ckpt:
            self.state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, may_miss=self.may_miss)
        st = self.state
        st.attempt += 1
        if ckpt and self.rank == 0:
            st.history.append({"kind": "resume", "step": st.step, "epoch": st.epoch, "attempt": st.attempt})
            say(f"[clipcap {self.label}] resumed from step {st.step} (epoch {st.epoch + 1}), attempt {st.attempt}")
        return bool(ckpt)

    def checkpoint_weights(self) -> dict[str, Any]:
        return self.model.state_dict()

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics at an epoch end where they are due ({} where there is no held-out set)."""
        raise NotImplementedError

    def start_epoch(self) -> None:
        self.losses: list[float] = []
        self.seen, self.wait = 0, 0.0
        self.t_epoch = self.t_window = time.perf_counter()

    def report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        name = checkpoint_name(self.state.step)
        if checkpoint and self.rank == 0:
            with tempfile.TemporaryDirectory(prefix=f"clipcap-{self.label}-ckpt-") as d:
                save_checkpoint(d, self.checkpoint_weights(), self.optimizer, self.scheduler, self.state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
        else:
            ray.train.report(metrics, checkpoint_dir_name=name if checkpoint else None)

    def post_progress(self, force: bool = False) -> None:
        """Rank 0: step, samples and recent loss to the board; ``force`` (an epoch's end) waits for it to land."""
        now = time.monotonic()
        if self.rank != 0 or self.board is None or (not force and now - self._posted < POST_EVERY_S):
            return
        self._posted, st = now, self.state
        loss = float(np.mean(self.losses[-20:])) if self.losses else float("nan")
        posted = self.board.post.remote({"step": st.step, "samples": st.step * self.batch_size * self.world, "loss": loss})
        if force:
            try:
                ray.get(posted, timeout=10)
            except Exception:  # noqa: BLE001 - progress must never fail training
                pass

    def log_step(self) -> None:
        if self.rank != 0 or not self.window:
            return
        now, st = time.perf_counter(), self.state
        rate = len(self.window) * self.batch_size * self.world / max(now - self.t_window, 1e-9)
        row = {"kind": "step", "step": st.step, "epoch": st.epoch, "train_loss": float(np.mean(self.window)),
               "lr": float(self.scheduler.get_last_lr()[0]), "samples_per_s": rate, "attempt": st.attempt}
        st.history.append(row)
        say(f"[clipcap {self.label}] epoch {st.epoch + 1} step {st.step}/{self.plan.total_steps} "
            f"loss {row['train_loss']:.4f} lr {row['lr']:.2e} {rate:.1f} {self.unit}/s (attempt {st.attempt})")
        self.window, self.t_window = [], now

    def end_epoch(self) -> None:
        """Held-out metrics (rank 0), a history row, a checkpoint; every worker reports at the same step."""
        st = self.state
        elapsed = time.perf_counter() - self.t_epoch
        st.epoch += 1
        fresh: dict[str, float] = {}
        if st.epoch % self.opts.eval_every == 0 or st.epoch == self.epochs:
            fresh = self.evaluate()
            if fresh:
                self.metrics = fresh
        if self.rank == 0:
            samples = {"samples": self.seen * self.world} if self.epoch_samples else {}
            row = {"kind": "epoch", "step": st.step, "epoch": st.epoch, "attempt": st.attempt,
                   "train_loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                   "samples_per_s": self.seen * self.world / max(elapsed, 1e-9), **samples,
                   "seconds": elapsed, "data_wait_s": self.wait, **fresh}
            st.history.append(row)
            say(f"[clipcap {self.label}] epoch {st.epoch}/{self.epochs} done: " + " ".join(
                f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
        self.post_progress(force=True)
        self.report({"step": st.step, "epoch": st.epoch, **fresh}, checkpoint=True)
        self.start_epoch()


def run_steps(run: WorkerRun, batches: Iterable[dict[str, Any]] | None, step: Callable[[dict[str, Any]], float],
              *, skip: int) -> None:
    """Train ``run`` on ``batches`` until ``plan.total_steps``; the first ``skip`` batches are read, not trained on
    (a restarted run's stream starts before its restored step)."""
    st, plan, opts = run.state, run.plan, run.opts
    if st.epoch >= run.epochs or batches is None:
        return
    if skip < 0:
        raise RuntimeError(f"restored step {st.step} precedes the data stream (epoch {plan.stream_start_epoch}); "
                           "rerun the job to rebuild the stream")
    ends = plan.epoch_ends
    run.start_epoch()
    t_ready = time.perf_counter()
    for i, batch in enumerate(batches):
        run.wait += time.perf_counter() - t_ready  # blocked on the data pipeline (input-bound if large)
        if st.step >= plan.total_steps:
            break
        if i >= skip:
            try:
                loss = step(batch)
            except NonFiniteError as exc:  # weights untouched; every worker sees the same all-reduced gradient
                run.failure = f"stopped at step {st.step + 1}: {exc}"
                if "embedding" in batch:
                    run.failure += batch_rows_note(batch["embedding"])
                say(f"[clipcap {run.label}] {run.failure}")
                return
            run.losses.append(loss)
            run.window.append(loss)
            run.seen += int(batch["tokens"].shape[0])
            st.step += 1
            maybe_crash(run.fault, run.rank, st.step)
            run.post_progress()
            if st.step % opts.log_every == 0:
                run.log_step()
            if st.epoch < len(ends) and st.step == ends[st.epoch]:
                run.end_epoch()
            elif st.step % opts.checkpoint_every == 0:
                run.report({"step": st.step, "epoch": st.epoch, "train_loss": loss}, checkpoint=True)
        t_ready = time.perf_counter()
    if st.epoch < run.epochs:  # the last epoch ends with the stream
        run.end_epoch()

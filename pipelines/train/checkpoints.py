"""Training checkpoints, shared by ``clipcap train`` and ``train-clip``: the file format, restore, and the data
stream of a (re)started run.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from clipcap_core.configs import to_dict
from pipelines.io import storage
from pipelines.train.state import RunState

T = TypeVar("T")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def save_checkpoint(directory: str, weights: dict[str, Any], optimizer: Any, scheduler: Any, state: RunState
                    ) -> None:
    """Write ``weights`` (possibly partial), the optimizer, the scheduler and ``state`` into ``directory``."""
    torch.save({"model": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(directory, "weights.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(to_dict(state), f)


def load_checkpoint(checkpoint: Any, model: Any, optimizer: Any, scheduler: Any, *, may_miss: str | None = None
                    ) -> RunState:
    """Restore model, optimizer and scheduler from a Ray checkpoint; returns its ``RunState``."""
    with checkpoint.as_directory() as d:
        blob = torch.load(os.path.join(d, "weights.pt"), map_location="cpu", weights_only=True)
        with open(os.path.join(d, "state.json")) as f:
            state = RunState.from_checkpoint(json.load(f))
    try:
        missing, unexpected = model.load_state_dict(blob["model"], strict=False)
    except RuntimeError as exc:  # shapes that do not fit (another --model)
        raise RuntimeError(f"checkpoint does not fit the model: {exc}") from exc
    if unexpected or any(not (may_miss and k.startswith(may_miss)) for k in missing):
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return state


def stored_checkpoint_steps(run_dir: str) -> list[int]:
    """Steps of this run's checkpoints in storage (Ray restores the latest registered one, among them)."""
    steps = []
    for uri in storage.list_files(run_dir, "/state.json", recursive=True):
        if posixpath.basename(posixpath.dirname(uri)).startswith("checkpoint_"):
            steps.append(int((storage.read_json(uri) or {}).get("step", 0)))
    return steps


def stream_plan(run_dir: str, epochs: int, stream_steps: Callable[[int], int]) -> dict[str, Any]:
    """The step fields of a ``StepPlan``: one stream over every remaining epoch, ending exactly at total_steps; a
    restarted run streams from the latest epoch whose stream reaches back to the earliest stored checkpoint.
    ``stream_steps(e)``: batches per worker in a stream of epochs ``e``..``epochs - 1``."""
    total, stored = stream_steps(0), stored_checkpoint_steps(run_dir)
    start = max(e for e in range(epochs + 1) if total - stream_steps(e) <= min(stored)) if stored else 0
    return {"total_steps": total, "epoch_ends": tuple(round(e * total / epochs) for e in range(1, epochs)),
            "stream_start_epoch": start, "stream_first_step": total - stream_steps(start)}


def epoch_order(items: Sequence[T], seed: int, first_epoch: int, epochs: int) -> list[tuple[T, int]]:
    """(item, epoch) for epochs ``first_epoch``..``epochs - 1``, the items reshuffled per epoch (seeded)."""
    out = []
    for epoch in range(first_epoch, epochs):
        order = list(items)
        random.Random(seed * 1000 + epoch).shuffle(order)
        out += [(x, epoch) for x in order]
    return out

"""Training checkpoints, shared by ``clipcap train`` and ``train-clip``: the file format, restore, and where a
resumed run's data stream starts.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from typing import Any

from clipcap_core.configs import to_dict
from pipelines.io import storage
from pipelines.train.state import RunState


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def save_checkpoint(directory: str, weights: dict[str, Any], optimizer: Any, scheduler: Any, state: RunState
                    ) -> None:
    """Write ``weights`` (a state dict, possibly partial: see ``load_checkpoint``'s ``may_miss``), the optimizer,
    the scheduler and ``state`` into the local folder ``directory``."""
    # lazy: torch ~6.7 s to import (python -X importtime)
    import torch

    torch.save({"model": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(directory, "weights.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(to_dict(state), f)


def load_checkpoint(checkpoint: Any, model: Any, optimizer: Any, scheduler: Any, *, may_miss: str | None = None
                    ) -> RunState:
    """Restore model, optimizer and scheduler from a Ray checkpoint; returns its ``RunState``."""
    # lazy: torch ~6.7 s to import (python -X importtime)
    import torch

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
    """Steps of this run's checkpoints in storage. Ray restores the latest *registered* one, which is among
    them, so a stream starting at or before the earliest covers it; the loop skips batches up to its step."""
    steps = []
    for uri in storage.list_files(run_dir, "/state.json", recursive=True):
        if posixpath.basename(posixpath.dirname(uri)).startswith("checkpoint_"):
            steps.append(int((storage.read_json(uri) or {}).get("step", 0)))
    return steps


def stream_start(run_dir: str, epochs: int, stream_steps: Callable[[int], int]) -> tuple[int, int]:
    """(first epoch, first step) of the data stream of a (re)started run: the latest epoch whose stream still
    reaches back to the earliest stored checkpoint, so it is never skipped past; (0, 0) for a new run.
    ``stream_steps(e)``: batches per worker in a stream of epochs ``e``..``epochs - 1``."""
    stored = stored_checkpoint_steps(run_dir)
    if not stored:
        return 0, 0
    total = stream_steps(0)
    start = max(e for e in range(epochs + 1) if total - stream_steps(e) <= min(stored))
    return start, total - stream_steps(start)

"""The typed configs, plans and run state a training driver sends its Ray Train workers (``train``, ``train-clip``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from clipcap_core.configs import from_dict


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How the job runs (the hyperparameters are ``TrainConfig`` / ``ClipTrainConfig``)."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {
        "keep_checkpoints": None, "eval_max_samples": None, "eval_every": None, "prefetch_batches": None,
        "shuffle_buffer": None, "poll_interval_s": None,
    }
    checkpoint_every: int = 500  # steps between checkpoints (and every epoch)
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    log_every: int = 50  # steps between progress lines (and history rows)
    eval_max_samples: int = 256  # held-out rows evaluated at the end of each epoch (rank 0)
    eval_every: int = 1  # epochs between held-out evaluations (the last epoch is always evaluated)
    prefetch_batches: int = 4
    shuffle_buffer: int = 0  # rows; 0: stream order (files are reshuffled every epoch)
    # Ray Train's controller poll (its default 2 s): each report waits for it, and a crash loses those not taken
    poll_interval_s: float = 0.25

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "keep_checkpoints", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class ScaleConfig:
    """Ray Train workers and what each reserves and runs; ``None`` / 0: sized from the cluster (``size_workers``)."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"num_workers": "--workers", "use_gpu": "--gpu",
                                                  "gpus_per_worker": None}
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool | None = None
    """one GPU per worker (default: when the cluster has one for each worker; --no-gpu: CPU)"""
    cpus_per_worker: float = 0.0
    """Ray CPUs reserved per worker (0: the node's cores less one for the data tasks, shared by its workers; GPU:
    1)"""
    gpus_per_worker: float = 1.0  # with use_gpu
    torch_threads: int = 0
    """torch threads per worker (0: CPU, the node's cores less one, shared by its workers; GPU, Ray's default)"""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"scale.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker <= 0 or self.torch_threads < 0:
            raise ValueError("scale.cpus_per_worker and torch_threads must be >= 0 (0: sized from the cluster) and "
                             f"gpus_per_worker > 0, got {self.cpus_per_worker}, {self.torch_threads}, "
                             f"{self.gpus_per_worker}")


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Test hook: worker ``rank`` exits hard (``os._exit``) once when it reaches ``crash_at_step``."""

    crash_at_step: int
    marker: str
    rank: int = 0


def check_heldout_fraction(fraction: float) -> None:
    """Both jobs hold out a key-hash share of their data: it must leave some to train on."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """The step plan both jobs share, decided on the driver before any worker starts."""

    n_train: int  # training rows / pairs (all workers)
    total_steps: int
    epoch_ends: tuple[int, ...]  # steps at which epochs 1..E-1 end
    stream_start_epoch: int = 0
    stream_first_step: int = 0


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """How a worker reads its shard of the ``train`` stream (``steps.stream_batches``)."""

    rows: int  # rows per Ray Data batch
    prefetch_batches: int  # Ray Data batches
    dtypes: dict[str, str]  # column -> torch dtype name ("float32", "int64", "uint8")
    shuffle_buffer: int = 0  # rows; 0: stream order
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.rows < 1 or self.prefetch_batches < 1:
            raise ValueError(f"stream rows and prefetch_batches must be >= 1, got {self.rows}, "
                             f"{self.prefetch_batches}")


@dataclass(kw_only=True)
class RunState:
    """A worker's progress, stored in every checkpoint (``state.json``); ``history`` rows become history.json."""

    step: int = 0
    epoch: int = 0  # epochs finished
    attempt: int = 0  # worker-group starts of this run, this one included (set on start)
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any]) -> RunState:
        """A stored ``state.json``: an unknown or missing key fails, naming it."""
        return from_dict(cls, data)

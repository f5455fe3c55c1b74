"""What a training driver and its Ray Train workers share (``clipcap train`` and ``train-clip``): the typed
configs and plans sent to the workers, and the worker entry that starts the worker's data stream before the job's
loop module is imported (``EarlyStream``). Imports no more than ``clipcap_core.configs``, so that start is early.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from clipcap_core.configs import from_dict


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How the job runs (the hyperparameters are ``TrainConfig`` / ``ClipTrainConfig``). ``CLI_FLAGS``: the fields
    that are not flags of the training commands (``pipelines.commands.flags``)."""

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
    # How often Ray Train's controller polls the workers (Ray's default: 2 s). A report waits for the poll that
    # takes the previous one, so with 2 s every report costs up to 2 s, and a crash loses reports not yet taken.
    poll_interval_s: float = 0.25

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "keep_checkpoints", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class ScaleConfig:
    """Ray Train workers and what each reserves and runs. ``None`` / 0 = sized from the cluster when the job
    starts (``runner.size_workers``); an explicit value wins. ``CLI_FLAGS``: the flags of the training commands
    named otherwise (``pipelines.commands.flags``)."""

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
    """How a worker reads its shard of the ``train`` stream (``launch.EarlyStream``), decided on the driver so the
    worker can start the stream before it imports its loop."""

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


def worker_entry(config: dict[str, Any]) -> Any:
    """The function ``TorchTrainer`` runs: ``config["loop"]`` (``"module:function"``) called with ``config`` and
    the worker's ``EarlyStream`` (started here, before the loop's module is imported)."""
    spec = config.get("stream")
    batches = EarlyStream(from_dict(StreamSpec, spec)) if spec else None
    module, _, name = str(config["loop"]).partition(":")
    loop = getattr(importlib.import_module(module), name)
    from pipelines.train.steps import attach_board  # after the stream started (steps imports torch)

    attach_board(config.get("progress"))  # rank 0 posts its step there for the driver's progress line
    return loop(config, batches)


class EarlyStream:
    """This worker's shard of the ``train`` dataset as numpy batches of ``spec.rows`` rows, with the shard and its
    first batch requested at once in a background thread; ``torch(device)`` iterates it as tensors."""

    _END = object()

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self._it: Iterator[dict[str, Any]] | None = None
        self._first: Any = self._END
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="clipcap-stream-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            import ray.train

            s = self.spec
            self._it = iter(ray.train.get_dataset_shard("train").iter_batches(
                batch_size=s.rows, batch_format="numpy", prefetch_batches=s.prefetch_batches,
                drop_last=s.drop_last, local_shuffle_buffer_size=s.shuffle_buffer or None))
            self._first = next(self._it)
        except StopIteration:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            self._error = exc

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The numpy batches, in stream order (the first one already fetched)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not self._END:
            first, self._first = self._first, self._END
            yield first
            assert self._it is not None
            yield from self._it

    def torch(self, device: Any) -> Iterator[dict[str, Any]]:
        """The batches as tensors of the spec's dtypes on ``device``: zero-copy on CPU (numpy arrays of the same
        dtype), through pinned memory and an asynchronous copy on CUDA."""
        # lazy: torch ~6.7 s to import (python -X importtime)
        import torch

        # Arrays out of the object store are read-only; the step never writes to its batch, and a copy would cost
        # memory, so torch's warning about it is silenced (as Ray's own iter_torch_batches does).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        dtypes = {k: getattr(torch, v) for k, v in self.spec.dtypes.items()}
        cuda = torch.device(device).type == "cuda"
        for batch in self:
            out = {}
            for k, v in batch.items():
                t = torch.as_tensor(v, dtype=dtypes.get(k))
                out[k] = t.pin_memory().to(device, non_blocking=True) if cuda else t
            yield out

"""What Ray Train runs first in each worker of ``clipcap train`` and ``train-clip``: the worker's data stream is
started before the job's loop module is imported.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from clipcap_core.configs import from_dict
from pipelines.train.state import StreamSpec


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

"""The row format of embed, embed-text and caption: Arrow tables from read tasks via CLIP to the committer."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

PIXELS, EMBEDDING, TEXT_EMBEDDING, ERROR, CAPTION, TRUNCATED = (
    "pixels", "embedding", "text_embedding", "error", "caption", "truncated")


class Clock:
    """Wall and process-CPU seconds since the last lap (the timing columns of every stage)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def with_time(table: pa.Table, stage: str, lap: tuple[float, float]) -> pa.Table:
    n = len(table)
    for prefix, value in zip(("t_", "cpu_"), lap, strict=True):
        table = table.append_column(prefix + stage, pa.array([value / n] * n if n else [], type=pa.float64()))
    return table


def binary_rows(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[bytes]]:
    """Indices of the non-empty values of a binary column, and those values."""
    values = col.to_pylist()
    idx = np.array([i for i, v in enumerate(values) if v], dtype=np.int64)
    return idx, [values[i] for i in idx]


def vectors(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A binary column of float32 vectors (every value non-empty) as (N, dim) float32."""
    return np.frombuffer(b"".join(col.to_pylist()), dtype=np.float32).reshape(-1, dim)


def vector_dim(col: pa.ChunkedArray | pa.Array) -> int | None:
    """D of the first non-empty float32 vector of a binary column (None: no row has one)."""
    return next((len(v) // 4 for v in col.to_pylist() if v), None)

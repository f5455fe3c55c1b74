"""The one CLIP actor of embed, embed-text and caption (images and / or captions)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from clipcap_core import encoders
from clipcap_core.encoders import EncoderConfig
from pipelines import rows, runtime


class ClipActor:
    """Ray Data callable class: one CLIP loaded once, embedding the images and / or captions of row batches."""

    def __init__(self, encoder: EncoderConfig, *, precision: str = "fp32", use_gpu: bool = False, threads: int = 0,
                 images: bool = True, texts: bool = False, count_truncated: bool = False):
        # lazy: open_clip + torch ~12.6 s to import (python -X importtime); decode tasks import this module
        import torch

        from clipcap_core.encoders import load_encoder

        self.encoder = load_encoder(encoder, device=runtime.actor_device(use_gpu, threads), precision=precision)
        self.call_threads = runtime.CallThreads(threads)
        if not images:  # text only: the image tower's weights are not kept
            self.encoder.model.visual = torch.nn.Identity()
        self.images, self.texts, self.count_truncated = images, texts, count_truncated
        size = self.encoder.spec.size
        self.hw = (size, size) if isinstance(size, int) else tuple(size)

    @cached_property
    def tokenizer(self) -> Any:
        return encoders._open_clip().get_tokenizer(self.encoder.model_name)

    def __call__(self, table: pa.Table) -> pa.Table:
        self.call_threads()  # each of a shared actor's call threads runs the plan's torch threads
        clock = rows.Clock()
        if self.images:
            table = self._images(table)
        if self.texts:
            table = self._texts(table)
        return rows.with_time(table, "clip", clock.lap())

    def _images(self, table: pa.Table) -> pa.Table:
        idx, blobs = rows.binary_rows(table.column(rows.PIXELS))
        has = rows.EMBEDDING in table.column_names
        emb = table.column(rows.EMBEDDING).to_pylist() if has else [b""] * len(table)
        if len(idx):
            pixels = np.stack([np.frombuffer(b, dtype=np.uint8) for b in blobs]).reshape(len(idx), *self.hw, 3)
            out = self.encoder.encode_pixels(pixels)  # (B, D) float32
            for j, i in enumerate(idx):
                emb[i] = out[j].tobytes()
        table = table.drop_columns([rows.PIXELS, rows.EMBEDDING] if has else [rows.PIXELS])
        return table.append_column(rows.EMBEDDING, pa.array(emb, type=pa.binary()))

    def _texts(self, table: pa.Table) -> pa.Table:
        ok = np.array([not e for e in table.column(rows.ERROR).to_pylist()], dtype=bool)
        captions = table.column(rows.CAPTION).to_pylist()
        texts = [c if isinstance(c, str) else "" for c, good in zip(captions, ok, strict=True) if good]  # none: ""
        emb = [b""] * len(table)
        if texts:
            out = self.encoder.encode_text(texts)  # (B, D) float32
            for j, i in enumerate(np.flatnonzero(ok)):
                emb[i] = out[j].tobytes()
        table = table.append_column(rows.TEXT_EMBEDDING, pa.array(emb, type=pa.binary()))
        if self.count_truncated:
            truncated = np.zeros(len(ok), dtype=bool)
            if texts:
                truncated[ok] = token_counts(self.tokenizer, texts) > self.tokenizer.context_length
            table = table.append_column(rows.TRUNCATED, pa.array(truncated, type=pa.bool_()))
        return table


def token_counts(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """CLIP tokens per caption with start/end tokens (what open_clip's tokenizer would keep, untruncated)."""
    if hasattr(tokenizer, "encode"):  # open_clip SimpleTokenizer: BPE ids without start / end
        return np.array([len(tokenizer.encode(t)) + 2 for t in texts], dtype=np.int64)
    hf = tokenizer.tokenizer  # open_clip HFTokenizer
    return np.array([len(ids) for ids in hf(list(texts))["input_ids"]], dtype=np.int64)

"""The one CLIP actor of every stage: embed (images, optionally their captions), embed-text (captions only) and
caption (images; in the captioning actor, or a pool of its own with ``--stages split``).

``ClipActor`` is the callable class Ray Data's actor pools run. ``__init__`` loads the encoder once per actor
process: torch threads = the actor's share and the device Ray gave it (``runtime.actor_device``), precision
("auto": fp16 autocast on GPU, fp32 on CPU); ``images=False`` drops the image tower (text only). A batch
comes in one of the pipelines' two row formats, each with one small adapter:

- numpy column dicts (embed, embed-text: ``pipelines.embed.stages`` columns), ``columns``: uint8 ``pixels``
  (B, H, W, 3) -> ``image_embedding`` (B, D) float32; with ``texts`` ``caption`` -> ``text_embedding``, with
  ``count_truncated`` also ``truncated`` (longer than the CLIP context). ``pixels`` is dropped, every other
  column passes through; rows with an ``error`` get zeros, not a forward.
- pyarrow stage tables (caption: ``pipelines.caption.stages.STAGE_SCHEMA``), ``table``: ``pixels`` bytes ->
  ``embedding`` (float32 bytes); rows without pixels keep theirs (embedding-table input, errors, markers),
  plus the stage's timing columns ``t_clip`` / ``cpu_clip``.

The good rows of a block are one forward in both. Caption's fused actor (``ClipCaptionStage``) holds one
``ClipActor`` and hands its encoder to the CLIPScore scorer, so one loaded CLIP serves both.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipcap_core import encoders
from pipelines import runtime
from pipelines.caption import stages as caption_rows
from pipelines.embed import stages as st
from pipelines.io import schemas

if TYPE_CHECKING:
    from clipcap_core.encoders import EncoderConfig


class ClipActor:
    """Ray Data callable class: one CLIP loaded once, embedding the images and / or captions of row batches."""

    def __init__(self, encoder: EncoderConfig, *, precision: str = "fp32", use_gpu: bool = False, threads: int = 0,
                 images: bool = True, texts: bool = False, count_truncated: bool = False):
        # lazy: torch ~6.7 s to import (python -X importtime)
        from clipcap_core.encoder_model import load_encoder

        self.encoder = load_encoder(encoder, device=runtime.actor_device(use_gpu, threads), precision=precision)
        self.call_threads = runtime.CallThreads(threads)
        if not images:  # text only: the image tower's weights are not kept
            import torch

            self.encoder.model.visual = torch.nn.Identity()
        self.images, self.texts, self.count_truncated = images, texts, count_truncated
        size = self.encoder.spec.size
        self.hw = (size, size) if isinstance(size, int) else tuple(size)

    @cached_property
    def tokenizer(self) -> Any:
        return encoders._open_clip().get_tokenizer(self.encoder.model_name)

    def __call__(self, batch: Any) -> Any:
        self.call_threads()  # each of a shared actor's call threads runs the plan's torch threads
        return self.table(batch) if isinstance(batch, pa.Table) else self.columns(batch)

    def columns(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """numpy adapter (embed, embed-text)."""
        ok = np.array([not e for e in batch[st.ERROR]], dtype=bool)
        out = {k: v for k, v in batch.items() if k != st.PIXELS}
        if self.images:
            image = np.zeros((len(ok), self.encoder.dim), dtype=np.float32)  # (B, D); error rows keep zeros
            if ok.any():
                image[ok] = self.encoder.encode_pixels(batch[st.PIXELS][ok])
            out[schemas.IMAGE_EMBEDDING] = image
        if self.texts:
            out.update(self._texts(batch[st.CAPTION], ok))
        return out

    def _texts(self, captions: np.ndarray, ok: np.ndarray) -> dict[str, np.ndarray]:
        texts = [c if isinstance(c, str) else "" for c in captions[ok]]  # a sample without caption: ""
        emb = np.zeros((len(ok), self.encoder.dim), dtype=np.float32)  # (B, D)
        if texts:
            emb[ok] = self.encoder.encode_text(texts)
        out = {schemas.TEXT_EMBEDDING: emb}
        if self.count_truncated:
            truncated = np.zeros(len(ok), dtype=bool)
            if texts:
                truncated[ok] = token_counts(self.tokenizer, texts) > self.tokenizer.context_length
            out[st.TRUNCATED] = truncated
        return out

    def table(self, table: pa.Table) -> pa.Table:
        """pyarrow adapter (caption)."""
        clock = caption_rows.Clock()
        idx, blobs = caption_rows.binary_rows(table.column("pixels"))
        emb = table.column("embedding").to_pylist()
        if len(idx):
            pixels = np.stack([np.frombuffer(b, dtype=np.uint8) for b in blobs]).reshape(len(idx), *self.hw, 3)
            out = self.encoder.encode_pixels(pixels)  # (B, D) float32
            for j, i in enumerate(idx):
                emb[i] = out[j].tobytes()
        table = table.drop_columns(["pixels", "embedding"])
        table = table.append_column("embedding", pa.array(emb, type=pa.binary()))
        return caption_rows.with_time(table, "clip", clock.lap())


def token_counts(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """CLIP tokens per caption with start/end tokens (what open_clip's tokenizer would keep, untruncated)."""
    if hasattr(tokenizer, "encode"):  # open_clip SimpleTokenizer: BPE ids without start / end
        return np.array([len(tokenizer.encode(t)) + 2 for t in texts], dtype=np.int64)
    hf = tokenizer.tokenizer  # open_clip HFTokenizer
    return np.array([len(ids) for ids in hf(list(texts))["input_ids"]], dtype=np.int64)

"""Image embeddings for CLIPScore in ``clipcap evaluate``: from an embedding table or from images."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from clipcap_core.encoders import embedding_dim
from clipcap_core.imaging import ImageDecodeError, decode_image
from pipelines.io import sources


def plan(uri: str, encoder_cfg: Any) -> list[sources.Part]:
    """The input's parts, with embedding tables checked against the CLIP (job-level ValueError)."""
    parts = sources.plan_parts(uri, sources.SourceConfig())
    dim = embedding_dim(encoder_cfg)
    for p in parts:
        if p.kind != "embeddings":
            continue
        if p.dim != dim:
            raise ValueError(f"image embeddings {p.files[0].uri} have D={p.dim} but CLIP "
                             f"{encoder_cfg.model_name!r} gives D={dim}")
        if p.clip_model and p.clip_model != encoder_cfg.model_name:
            raise ValueError(f"image embeddings {p.files[0].uri} were made with CLIP {p.clip_model!r}, "
                             f"not {encoder_cfg.model_name!r} (the captioner's CLIP)")
    return parts


def _records(parts: list[sources.Part], wanted: set[str], resolve: Callable[[str], str | None]
             ) -> Iterator[tuple[str, sources.Record]]:
    cfg = sources.SourceConfig()
    for part in parts:
        for rec in sources.read_part(part, cfg):
            rid = resolve(rec.key)
            if rid is not None and rid in wanted:
                yield rid, rec


def image_embeddings(parts: list[sources.Part], wanted: set[str], resolve: Callable[[str], str | None],
                     encoder: Any | None, batch_size: int = 64) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Embeddings of the ``wanted`` ids and the problems of those that have none (error text per id).
    ``encoder`` (a loaded ``ClipEncoder``) is needed only when the input holds images."""
    out: dict[str, np.ndarray] = {}
    problems: dict[str, str] = {}
    ids: list[str] = []
    pixels: list[np.ndarray] = []

    def flush() -> None:
        if ids:
            emb = encoder.encode_pixels(np.stack(pixels))
            out.update(zip(ids, emb, strict=True))
            ids.clear()
            pixels.clear()

    for rid, rec in _records(parts, wanted, resolve):
        if rid in out or rid in ids:
            continue  # the first image of an id counts (another part may hold a copy)
        if rec.error is not None:
            problems[rid] = rec.error
        elif rec.embedding is not None:
            out[rid] = np.asarray(rec.embedding, dtype=np.float32)
        else:
            try:
                image = decode_image(rec.data or b"")
            except ImageDecodeError as exc:
                problems[rid] = str(exc)
                continue
            ids.append(rid)
            pixels.append(encoder.resize(image))
            if len(ids) >= batch_size:
                flush()
    flush()
    for rid in out:
        problems.pop(rid, None)
    for rid in wanted - set(out) - set(problems):
        problems[rid] = "no image with this id"
    return out, problems

"""Synthetic embedding tables for tests and benchmarks (not a pipeline stage): rows of the synthetic captioned
set whose embeddings are a fixed seeded projection of their one-hot attributes (+ noise), so a mapping network
can learn them in seconds without any CLIP, and ``scenes`` rows embedded by a shipped CLIP in this process
(``write_scenes_tables``). Written in the layout and schema of ``clipcap embed`` / ``embed-text`` tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipcap_core import synthetic as syn
from pipelines.io import schemas, storage


def attribute_embeddings(samples: Sequence[Any], dim: int, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    """Embeddings = fixed seeded projection of the one-hot attributes + Gaussian noise, L2-normalised."""
    groups = [tuple(range(1, 4)), syn.SIZES, tuple(syn.COLORS), syn.SHAPES, syn.POSITIONS]
    width = sum(len(g) for g in groups)
    proj = np.random.default_rng(seed).standard_normal((width, dim)).astype(np.float32)
    onehot = np.zeros((len(samples), width), dtype=np.float32)
    for i, s in enumerate(samples):
        a = s.attributes
        off = 0
        for g, v in zip(groups, (a.count, a.size, a.color, a.shape, a.position), strict=True):
            onehot[i, off + g.index(v)] = 1.0
            off += len(g)
    rng = np.random.default_rng([seed, len(samples), 7])
    emb = onehot @ proj + noise * np.sqrt(width) * rng.standard_normal((len(samples), dim)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def write_synthetic_tables(root: str, n: int, *, shards: int = 1, dim: int = 32, seed: int = 0, start: int = 0,
                           first_shard: int = 0, dataset: str = "synthetic", tag: str = "attr-proj",
                           noise: float = 0.1, column: str = schemas.IMAGE_EMBEDDING) -> list[str]:
    """Write ``n`` synthetic rows as ``shards`` tables under ``<root>/embeddings/<dataset>/<tag>/`` (``column``
    ``text_embedding``: text tables, ``schemas.text_embedding_schema``, under ``<root>/text-embeddings/``)."""
    samples = [_Lite(s.key, s.caption, s.attributes) for s in syn.generate(n, seed=seed, size=16, start=start)]
    emb = attribute_embeddings(samples, dim, seed=seed, noise=noise)
    meta = schemas.embedding_metadata(clip_model=tag, clip_pretrained=None, dim=dim, dtype="float32",
                                      preprocess="synthetic attribute projection")
    text = column == schemas.TEXT_EMBEDDING
    schema = schemas.with_metadata(schemas.text_embedding_schema(dim) if text else schemas.embedding_schema(dim), meta)
    out = []
    for k, idx in enumerate(np.array_split(np.arange(n), shards)):
        cols = {schemas.KEY: [samples[i].key for i in idx], schemas.CAPTION: [samples[i].caption for i in idx],
                schemas.URL: [None] * len(idx),
                column: pa.FixedSizeListArray.from_arrays(pa.array(emb[idx].ravel()), dim)}
        table = pa.table({f.name: cols[f.name] for f in schema}, schema=schema)
        folder = "text-embeddings" if text else "embeddings"
        uri = storage.join(root, folder, dataset, tag, f"part-{first_shard + k:05d}.parquet")
        storage.atomic_write_table(table, uri)
        out.append(uri)
    return out


@dataclass(frozen=True)
class _Lite:  # a synthetic sample without its image
    key: str
    caption: str
    attributes: Any


def write_scenes_tables(root: str, n: int, *, shards: int = 1, seed: int = 0, clip: str = "tiny-scenes",
                        batch: int = 256) -> list[str]:
    """``n`` training scenes (``clipcap_core.scenes``, canonical captions) embedded in this process by the
    shipped CLIP ``clip``, written like ``clipcap embed`` would under ``<root>/embeddings/scenes/<clip>/``: the
    input of ``clipcap study`` on ``scenes`` without the download and embed stages (same CLIP, same metadata)."""
    from clipcap_core import scenes
    from clipcap_core.encoders import EncoderConfig, load_encoder

    encoder = load_encoder(EncoderConfig(model_name=clip))
    samples = list(scenes.generate(n, seed=seed, split="train"))
    emb = np.concatenate([encoder.encode_pixels(np.stack([encoder.resize(s.image) for s in samples[i: i + batch]]))
                          for i in range(0, n, batch)]).astype(np.float32)
    meta = schemas.embedding_metadata(clip_model=clip, clip_pretrained=None, dim=encoder.dim, dtype="float32",
                                      preprocess=f"scenes 64 px, {clip} eval preprocessing (in process)")
    schema = schemas.with_metadata(schemas.embedding_schema(encoder.dim), meta)
    out = []
    for k, idx in enumerate(np.array_split(np.arange(n), shards)):
        cols = {schemas.KEY: [samples[i].key for i in idx], schemas.CAPTION: [samples[i].caption for i in idx],
                schemas.URL: [None] * len(idx),
                schemas.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb[idx].ravel()), encoder.dim)}
        uri = storage.join(root, "embeddings", "scenes", clip, f"part-{k:05d}.parquet")
        storage.atomic_write_table(pa.table({f.name: cols[f.name] for f in schema}, schema=schema), uri)
        out.append(uri)
    return out

"""Synthetic embedding tables for tests and benchmarks, in the layout and schema of ``clipcap embed`` tables:
synthetic rows embedded as a seeded projection of their one-hot attributes (a mapping learns them in seconds
without a CLIP), and ``scenes`` rows embedded by a shipped CLIP in this process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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
    """``n`` synthetic rows as ``shards`` tables under ``<root>/embeddings/<dataset>/<tag>/`` (with ``column``
    ``text_embedding``: text tables under ``<root>/text-embeddings/``)."""
    samples = [dataclasses.replace(s, image=None) for s in syn.generate(n, seed=seed, size=16, start=start)]
    emb = attribute_embeddings(samples, dim, seed=seed, noise=noise)
    meta = schemas.embedding_metadata(clip_model=tag, clip_pretrained=None, dim=dim, dtype="float32",
                                      preprocess="synthetic attribute projection")
    text = column == schemas.TEXT_EMBEDDING
    schema = schemas.text_embedding_schema(dim) if text else schemas.embedding_schema(dim)
    folder = storage.join(root, "text-embeddings" if text else "embeddings", dataset, tag)
    return _write_shards(folder, samples, emb, schemas.with_metadata(schema, meta), column, shards, first_shard)


def write_scenes_tables(root: str, n: int, *, shards: int = 1, seed: int = 0, clip: str = "tiny-scenes",
                        batch: int = 256) -> list[str]:
    """``n`` training scenes embedded in this process by the shipped CLIP ``clip``, written as ``clipcap embed``
    would under ``<root>/embeddings/scenes/<clip>/``: ``clipcap study`` input without the download and embed."""
    from clipcap_core import scenes
    from clipcap_core.encoders import EncoderConfig, load_encoder

    encoder = load_encoder(EncoderConfig(model_name=clip))
    samples = list(scenes.generate(n, seed=seed, split="train"))
    emb = np.concatenate([encoder.encode_pixels(np.stack([encoder.resize(s.image) for s in samples[i: i + batch]]))
                          for i in range(0, n, batch)]).astype(np.float32)
    meta = schemas.embedding_metadata(clip_model=clip, clip_pretrained=None, dim=encoder.dim, dtype="float32",
                                      preprocess=f"scenes 64 px, {clip} eval preprocessing (in process)")
    schema = schemas.with_metadata(schemas.embedding_schema(encoder.dim), meta)
    return _write_shards(storage.join(root, "embeddings", "scenes", clip), samples, emb, schema,
                         schemas.IMAGE_EMBEDDING, shards, 0)


def _write_shards(folder: str, samples: Sequence[Any], emb: np.ndarray, schema: pa.Schema, column: str,
                  shards: int, first_shard: int) -> list[str]:
    """``samples`` (key, caption) and their embeddings as ``shards`` parts under ``folder``."""
    out = []
    for k, idx in enumerate(np.array_split(np.arange(len(samples)), shards)):
        cols = {schemas.KEY: [samples[i].key for i in idx], schemas.CAPTION: [samples[i].caption for i in idx],
                schemas.URL: [None] * len(idx),
                column: pa.FixedSizeListArray.from_arrays(pa.array(emb[idx].ravel()), emb.shape[1])}
        uri = storage.join(folder, f"part-{first_shard + k:05d}.parquet")
        storage.atomic_write_table(pa.table({f.name: cols[f.name] for f in schema}, schema=schema), uri)
        out.append(uri)
    return out

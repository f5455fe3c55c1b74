"""The one place that owns column names, pyarrow schemas and Parquet metadata keys of our tables."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from clipcap_core import __version__

SCHEMA_VERSION = "1"

# --- column names -----------------------------------------------------------------------------
KEY = "key"
CAPTION = "caption"
URL = "url"
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
SCORE = "score"
MODEL = "model"
CREATED_AT = "created_at"
SOURCE = "source"
STAGE = "stage"
ERROR = "error"
# Parquet inputs of caption: image-bytes columns looked for, in this order, when no image column is given
IMAGE_BYTES_COLUMNS = ("image", "jpg", "png", "webp", "image_bytes", "img", "bytes")

# --- Parquet key-value metadata (bytes keys in the file, str here) ------------------------------
META_PREFIX = "clipcap."
META_CLIP_MODEL = META_PREFIX + "clip_model"
META_CLIP_PRETRAINED = META_PREFIX + "clip_pretrained"
META_DIM = META_PREFIX + "dim"
META_DTYPE = META_PREFIX + "dtype"
META_PREPROCESS = META_PREFIX + "preprocess"
META_CODE_VERSION = META_PREFIX + "code_version"
META_SCHEMA_VERSION = META_PREFIX + "schema_version"
META_SOURCE_SHARD = META_PREFIX + "source_shard"
META_TRUNCATED = META_PREFIX + "truncated"  # text tables: captions of this part cut to the CLIP context

EMBED_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def embedding_type(dim: int, dtype: str = "float32") -> pa.DataType:
    if dtype not in EMBED_DTYPES:
        raise ValueError(f"embedding dtype must be one of {sorted(EMBED_DTYPES)}, got {dtype!r}")
    return pa.list_(EMBED_DTYPES[dtype], dim)


def embedding_schema(dim: int, dtype: str = "float32", with_text: bool = False) -> pa.Schema:
    fields = [pa.field(KEY, pa.string(), nullable=False), (CAPTION, pa.string()), (URL, pa.string()),
              pa.field(IMAGE_EMBEDDING, embedding_type(dim, dtype), nullable=False)]
    return pa.schema(fields + ([(TEXT_EMBEDDING, embedding_type(dim, dtype))] if with_text else []))


def text_embedding_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """Text-embedding tables (``clipcap embed-text``): captions of a corpus and their CLIP text embeddings."""
    return pa.schema([pa.field(KEY, pa.string(), nullable=False), (CAPTION, pa.string()),
                      pa.field(TEXT_EMBEDDING, embedding_type(dim, dtype), nullable=False)])


RANK = "rank"
META_MODEL = META_PREFIX + "model"
META_DECODING = META_PREFIX + "decoding"
META_PART = META_PREFIX + "part"

ERRORS_SCHEMA = pa.schema([(name, pa.string()) for name in (KEY, SOURCE, STAGE, ERROR)])

CAPTIONS_SCHEMA = pa.schema([pa.field(KEY, pa.string(), nullable=False), (CAPTION, pa.string()),
                             (SCORE, pa.float32()), (MODEL, pa.string()),
                             (CREATED_AT, pa.timestamp("us", tz="UTC"))])


# Caption tables written by bulk captioning (pipelines.caption.job): one row per caption, ``rank`` 0 = best
# (n captions per image -> n rows with ranks 0..n-1; with n = 1, (key) alone is unique).
CAPTIONS_RANKED_SCHEMA = CAPTIONS_SCHEMA.append(pa.field(RANK, pa.int16(), nullable=False))

# CLIPScore of (image, caption) with the captioner's own CLIP: 2.5 * max(cos, 0) (clipcap_core.metrics).
# Caption tables carry it per caption (null when it could not be computed); ``--rerank clip`` orders ``rank``
# by it (by the cosine underneath, so negative cosines still rank).
CLIP_SCORE = "clip_score"
CAPTIONS_SCORED_SCHEMA = CAPTIONS_RANKED_SCHEMA.append(pa.field(CLIP_SCORE, pa.float32()))
META_RERANK = META_PREFIX + "rerank"

# --- evaluation (pipelines.evaluate): per-image scores ---------------------------------------------------
IMAGE_ID = "image_id"
REFERENCES = "references"
EVAL_SCORES = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice", "exact_match",
               CLIP_SCORE, "ref_clip_score")


def evaluation_schema(scores: tuple[str, ...] | list[str]) -> pa.Schema:
    """Per-image evaluation table: id, caption, references, then one float64 column per score present."""
    unknown = sorted(set(scores) - set(EVAL_SCORES))
    if unknown:
        raise ValueError(f"unknown evaluation score column(s) {unknown}")
    return pa.schema([pa.field(IMAGE_ID, pa.string(), nullable=False), pa.field(CAPTION, pa.string()),
                      pa.field(REFERENCES, pa.list_(pa.string()))]
                     + [pa.field(s, pa.float64()) for s in EVAL_SCORES if s in scores])


def embedding_metadata(*, clip_model: str, clip_pretrained: str | None, dim: int, dtype: str, preprocess: str,
                       source_shard: str | None = None) -> dict[str, str]:
    meta = {META_CLIP_MODEL: clip_model, META_CLIP_PRETRAINED: clip_pretrained or "", META_DIM: str(dim),
            META_DTYPE: dtype, META_PREPROCESS: preprocess, META_CODE_VERSION: __version__,
            META_SCHEMA_VERSION: SCHEMA_VERSION}
    return meta if source_shard is None else {**meta, META_SOURCE_SHARD: source_shard}


def with_metadata(schema: pa.Schema, meta: Mapping[str, str]) -> pa.Schema:
    merged = dict(schema.metadata or {})
    merged.update({k.encode(): v.encode() for k, v in meta.items()})
    return schema.with_metadata(merged)


def read_metadata(schema: pa.Schema) -> dict[str, str]:
    """Our ``clipcap.*`` metadata of a Parquet schema as a str dict."""
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}  # pyarrow keeps bytes
    return {k: v for k, v in meta.items() if k.startswith(META_PREFIX)}


def validate_embedding_schema(schema: pa.Schema, *, where: str = "embedding table",
                              column: str = IMAGE_EMBEDDING) -> int:
    """Check an embedding table's schema (``column``: the embedding it must have); return D or raise ValueError."""
    missing = [c for c in (KEY, column) if c not in schema.names]
    if missing:
        hint = "; text tables come from `clipcap embed-text`" if column == TEXT_EMBEDDING else ""
        raise ValueError(f"{where}: missing column(s) {missing}; has {schema.names}{hint}")
    emb = schema.field(column).type
    if not pa.types.is_fixed_size_list(emb) or not pa.types.is_floating(emb.value_type):
        raise ValueError(f"{where}: column {column!r} must be fixed_size_list<float>[D], got {emb}")
    return int(emb.list_size)


def to_json(meta: Mapping[str, Any]) -> str:
    return json.dumps(dict(meta), sort_keys=True)

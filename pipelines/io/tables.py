"""Reading embedding tables for training: file discovery, metadata checks, key-hash splits, Ray Data streams.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipcap_core import uris
from clipcap_core.encoders import model_configs
from pipelines.io import schemas, storage

if TYPE_CHECKING:
    import ray.data

Tokenize = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]  # captions -> tokens (B,T) int, mask (B,T)


# --- discovery and metadata ---------------------------------------------------------------------------
def list_table_files(roots: str | Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Expand table URIs (a ``.parquet`` file, or a directory searched recursively) to sorted file URIs."""
    files: list[str] = []
    for uri in [roots] if isinstance(roots, str) else roots:
        if str(uri).endswith(".parquet"):
            if not uris.exists(uri, storage_options):
                raise FileNotFoundError(f"embedding table {uri!r} does not exist")
            files.append(str(uri))
            continue
        # bookkeeping (``_meta/``, ``_errors/``), temporaries and hidden files are not tables
        base = uris.filesystem(uri, storage_options)[1].rstrip("/")
        found = [f for f in storage.list_files(uri, ".parquet", storage_options, recursive=True)
                 if not any(p.startswith(("_", ".")) for p in
                            uris.filesystem(f, storage_options)[1].removeprefix(base).split("/"))]
        if not found:
            raise FileNotFoundError(f"no embedding tables (*.parquet) under {uri!r}")
        files.extend(found)
    return sorted(dict.fromkeys(files))


@dataclass(frozen=True)
class TableInfo:
    files: tuple[str, ...]
    dim: int
    clip_model: str
    clip_pretrained: str
    dtype: str
    rows: tuple[int, ...]  # per file

    @property
    def num_rows(self) -> int:
        return sum(self.rows)


def _footer(uri: str, storage_options: dict[str, Any] | None) -> tuple[pa.Schema, int]:
    fs, path = uris.filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            return meta.schema.to_arrow_schema(), meta.num_rows
    except (pa.ArrowException, OSError) as exc:  # the file is named: pyarrow's message does not say which
        raise ValueError(f"embedding table {uri} is not a readable Parquet file: {exc}") from exc


def inspect_tables(files: Sequence[str], storage_options: dict[str, Any] | None = None,
                   column: str = schemas.IMAGE_EMBEDDING) -> TableInfo:
    """Validate every table's footer (``column``: the embedding training reads); all must share D and CLIP."""
    if not files:
        raise ValueError("no embedding table files given")
    dims, models, rows, dtype = {}, {}, [], "float32"
    for uri in files:
        schema, n = _footer(uri, storage_options)
        dim = schemas.validate_embedding_schema(schema, where=uri, column=column)
        if schemas.CAPTION not in schema.names:
            raise ValueError(f"{uri}: training needs a {schemas.CAPTION!r} column; has {schema.names}")
        meta = schemas.read_metadata(schema)
        if meta.get(schemas.META_DIM) and int(meta[schemas.META_DIM]) != dim:
            raise ValueError(f"{uri}: metadata says D={meta[schemas.META_DIM]} but the column has D={dim}")
        check_clip_dim(uri, meta.get(schemas.META_CLIP_MODEL, ""), dim)
        dims[uri] = dim
        models[uri] = (meta.get(schemas.META_CLIP_MODEL, ""), meta.get(schemas.META_CLIP_PRETRAINED, ""))
        dtype = meta.get(schemas.META_DTYPE, dtype)
        rows.append(n)
    if len(set(dims.values())) > 1:
        raise ValueError(f"embedding tables mix dimensions {sorted(set(dims.values()))}: "
                         + ", ".join(f"{u} D={d}" for u, d in dims.items()))
    if len(set(models.values())) > 1:
        raise ValueError(f"embedding tables were made with different CLIP models {sorted(set(models.values()))}")
    clip_model, clip_pretrained = next(iter(models.values()))
    return TableInfo(files=tuple(files), dim=next(iter(dims.values())), clip_model=clip_model,
                     clip_pretrained=clip_pretrained, dtype=dtype, rows=tuple(rows))


def check_clip_dim(uri: str, clip_model: str, dim: int) -> None:
    """Refuse a table whose metadata names a CLIP of another D than its vectors (unknown names pass)."""
    try:
        expected = int(model_configs().get(clip_model, {}).get("embed_dim", 0)) if clip_model else 0
    except ImportError:
        return
    if expected and expected != dim:
        raise ValueError(f"{uri}: metadata says CLIP {clip_model!r} (D={expected}) but the vectors have D={dim}; "
                         "the table was not made by that encoder")


def check_model_dim(info: TableInfo, model_dim: int, *, what: str = "model") -> None:
    """A clear error when the model's CLIP dimension does not match the tables' (before any training)."""
    if int(model_dim) != info.dim:
        made = f"{info.clip_model or '?'}" + (f"/{info.clip_pretrained}" if info.clip_pretrained else "")
        raise ValueError(
            f"dimension mismatch: the embedding tables have D={info.dim} (CLIP {made}) but the {what} expects "
            f"clip_dim={model_dim}; train on tables made with the model's CLIP encoder or set clip_dim={info.dim}"
        )


# --- key-hash splits ----------------------------------------------------------------------------------
def key_unit(keys: Sequence[str] | pa.Array | pa.ChunkedArray, salt: str) -> np.ndarray:
    """A stable pseudo-uniform number in [0, 1) per key (salted blake2b; same on every machine and run)."""
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = keys.to_pylist()
    salt_b = salt.encode()
    out = np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, key=salt_b[:64]).digest(), "little")
         for k in keys), dtype=np.uint64, count=len(keys))
    return (out >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True, kw_only=True)
class Split:
    """Rows a stage sees: ``part`` of the key-hash split, then an optional seeded sample of those rows."""

    part: Literal["train", "heldout", "all"] = "train"
    heldout_fraction: float = 0.1
    salt: str = "clipcap-heldout"
    sample_fraction: float = 1.0  # < 1: keep a seeded sample (replay of older shards)
    sample_seed: int = 0

    def mask(self, keys: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
        n = len(keys)
        keep = np.ones(n, dtype=bool)
        if self.part == "heldout" or (self.part == "train" and self.heldout_fraction > 0):
            held = key_unit(keys, self.salt) < self.heldout_fraction
            keep = held if self.part == "heldout" else ~held
        if self.sample_fraction < 1.0:
            keep &= key_unit(keys, f"replay:{self.sample_seed}") < self.sample_fraction
        return keep


def row_problems(table: pa.Table, column: str | None) -> list[str]:
    """Per row, why it cannot train ("" when it can): a null or empty caption, a non-finite vector."""
    caps = table.column(schemas.CAPTION)
    empty = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(caps)), 0), True)
    no_caption = np.asarray(empty.to_numpy(zero_copy_only=False), dtype=bool)
    finite = np.ones(table.num_rows, dtype=bool)
    if column and column in table.column_names and table.num_rows:
        finite = np.isfinite(embeddings_numpy(table, column)).all(axis=1)
    return ["empty caption" if c else "" if f else "non-finite vector"
            for c, f in zip(no_caption.tolist(), finite.tolist(), strict=True)]


def filter_table(table: pa.Table, split: Split, column: str | None = None,
                 drop: np.ndarray | None = None) -> pa.Table:
    """Rows of ``table`` in ``split`` that can train and are not in ``drop`` (a boolean mask)."""
    keep = split.mask(table.column(schemas.KEY))
    keep &= np.array([not p for p in row_problems(table, column)], dtype=bool)
    if drop is not None:
        keep &= ~drop
    return table.filter(pa.array(keep))


def embeddings_numpy(table: pa.Table, column: str | None = None) -> np.ndarray:
    """A fixed_size_list<float>[D] column as (N, D) float32; ``column`` None: image, else text embedding."""
    if column is None:
        has_image = schemas.IMAGE_EMBEDDING in table.column_names
        column = schemas.IMAGE_EMBEDDING if has_image else schemas.TEXT_EMBEDDING
    col = table.column(column).combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(-1, col.type.list_size)


# --- reading ------------------------------------------------------------------------------------------
def _train_columns(column: str) -> list[str]:
    return [schemas.KEY, schemas.CAPTION, column]


Repeats = dict[str, tuple[int, ...]]  # table URI -> row indices of keys seen in an earlier row (dropped)


def _drop_mask(repeats: Repeats | None, uri: str, offset: int, n: int) -> np.ndarray | None:
    rows = (repeats or {}).get(uri)
    if not rows:
        return None
    idx = np.asarray(rows, dtype=np.int64) - offset
    mask = np.zeros(n, dtype=bool)
    mask[idx[(idx >= 0) & (idx < n)]] = True
    return mask


def read_split(files: Sequence[str], split: Split, storage_options: dict[str, Any] | None = None,
               max_rows: int | None = None, column: str = schemas.IMAGE_EMBEDDING,
               repeats: Repeats | None = None) -> pa.Table:
    """The rows of ``split`` from ``files`` in memory (for held-out / evaluation sets), sorted by key."""
    parts = []
    for uri in files:
        fs, path = uris.filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=_train_columns(column))
        parts.append(filter_table(table, split, column, _drop_mask(repeats, uri, 0, table.num_rows)))
    if not parts:
        raise ValueError("no embedding table files given")
    table = pa.concat_tables(parts).combine_chunks().sort_by(schemas.KEY)
    return table.slice(0, max_rows) if max_rows is not None else table


def count_split(files: Sequence[str], split: Split, storage_options: dict[str, Any] | None = None,
                column: str = schemas.IMAGE_EMBEDDING, repeats: Repeats | None = None) -> int:
    """Rows in ``split`` that can train (the same rows ``read_split`` and ``stream_tables`` give)."""
    return sum(read_split([uri], split, storage_options, column=column, repeats=repeats).num_rows
               for uri in files)


@dataclass(frozen=True)
class Audit:
    """Rows that cannot train (an errors table) and repeated keys' later rows (dropped)."""

    errors: pa.Table  # schemas.ERRORS_SCHEMA: key, source (table URI), stage, error
    repeats: Repeats
    kept: int = 0  # rows of the given splits that train

    def counts(self) -> dict[str, int]:
        reasons = self.errors.column(schemas.ERROR).to_pylist()
        return {r: reasons.count(r) for r in sorted(set(reasons))}


def audit_tables(files: Sequence[str], column: str = schemas.IMAGE_EMBEDDING,
                 storage_options: dict[str, Any] | None = None, rows_per_batch: int = 65536,
                 splits: Mapping[str, Split] | None = None) -> Audit:
    """Check every row of ``files`` before training (captions, vectors, repeated keys), a record batch at a
    time; ``Audit.kept`` counts the rows of ``splits`` that pass."""
    seen: set[str] = set()
    kept, bad = 0, []
    repeats: dict[str, list[int]] = {}
    for uri in files:
        fs, path = uris.filesystem(uri, storage_options)
        offset = 0
        with fs.open(path, "rb") as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=rows_per_batch, columns=_train_columns(column)):
                table = pa.Table.from_batches([rb])
                keys = table.column(schemas.KEY).to_pylist()
                in_split = splits[uri].mask(keys) if splits and uri in splits else np.zeros(len(keys), dtype=bool)
                for i, (key, why) in enumerate(zip(keys, row_problems(table, column), strict=True)):
                    if not why and key in seen:
                        why = "duplicate key"
                        repeats.setdefault(uri, []).append(offset + i)
                    seen.add(key)
                    if why:
                        bad.append({schemas.KEY: key, schemas.SOURCE: uri, schemas.STAGE: "train-input",
                                    schemas.ERROR: why})
                    elif in_split[i]:
                        kept += 1
                offset += table.num_rows
    return Audit(errors=pa.Table.from_pylist(bad, schema=schemas.ERRORS_SCHEMA),
                 repeats={u: tuple(r) for u, r in repeats.items()}, kept=kept)


class PrepareBatch:
    """Ray Data map function: split filter + tokenisation, padded to ``max_tokens`` (concatenable)."""

    def __init__(self, split: Split, tokenize: Tokenize, max_tokens: int, column: str = schemas.IMAGE_EMBEDDING):
        self.split, self.tokenize, self.max_tokens, self.column = split, tokenize, max_tokens, column

    def __call__(self, table: pa.Table, drop: np.ndarray | None = None) -> dict[str, np.ndarray]:
        table = filter_table(table, self.split, self.column, drop)
        captions = table.column(schemas.CAPTION).to_pylist()
        emb = embeddings_numpy(table, self.column)
        tokens = np.zeros((len(captions), self.max_tokens), dtype=np.int64)
        mask = np.zeros((len(captions), self.max_tokens), dtype=np.float32)
        if captions:
            tok, msk = self.tokenize(captions)
            t = min(tok.shape[1], self.max_tokens)
            tokens[:, :t] = np.asarray(tok)[:, :t]
            mask[:, :t] = np.asarray(msk)[:, :t]
        return {"embedding": emb, "tokens": tokens, "mask": mask}


class ReadPrepare:
    """Ray Data map function: each table item read a record batch at a time, filtered and tokenised."""

    def __init__(self, tokenize: Tokenize, max_tokens: int, rows_per_block: int = 4096,
                 column: str = schemas.IMAGE_EMBEDDING):
        self.tokenize, self.max_tokens, self.rows_per_block = tokenize, max_tokens, rows_per_block
        self.column = column

    def __call__(self, items: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for uri, split_json, drop_json in zip(items["uri"], items["split"], items["drop"], strict=True):
            prep = PrepareBatch(Split(**json.loads(str(split_json))), self.tokenize, self.max_tokens, self.column)
            repeats = {str(uri): tuple(json.loads(str(drop_json)))}
            fs, path = uris.filesystem(str(uri))
            offset = 0
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                for rb in pf.iter_batches(batch_size=self.rows_per_block, columns=_train_columns(self.column)):
                    out = prep(pa.Table.from_batches([rb]), _drop_mask(repeats, str(uri), offset, rb.num_rows))
                    offset += rb.num_rows
                    if len(out["tokens"]):
                        yield out


def stream_tables(parts: Sequence[tuple[str, Split]], tokenize: Tokenize, max_tokens: int,
                  rows_per_block: int = 4096, column: str = schemas.IMAGE_EMBEDDING,
                  repeats: Repeats | None = None) -> ray.data.Dataset:
    """A tokenised Ray Data stream over ``parts`` ((table URI, split) in order; a URI may repeat)."""
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray.data

    items = [{"uri": u, "split": json.dumps(dataclasses.asdict(sp)), "drop": json.dumps(list((repeats or {}).get(u, ())))}
             for u, sp in parts]
    if not items:
        raise ValueError("nothing to stream: no table parts given")
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ReadPrepare(tokenize, max_tokens, rows_per_block, column), batch_size=1, batch_format="numpy")

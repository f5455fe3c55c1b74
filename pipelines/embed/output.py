"""The output side of the embed stage: the table layout, the error rows and the per-shard commit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import encoders, uris
from pipelines import rows
from pipelines.committer import UnitCommitter
from pipelines.embed import stages as st
from pipelines.io import schemas, storage

if TYPE_CHECKING:
    from pipelines.embed.job import EmbedConfig


def part_uri(table_uri: str, shard: str) -> str:
    return storage.join(table_uri, f"part-{shard}.parquet")


def errors_uri(meta_uri: str, shard: str) -> str:
    return storage.join(meta_uri, "errors", f"part-{shard}.parquet")


def empty_uri(meta_uri: str, shard: str) -> str:
    """Done-marker of a shard without one good sample (a 0-row part file breaks Hugging Face ``datasets``)."""
    return storage.join(meta_uri, "empty", f"part-{shard}.json")


def tmp_uri(meta_uri: str) -> str:
    """Where a table's files are written before their rename into place: outside every reader's glob."""
    return storage.join(meta_uri, "tmp")


def remove_stale_temporaries(table_uri: str, meta_uri: str) -> int:
    """Delete ``_tmp.*`` files a killed run left behind (call it holding the table's lease: no other writer)."""
    return storage.remove_temporaries(table_uri, storage.join(meta_uri, "errors"), storage.join(meta_uri, "empty"),
                                      tmp_uri(meta_uri), meta_uri)


def _download_errors(shard_uri: str) -> list[dict[str, str]]:
    """img2dataset's failed samples of a shard (its sibling .parquet) as errors rows (stage 'download')."""
    meta_uri = shard_uri.removesuffix(".tar") + ".parquet"
    if not uris.exists(meta_uri):
        return []
    t = pq.read_table(meta_uri, columns=["key", "url", "status", "error_message"]).to_pylist()
    return [{"key": r["key"], "source": r["url"], "stage": "download", "error": r["error_message"] or r["status"]}
            for r in t if r["status"] != "success"]


def rows_to_keep(table: pa.Table, *, failed_stage: str, duplicate_stage: str, unit: str
                 ) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Of one unit's (shard's, part's) rows: the indices of the rows to write (sorted by key, the first row of
    each key), their keys, and the error rows: one per failed row (``failed_stage``) and one per repeated key
    (``duplicate_stage``). Shared by embed and embed-text."""
    keys, sources, errors = (table.column(c).to_pylist() for c in (st.KEY, st.SOURCE, st.ERROR))
    errs = [{"key": k, "source": s, "stage": failed_stage, "error": e}
            for k, s, e in zip(keys, sources, errors, strict=True) if e]
    ok = np.flatnonzero([not e for e in errors])
    good = np.asarray([keys[i] for i in ok], dtype=str)
    order = np.argsort(good, kind="stable")
    uniq, first = np.unique(good[order], return_index=True)
    for i in sorted(set(range(len(order))) - set(first.tolist())):
        j = ok[order[i]]
        errs.append({"key": str(keys[j]), "source": str(sources[j]), "stage": duplicate_stage,
                     "error": f"duplicate key in {unit}"})
    return ok[order[first]], uniq, errs


def strings(table: pa.Table, name: str, take: np.ndarray) -> pa.Array:
    return pa.array(table.column(name).take(pa.array(take, pa.int64())).to_pylist(), pa.string())


def vectors(table: pa.Table, name: str, take: np.ndarray, dim: int, np_dtype: type) -> pa.FixedSizeListArray:
    return fixed_list(rows.vectors(table.column(name).take(pa.array(take, pa.int64())), dim), dim, np_dtype)


def build_tables(table: pa.Table, cfg: EmbedConfig, dim: int, meta: dict[str, str]
                 ) -> tuple[pa.Table, list[dict[str, str]]]:
    """Embedding table (sorted by key, first row per key) + decode error rows of one shard's rows."""
    keep, uniq, errs = rows_to_keep(table, failed_stage="decode", duplicate_stage="embed", unit="shard")
    np_dtype = np.float16 if cfg.dtype == "float16" else np.float32
    schema = schemas.with_metadata(schemas.embedding_schema(dim, cfg.dtype, cfg.text_embeddings), meta)
    arrays = [pa.array(uniq.tolist(), pa.string()), strings(table, st.CAPTION, keep), strings(table, st.URL, keep),
              vectors(table, rows.EMBEDDING, keep, dim, np_dtype)]
    if cfg.text_embeddings:
        arrays.append(vectors(table, rows.TEXT_EMBEDDING, keep, dim, np_dtype))
    return pa.Table.from_arrays(arrays, schema=schema), errs


def fixed_list(values: np.ndarray, dim: int, np_dtype: type) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1, dim), dtype=np_dtype).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)


def unread_reason(table: pa.Table | None) -> str | None:
    """Why the shard could not be read at all, or None (per-sample errors do not count)."""
    unread = [] if table is None else table.column(st.UNREAD).to_pylist()
    if not any(unread):
        return None
    return str(table.column(st.ERROR)[unread.index(True)].as_py())


def download_incomplete(shard_uri: str) -> str | None:
    """Why a shard is not final yet: img2dataset recorded transient failures (outage, timeout, 5xx) that the
    download stage retries on its next run; committing it now would keep those samples out for good."""
    # lazy: pandas ~0.55 s to import (python -X importtime)
    from pipelines.download.job import is_transient

    n = sum(1 for e in _download_errors(shard_uri) if is_transient(e["error"]))
    return (f"{n} sample(s) failed to download with transient errors; rerun the download, then embed again"
            if n else None)


def commit_shard(cfg: EmbedConfig, shard_uri: str, table: pa.Table | None, dim: int) -> tuple[int, int]:
    """Write the errors table (if any, else drop a stale one), then the part file, or the empty marker when
    no sample is good: the commit marker is written last. Returns (rows, error rows)."""
    shard = st.shard_name(shard_uri)
    meta = schemas.embedding_metadata(
        clip_model=cfg.encoder.model_name, clip_pretrained=cfg.encoder.pretrained, dim=dim, dtype=cfg.dtype,
        preprocess=encoders.preprocess_spec(cfg.encoder).describe(), source_shard=shard_uri)
    if table is None:  # a shard without samples still gets its done-marker, so reruns skip it
        table = pa.table({**{k: pa.array([], pa.string()) for k in (st.KEY, st.CAPTION, st.URL, st.SOURCE, st.ERROR)},
                          rows.EMBEDDING: pa.array([], pa.binary()), rows.TEXT_EMBEDDING: pa.array([], pa.binary())})
    table, errs = build_tables(table, cfg, dim, meta)
    errs = _download_errors(shard_uri) + errs
    err_uri = errors_uri(cfg.meta_uri, shard)
    if errs:
        storage.atomic_write_table(pa.Table.from_pylist(errs, schema=schemas.ERRORS_SCHEMA), err_uri,
                                   tmp_dir=tmp_uri(cfg.meta_uri))
    elif uris.exists(err_uri):  # from an earlier attempt at this shard
        storage.remove(err_uri)
    if table.num_rows:
        storage.atomic_write_table(table, part_uri(cfg.table_uri, shard), tmp_dir=tmp_uri(cfg.meta_uri))
    else:
        storage.write_json({"shard": shard_uri, "rows": 0, "errors": len(errs)}, empty_uri(cfg.meta_uri, shard))
    return table.num_rows, len(errs)


class ShardCommitter(UnitCommitter):
    """Embed's driver side: rows back into shards (columns ``shard`` / ``index`` / ``shard_total``), each
    complete shard committed by ``commit_shard``. Units are shard names; ``uris`` maps them to the shards."""

    def __init__(self, cfg: EmbedConfig, shard_uris: list[str], dim: int):
        super().__init__(unit=st.SHARD, index=st.INDEX, total=st.TOTAL, noun="shard")
        self.cfg, self.dim = cfg, dim
        self.uris = {st.shard_name(u): u for u in shard_uris}

    def unread(self, unit: str, table: pa.Table | None) -> str | None:
        return unread_reason(table) or download_incomplete(self.uris[unit])

    def commit(self, unit: str, table: pa.Table | None) -> tuple[int, int]:
        return commit_shard(self.cfg, self.uris[unit], table, self.dim)

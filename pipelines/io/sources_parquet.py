"""Parquet readers for bulk captioning (listed in ``pipelines.io.sources.READERS``)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import uris
from pipelines.io import schemas, urlsafety
from pipelines.io.sources_base import (
    UNIT_STAGE,
    InputFile,
    OneFileReader,
    Part,
    Record,
    SourceConfig,
    part_name,
)


def _open(file: InputFile) -> Any:
    fs, path = uris.filesystem(file.uri)
    return fs.open(path, "rb")


def image_column(schema: pa.Schema, cfg: SourceConfig) -> str | None:
    """The column holding encoded image bytes (binary, or a struct with a ``bytes`` field), if any."""
    names = [cfg.image_column] if cfg.image_column else list(schemas.IMAGE_BYTES_COLUMNS)
    for name in names:
        if name not in schema.names:
            continue
        t = schema.field(name).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return name
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return name
        if cfg.image_column:
            raise ValueError(f"image column {name!r} must be binary or a {{bytes, path}} struct, got {t}")
    if cfg.image_column:
        raise ValueError(f"image column {cfg.image_column!r} not found; columns: {schema.names}")
    return None


class ParquetReader:
    """Plans every Parquet file (deciding ``parquet`` vs ``embeddings`` from its schema); reads bytes/URLs."""

    name = "parquet"

    def plan(self, file: InputFile, cfg: SourceConfig) -> list[Part]:
        try:
            with _open(file) as fh:
                meta = pq.ParquetFile(fh).metadata
        except Exception:  # noqa: BLE001 - a corrupt file is one error row, found again at read time
            return [Part(part_name(file.rel), "unreadable", (file,))]
        schema = meta.schema.to_arrow_schema()
        kind, dim, clip_model = "parquet", 0, ""
        if schemas.IMAGE_EMBEDDING in schema.names:
            kind = "embeddings"
            dim = schemas.validate_embedding_schema(schema, where=file.uri)
            clip_model = schemas.read_metadata(schema).get(schemas.META_CLIP_MODEL, "")
        elif cfg.format == "embeddings":
            raise ValueError(f"{file.uri}: not an embedding table (no {schemas.IMAGE_EMBEDDING!r} column)")
        elif image_column(schema, cfg) is None and cfg.url_column not in schema.names:
            raise ValueError(
                f"{file.uri}: no image column (one of {list(schemas.IMAGE_BYTES_COLUMNS)}), URL column "
                f"{cfg.url_column!r} or {schemas.IMAGE_EMBEDDING!r} column; has {schema.names}"
            )
        parts, group, first, offset, rows = [], [], 0, 0, 0
        for rg in range(meta.num_row_groups):
            if not group:
                first = offset
            group.append(rg)
            rows += meta.row_group(rg).num_rows
            offset += meta.row_group(rg).num_rows
            if rows >= cfg.part_size or rg == meta.num_row_groups - 1:
                parts.append(Part(part_name(file.rel, f"-rg{group[0]:05d}"), kind, (file,), tuple(group),
                                  first, dim, clip_model))
                group, rows = [], 0
        return parts

    def read(self, part: Part, cfg: SourceConfig) -> Iterator[Record]:
        f = part.files[0]
        with _open(f) as fh:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            img_col = image_column(schema, cfg)
            cols = [c for c in (cfg.key_column, img_col, cfg.url_column) if c and c in schema.names]
            table = pf.read_row_groups(list(part.row_groups), columns=cols)
        keys = row_keys(table, part, cfg)
        images = _bytes_values(table.column(img_col)) if img_col else [None] * table.num_rows
        urls = table.column(cfg.url_column).to_pylist() if cfg.url_column in cols else [None] * table.num_rows
        seen: set[str] = set()
        pending: list[Record] = []
        for key, data, url in zip(keys, images, urls, strict=True):
            if key in seen:
                yield Record(key, f.uri, error="duplicate key")
            elif data:
                yield Record(key, f.uri, data=data)
            elif url:
                pending.append(Record(key, f.uri, url=str(url)))
            else:
                yield Record(key, f.uri, error="row has neither image bytes nor a URL")
            seen.add(key)
        with ThreadPoolExecutor(cfg.fetch_threads) as pool:
            for i in range(0, len(pending), cfg.read_batch):
                yield from pool.map(lambda r: _download(r, cfg), pending[i: i + cfg.read_batch])


def row_keys(table: pa.Table, part: Part, cfg: SourceConfig) -> list[str]:
    rel = part.files[0].rel
    if cfg.key_column in table.column_names:
        raw = table.column(cfg.key_column).to_pylist()
    else:
        raw = [None] * table.num_rows
    return [f"{rel}/{k}" if k is not None and str(k) != "" else f"{rel}/#{part.row_offset + i}"
            for i, k in enumerate(raw)]


def _bytes_values(col: pa.ChunkedArray) -> list[bytes | None]:
    if pa.types.is_struct(col.type):
        col = pa.chunked_array([c.field("bytes") for c in col.chunks], type=col.type.field("bytes").type)
    return col.to_pylist()


def fetch_url(url: str, cfg: SourceConfig) -> bytes:
    """Download ``url`` (allowed schemes only), at most ``max_member_bytes``, within the timeout; private hosts
    (after every redirect) and object-store URLs only with their opt-ins (``urlsafety``)."""
    scheme = urlsafety.check_fetch_url(url, cfg.allow_private_urls, cfg.allow_object_store_urls)
    if scheme not in cfg.url_schemes:
        raise ValueError(f"URL scheme {scheme or '(none)'!r} not allowed (allowed: {list(cfg.url_schemes)})")
    limit = cfg.max_member_bytes
    if scheme in urlsafety.HTTP_SCHEMES:
        return urlsafety.fetch_http(url, cfg.fetch_timeout_s, limit, cfg.allow_private_urls)
    else:
        with fsspec.open(url, "rb") as fh:
            data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"download larger than {limit} bytes")
    return data


def _download(rec: Record, cfg: SourceConfig) -> Record:
    try:
        rec.data = fetch_url(rec.url or "", cfg)
    except Exception as exc:  # noqa: BLE001 - 404, timeout, refused, DNS: an error row
        rec.error, rec.stage = f"download failed: {type(exc).__name__}: {exc}", "fetch"
    return rec


class EmbeddingsReader:
    """Rows of an embedding table as embeddings (planned by ``ParquetReader``)."""

    name = "embeddings"

    def plan(self, file: InputFile, cfg: SourceConfig) -> list[Part]:
        return ParquetReader().plan(file, cfg)

    def read(self, part: Part, cfg: SourceConfig) -> Iterator[Record]:
        f = part.files[0]
        with _open(f) as fh:
            pf = pq.ParquetFile(fh)
            cols = [c for c in (cfg.key_column, schemas.IMAGE_EMBEDDING) if c in pf.schema_arrow.names]
            table = pf.read_row_groups(list(part.row_groups), columns=cols)
        keys = row_keys(table, part, cfg)
        col = table.column(schemas.IMAGE_EMBEDDING).combine_chunks()
        valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        # .values keeps the slots of null rows (unlike .flatten()), so rows stay aligned
        flat = col.values.slice(col.offset * part.dim, len(col) * part.dim).to_numpy(zero_copy_only=False)
        emb = np.asarray(flat, dtype=np.float32).reshape(len(col), part.dim)
        finite = np.isfinite(emb).all(axis=1)
        seen: set[str] = set()
        for i, key in enumerate(keys):
            if key in seen:
                yield Record(key, f.uri, error="duplicate key")
            elif not valid[i]:
                yield Record(key, f.uri, error="null embedding")
            elif not finite[i]:
                yield Record(key, f.uri, error="non-finite embedding (NaN or inf)")
            else:
                yield Record(key, f.uri, embedding=emb[i])
            seen.add(key)


class UnreadableReader(OneFileReader):
    """A file whose footer could not be read while planning: one error row with the reason."""

    name = "unreadable"

    def read(self, part: Part, cfg: SourceConfig) -> Iterator[Record]:
        f = part.files[0]
        try:
            with _open(f) as fh:
                pq.ParquetFile(fh)
            reason = "file changed since planning"
        except Exception as exc:  # noqa: BLE001
            reason = f"{type(exc).__name__}: {exc}"
        yield Record(f.rel, f.uri, error=f"unreadable Parquet file: {reason}", stage=UNIT_STAGE)

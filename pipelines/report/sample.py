"""Bounded reads for ``clipcap report``: a sample of a caption table and the images behind it."""

from __future__ import annotations

import base64
import io
import posixpath
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipcap_core import uris
from clipcap_core.imaging import ImageDecodeError, decode_image
from pipelines.evaluate.run import number, stem
from pipelines.io import schemas, sources, storage


@dataclass
class Sampled:
    key: str
    part_id: str
    captions: list[dict[str, Any]]       # this image's rows (rank order): caption, score, clip_score, rank
    thumbnail: str | None = None         # data URI
    image_error: str | None = None
    embedding: np.ndarray | None = None  # CLIP image embedding (for prefix interpretation)
    evaluation: dict[str, Any] = field(default_factory=dict)  # per-image scores + references


@dataclass
class CaptionSample:
    items: list[Sampled]
    model: str | None       # model artifact URI from the table's metadata
    parts_total: int
    parts_read: int
    rows_read: int


def _part_id(uri: str) -> str:
    name = posixpath.basename(uri)
    return name[len("part-"):-len(".parquet")] if name.startswith("part-") else name.rsplit(".", 1)[0]


def _first_batch(uri: str, rng: random.Random, batch_rows: int) -> tuple[pa.Table, dict[str, str]]:
    fs, path = uris.filesystem(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = schemas.read_metadata(pf.schema_arrow)
        if pf.num_row_groups == 0:
            return pf.schema_arrow.empty_table(), meta
        group = rng.randrange(pf.num_row_groups)
        batch = next(pf.iter_batches(batch_size=batch_rows, row_groups=[group]), None)
        table = pa.Table.from_batches([batch]) if batch is not None else pf.schema_arrow.empty_table()
    return table, meta


def sample_captions(captions: str, n: int, *, max_parts: int = 4, batch_rows: int = 2048,
                    seed: int = 0) -> CaptionSample:
    """Up to ``n`` images (all their ranked captions) from at most ``max_parts`` parts of ``captions``."""
    # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from pipelines.caption.output import resolve_table

    table = resolve_table(captions)[0]
    files = storage.list_files(table, ".parquet") if not captions.endswith(".parquet") else [captions]
    if not files:
        raise ValueError(f"no caption table parts (part-*.parquet) under {captions!r}")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(files, min(max_parts, len(files))))
    by_key: dict[str, Sampled] = {}
    model, rows = None, 0
    per_part = max(1, -(-n // len(chosen)))  # ceil: spread the sample over the parts read
    for uri in chosen:
        table, meta = _first_batch(uri, rng, batch_rows)
        rows += table.num_rows
        model = model or (meta.get(schemas.META_MODEL, "").rsplit("@", 1)[0] or None)
        keys = sorted(set(table.column(schemas.KEY).to_pylist())) if table.num_rows else []
        for key in rng.sample(keys, min(per_part, len(keys))):
            rows_of = table.filter(pc.equal(table.column(schemas.KEY), key)).to_pylist()
            rows_of.sort(key=lambda r: r.get(schemas.RANK, 0))
            by_key[key] = Sampled(key, _part_id(uri), rows_of)
    items = [by_key[k] for k in sorted(by_key)][:n]
    return CaptionSample(items, model, len(files), len(chosen), rows)


def thumbnail(data: bytes, px: int) -> str:
    """A data URI of a JPEG thumbnail re-encoded by us (the original bytes never reach the page)."""
    image = decode_image(data)
    image.thumbnail((px, px))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def fetch_images(input_uri: str, items: list[Sampled], px: int, encoder: Any = None) -> None:
    """Thumbnails (and CLIP embeddings with ``encoder``) of ``items`` from the captioned input, in place."""
    wanted: dict[str, list[Sampled]] = {}
    for it in items:
        wanted.setdefault(it.part_id, []).append(it)
    cfg = sources.SourceConfig()
    parts = [p for p in sources.plan_parts(input_uri, cfg) if p.part_id in wanted]
    for part in parts:
        todo = {it.key: it for it in wanted[part.part_id]}
        if part.kind == "images":  # loose files: read only the wanted ones
            part = sources.Part(part.part_id, part.kind, tuple(f for f in part.files if f.rel in todo))
        for rec in sources.read_part(part, cfg):
            it = todo.pop(rec.key, None)
            if it is not None:
                _attach(it, rec, px, encoder)
            if not todo:
                break
    for it in items:
        if it.thumbnail is None and it.image_error is None and it.embedding is None:
            it.image_error = "image not found in the captioned input"


def _attach(it: Sampled, rec: sources.Record, px: int, encoder: Any) -> None:
    if rec.error is not None:
        it.image_error = rec.error
    elif rec.embedding is not None:  # an embedding-table input: no pixels to show
        it.embedding, it.image_error = rec.embedding, "input was an embedding table (no image)"
    else:
        try:
            it.thumbnail = thumbnail(rec.data or b"", px)
            if encoder is not None:
                it.embedding = encoder.encode_pixels(encoder.resize(decode_image(rec.data or b""))[None])[0]
        except ImageDecodeError as exc:
            it.image_error = str(exc)


def attach_evaluation(evaluation: str, items: list[Sampled]) -> None:
    """Per-image scores and references of the sampled keys from ``<evaluation>/per_image.parquet`` (filtered
    read; an evaluation id may be the key, its stem or its trailing number, as ``clipcap evaluate`` matched)."""
    uri = storage.join(evaluation, "per_image.parquet")
    if not uris.exists(uri):
        return
    forms = {form: it for it in items for form in (it.key, stem(it.key), number(it.key))}
    fs, path = uris.filesystem(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, filters=pc.field(schemas.IMAGE_ID).isin(list(forms)))
    for row in table.to_pylist():
        forms[row[schemas.IMAGE_ID]].evaluation = row


def evaluation_rows(evaluation: str) -> list[dict[str, Any]]:
    """Every row of ``<evaluation>/per_image.parquet`` ([] when there is none)."""
    uri = storage.join(evaluation, "per_image.parquet")
    if not uris.exists(uri):
        return []
    fs, path = uris.filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pylist()

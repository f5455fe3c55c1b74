"""Embed-text stage: a caption corpus (text, csv, tsv, jsonl, parquet files or img2dataset shards) -> deterministic
parts of (key, caption, error) rows -> CLIP text-embedding tables (Parquet), one file per input part."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import encoders, uris
from clipcap_core.configs import to_dict
from clipcap_core.encoders import EncoderConfig
from pipelines import console, rows, runtime, stopping
from pipelines.clip_actor import ClipActor
from pipelines.committer import UnitCommitter
from pipelines.embed import job as embed
from pipelines.embed import stages as st
from pipelines.embed.stages import MAX_SHARD_BYTES, read_shard, shard_name
from pipelines.io import schemas, storage
from pipelines.io.delimited import read_delimited
from pipelines.lease import LEASE_FILE, Lease

FORMATS = ("text", "csv", "tsv", "jsonl", "parquet", "img2dataset")
_EXTENSIONS = {"txt": "text", "text": "text", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl",
               "parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class TextPart:
    part_id: str
    source: str  # file URI the rows come from
    keys: list[str] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "" = a good row

    def __len__(self) -> int:
        return len(self.keys)


def file_format(uri: str) -> str | None:
    """``text`` / ``csv`` / ... from a file name (compression suffixes ignored), None when unknown."""
    name = posixpath.basename(uri).lower()
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    return _EXTENSIONS.get(name.rsplit(".", 1)[-1]) if "." in name else None


def list_inputs(uri: str, fmt: str = "auto") -> list[tuple[str, str]]:
    """(file URI, format) of every input file; a folder with ``.tar`` shards is an img2dataset embed."""
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"input format must be one of {['auto', *FORMATS]}, got {fmt!r}")
    fs, path = uris.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"caption input {uri!r} does not exist")
    if not fs.isdir(path):
        found = fmt if fmt != "auto" else file_format(uri)
        if found is None or found == "img2dataset":
            raise ValueError(f"cannot tell the format of {uri!r}; set --input-format to one of {list(FORMATS)}")
        return [(uri, found)]
    shards = storage.list_files(uri, ".tar")
    if fmt == "img2dataset" or (fmt == "auto" and shards):
        if not shards:
            raise FileNotFoundError(f"no img2dataset shards (*.tar) under {uri!r}")
        return [(s, "img2dataset") for s in shards]
    files = [(f, fmt if fmt != "auto" else file_format(f)) for f in storage.list_files(uri, "")]
    files = [(f, k) for f, k in files if k is not None and not posixpath.basename(f).startswith(("_", "."))]
    if not files:
        raise FileNotFoundError(f"no caption files ({', '.join(sorted(_EXTENSIONS))}) under {uri!r}")
    return files


def _stem(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name.rsplit(".", 1)[0]) or "captions"


def _check(caption: str | None, max_chars: int) -> str:
    if caption is None or not caption.strip():
        return "empty caption"
    if len(caption) > max_chars:
        return f"caption longer than {max_chars} characters ({len(caption)})"
    return ""


def read_text_lines(uri: str, max_chars: int) -> tuple[list[str | None], list[str]]:
    """Captions and per-row errors of a one-caption-per-line file (each line decoded on its own)."""
    with fsspec.open(uri, "rb", compression="infer") as f:
        data = f.read()
    captions: list[str | None] = []
    errors = []
    for raw in data.removesuffix(b"\n").split(b"\n") if data else []:  # a final newline starts no line
        try:
            text: str | None = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            captions.append(None)
            errors.append(f"line is not UTF-8: {exc.reason} at byte {exc.start}")
            continue
        captions.append(text)
        errors.append(_check(text, max_chars))
    return captions, errors


def read_table_file(uri: str, fmt: str, caption_col: str, key_col: str | None
                    ) -> tuple[list[str | None], list[str | None]]:
    """Captions and keys (None: none there) of a csv / tsv / jsonl / parquet file; checks the columns."""
    if fmt in ("csv", "tsv"):
        df = read_delimited(uri, "\t" if fmt == "tsv" else ",", what="caption file")  # names file and line
    else:
        try:
            df = pd.read_parquet(uri) if fmt == "parquet" else pd.read_json(uri, lines=True, dtype=False)
        except ValueError as exc:
            raise ValueError(f"cannot read {uri} as {fmt}: {exc}") from exc
    wanted = [caption_col] + ([key_col] if key_col else [])
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise ValueError(f"{uri} has no column(s) {missing}; it has {list(df.columns)} (set --caption-col / "
                         "--key-col)")
    captions = [None if pd.isna(v) else str(v) for v in df[caption_col].astype("string")]
    keys = ([None if pd.isna(v) else str(v) for v in df[key_col].astype("string")] if key_col
            else [None] * len(df))
    return captions, keys


def read_img2dataset_shard(uri: str, max_chars: int) -> TextPart:
    """Keys and captions of one shard: from its ``.parquet`` sibling, else from the tar's ``.txt`` members."""
    meta = uri.removesuffix(".tar") + ".parquet"
    part = TextPart(part_id=shard_name(uri), source=uri)
    if uris.exists(meta):
        fs, path = uris.filesystem(meta)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        if schemas.CAPTION not in table.column_names or schemas.KEY not in table.column_names:
            raise ValueError(f"img2dataset shard metadata {meta} has no key / caption column (has "
                             f"{table.column_names}); download with a caption column")
        rows = ((k, c, "") for k, c in zip(table.column(schemas.KEY).to_pylist(), table.column(schemas.CAPTION).to_pylist(),
                                            strict=True))
    else:
        fs, path = uris.filesystem(uri)
        with fs.open(path, "rb") as f:
            data = f.read(MAX_SHARD_BYTES + 1)
        if len(data) > MAX_SHARD_BYTES:
            raise ValueError(f"shard {uri} is larger than {MAX_SHARD_BYTES} bytes")
        rows = ((posixpath.basename(s.key), s.files["txt"].decode("utf-8", "replace") if "txt" in s.files
                 else None, s.refused) for s in read_shard(data))
    for key, caption, refused in rows:
        part.keys.append(str(key))
        part.captions.append(caption)
        part.errors.append(refused or _check(caption, max_chars))
    return part


def read_file_parts(uri: str, fmt: str, *, caption_col: str, key_col: str | None, part_size: int,
                    max_chars: int) -> list[TextPart]:
    """The parts of one caption file: ``part_size`` rows each, ids ``<stem>-<00000>``."""
    stem = _stem(uri)
    if fmt == "text":
        captions, errors = read_text_lines(uri, max_chars)
        given: list[str | None] = [None] * len(captions)
    else:
        captions, given = read_table_file(uri, fmt, caption_col, key_col)
        errors = [_check(c, max_chars) for c in captions]
    keys = [k if k is not None else f"{stem}-{i:08d}" for i, k in enumerate(given)]
    parts = []
    for n, start in enumerate(range(0, max(len(keys), 1), part_size)):
        sl = slice(start, start + part_size)
        parts.append(TextPart(f"{stem}-{n:05d}", uri, keys[sl], captions[sl], errors[sl]))
    return parts


def plan_parts(uri: str, fmt: str = "auto", *, caption_col: str = schemas.CAPTION, key_col: str | None = None,
               part_size: int = 10000, max_chars: int = 2000) -> list[TextPart]:
    """Every part of the input, in a deterministic order; part ids must be unique (two files with one stem fail)."""
    parts: list[TextPart] = []
    for file, kind in list_inputs(uri, fmt):
        if kind == "img2dataset":
            parts.append(read_img2dataset_shard(file, max_chars))
        else:
            parts.extend(read_file_parts(file, kind, caption_col=caption_col, key_col=key_col,
                                         part_size=part_size, max_chars=max_chars))
    seen: dict[str, str] = {}
    for p in parts:
        if p.part_id in seen:
            raise ValueError(f"inputs {seen[p.part_id]} and {p.source} give the same part id {p.part_id!r}: "
                             "rename one of the files")
        seen[p.part_id] = p.source
    return parts


def plan_digest(parts: list[TextPart]) -> str:
    """A digest of the plan (part ids, sources, keys and captions): a rerun on changed input is refused."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps([p.part_id, p.source, p.keys, p.captions]).encode())
    return h.hexdigest()[:16]


log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EmbedTextConfig(embed.TableOutput):
    """The ``clipcap embed-text`` config: each field is a flag, ``CLI_FLAGS`` the renamed."""

    KIND: ClassVar[str] = "text-embeddings"
    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"output_root": "--output"}
    input: str
    """caption file (txt: one per line; csv/tsv/jsonl/parquet), a folder of them, or an img2dataset output folder"""
    output_root: str  # storage root; tables go to <output>/text-embeddings/<dataset>/<clip-tag>/
    dataset: str  # dataset name in the output path
    input_format: Literal["auto", "text", "csv", "tsv", "jsonl", "parquet", "img2dataset"] = "auto"
    """input kind (auto: by extension; img2dataset: webdataset shards with their captions)"""
    caption_col: str = "caption"  # caption column of csv/tsv/jsonl/parquet input
    key_col: str | None = None  # key column (default: <file stem>-<row>; img2dataset: its keys)
    part_size: int = 10000  # captions per output part (files; an img2dataset shard is one part)
    max_caption_chars: int = 2000  # longer captions are error rows (bounded work per row)
    encoder: EncoderConfig = EncoderConfig()
    dtype: Literal["float32", "float16"] = "float32"  # stored embedding dtype
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 autocast on GPU, fp32 on CPU
    resources: embed.EmbedResources = embed.EmbedResources(batch_size=256)
    force_unlock: bool = False
    """take the table's lease (_meta/.../lease.json) even from a run that looks alive"""

    def __post_init__(self) -> None:
        if self.part_size < 1 or self.max_caption_chars < 1:
            raise ValueError("part_size and max_caption_chars must be >= 1")


@dataclass
class EmbedTextResult:
    table_uri: str
    parts: int
    skipped: int
    written: int
    rows: int
    errors: int
    truncated: int
    dim: int
    wall_s: float

    def describe(self) -> str:
        return (f"embedded {self.rows} caption(s) into {self.written} new part file(s) at {self.table_uri} "
                f"({self.skipped} of {self.parts} part(s) already done, {self.errors} error row(s), "
                f"{self.truncated} caption(s) truncated to the CLIP context, D={self.dim}, {self.wall_s:.1f}s)")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- planning and validation (no Ray) ---------------------------------------------------------------------
def _run_record(cfg: EmbedTextConfig, parts: list[TextPart]) -> dict[str, Any]:
    return {"input": cfg.input, "input_format": cfg.input_format, "caption_col": cfg.caption_col,
            "key_col": cfg.key_col, "part_size": cfg.part_size, "max_caption_chars": cfg.max_caption_chars,
            "encoder": to_dict(cfg.encoder), "dtype": cfg.dtype, "plan_digest": plan_digest(parts)}


def validate(cfg: EmbedTextConfig) -> list[TextPart]:
    """All job-level checks before any work (model, dtype, input columns, output); the parts."""
    encoders.validate_config(cfg.encoder)
    schemas.embedding_type(1, cfg.dtype)
    parts = plan_parts(cfg.input, cfg.input_format, caption_col=cfg.caption_col, key_col=cfg.key_col,
                       part_size=cfg.part_size, max_chars=cfg.max_caption_chars)
    encoders.fetch_pretrained(cfg.encoder)  # an unreachable hub fails here, not in a restarting actor
    storage.check_writable(cfg.table_uri)
    return parts


def claim(cfg: EmbedTextConfig, parts: list[TextPart]) -> None:
    """Refuse a table made from other input or settings, else record this run's (holding the table's lease)."""
    record, run_uri = _run_record(cfg, parts), storage.join(cfg.meta_uri, "run.json")
    previous = storage.read_json(run_uri)
    if previous is not None and previous != record:
        changed = sorted(k for k in record if previous.get(k) != record[k])
        raise ValueError(f"text table {cfg.table_uri} was made from other input or settings (changed: "
                         f"{', '.join(changed)}); use another --dataset, or delete the table to redo it")
    storage.write_json(record, run_uri)


def pending_parts(cfg: EmbedTextConfig, parts: list[TextPart]) -> list[TextPart]:
    done = cfg.units.done()
    return [p for p in parts if p.part_id not in done]


# --- output tables ------------------------------------------------------------------------------------------
def build_tables(table: pa.Table, dim: int, dtype: str, meta: dict[str, str]) -> tuple[pa.Table, list[dict[str, str]]]:
    """Text table (sorted by key, first row per key) + error rows of one part's rows."""
    keep, uniq, errs = embed.rows_to_keep(table, failed_stage="read", duplicate_stage="embed-text", unit="part")
    truncated = sum(table.column(st.TRUNCATED).take(pa.array(keep, pa.int64())).to_pylist())
    schema = schemas.with_metadata(schemas.text_embedding_schema(dim, dtype),
                                   {**meta, schemas.META_TRUNCATED: str(truncated)})
    np_dtype = np.float16 if dtype == "float16" else np.float32
    arrays = [pa.array(uniq.tolist(), pa.string()), embed.strings(table, st.CAPTION, keep),
              embed.vectors(table, rows.TEXT_EMBEDDING, keep, dim, np_dtype)]
    return pa.Table.from_arrays(arrays, schema=schema), errs


# --- the Ray pipeline ---------------------------------------------------------------------------------------
def part_block(part: TextPart) -> pa.Table:
    """A part as one block of rows with the committer's columns (part id, index, total)."""
    n = len(part)
    return pa.table({st.SHARD: [part.part_id] * n, st.INDEX: pa.array(range(n), pa.int64()),
                     st.TOTAL: pa.array([n] * n, pa.int64()),
                     st.KEY: pa.array(part.keys, pa.string()), st.CAPTION: pa.array(part.captions, pa.string()),
                     st.SOURCE: [f"{part.source}#{k}" for k in part.keys], st.ERROR: part.errors})


def build_dataset(cfg: EmbedTextConfig, pending: list[TextPart]) -> Any:
    """The Ray Data pipeline over the pending parts (lazy; iterate it to run)."""
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray

    res = cfg.resources
    cluster = runtime.ClusterShape.from_ray()
    plan = res.plan(cluster)  # no decode tasks here: the driver ships the text parts as blocks
    log.info(plan.describe("embed-text", cluster))
    ds = ray.data.from_arrow([part_block(p) for p in pending if len(p)])
    return ds.map_batches(
        ClipActor, batch_size=res.batch_size, **plan.pool_args(),
        fn_constructor_kwargs={"encoder": cfg.encoder, "precision": cfg.precision, "use_gpu": plan.use_gpu,
                               "threads": plan.torch_threads, "images": False, "texts": True,
                               "count_truncated": True})


class TextCommitter(UnitCommitter):
    """embed-text's committer; a text part has no unreadable input (it was read on the driver)."""

    def __init__(self, cfg: EmbedTextConfig, parts: list[TextPart], dim: int):
        super().__init__(unit=st.SHARD, index=st.INDEX, total=st.TOTAL, noun="part")
        self.cfg, self.dim, self.parts = cfg, dim, {p.part_id: p for p in parts}

    def commit(self, unit: str, table: pa.Table | None) -> tuple[int, int, int]:
        """Commit one part (``UnitTable.write``); returns (rows, error rows, truncated)."""
        cfg, model = self.cfg, self.cfg.encoder.model_name
        meta = schemas.embedding_metadata(
            clip_model=model, clip_pretrained=cfg.encoder.pretrained, dim=self.dim, dtype=cfg.dtype,
            preprocess=f"text: open_clip tokenizer of {model}, truncated to its context",
            source_shard=self.parts[unit].source)
        if table is None:  # an empty part still gets its done-marker, so reruns skip it
            strings = {k: pa.array([], pa.string()) for k in (st.KEY, st.CAPTION, st.SOURCE, st.ERROR)}
            table = pa.table({**strings, st.TRUNCATED: pa.array([], pa.bool_()),
                              rows.TEXT_EMBEDDING: pa.array([], pa.binary())})
        table, errs = build_tables(table, self.dim, cfg.dtype, meta)
        cfg.units.write(unit, table, pa.Table.from_pylist(errs, schema=schemas.ERRORS_SCHEMA),
                        {"part": unit, "errors": len(errs)})
        return table.num_rows, len(errs), int(table.schema.metadata[schemas.META_TRUNCATED.encode()])


def _drain(cfg: EmbedTextConfig, committer: TextCommitter, dim: int) -> tuple[int, int, int]:
    """Run the pipeline over the committer's parts, committing each as it completes: (rows, errors, truncated)."""
    pending = list(committer.parts.values())
    done: list[tuple[int, int, int]] = []
    if any(len(p) for p in pending):
        with console.Progress("embed-text", len(pending), unit="parts", rows="captions") as progress:
            for batch in build_dataset(cfg, pending).iter_batches(batch_size=None, batch_format="pyarrow",
                                                                    prefetch_batches=0):  # see embed._drain
                got = rows.vector_dim(batch.column(rows.TEXT_EMBEDDING)) or dim
                if got != dim:
                    raise ValueError(f"model {cfg.encoder.model_name} gave D={got}, its config says {dim}")
                new = committer.add(batch)
                progress.update(len(new), sum(d[0] for d in new), sum(d[1] for d in new))
                done += new
    done += committer.finish("embed-text", committer.parts)  # + parts without rows
    return sum(d[0] for d in done), sum(d[1] for d in done), sum(d[2] for d in done)


def run_embed_text(cfg: EmbedTextConfig, ray_address: str | None = None) -> EmbedTextResult:
    """Validate, then embed every part without a committed part file; returns counts and timings."""
    t0 = time.perf_counter()
    parts = validate(cfg)
    with Lease(storage.join(cfg.meta_uri, LEASE_FILE), force=cfg.force_unlock) as lease:  # one run per table
        claim(cfg, parts)
        dim = encoders.embedding_dim(cfg.encoder)
        pending = pending_parts(cfg, parts)
        result = EmbedTextResult(table_uri=cfg.table_uri, parts=len(parts), skipped=len(parts) - len(pending),
                                 written=len(pending), rows=0, errors=0, truncated=0, dim=dim, wall_s=0.0)
        if pending:
            committer = TextCommitter(cfg, pending, dim)
            committer.guard = lease.check
            # a stop or a failed commit names the parts committed so far (earlier runs' included)
            with stopping.counting(lambda: (result.skipped + len(committer.committed), result.parts), "part"):
                runtime.ensure_ray(ray_address)
                cfg.units.remove_temporaries()
                log.info("embedding %d caption part(s) of %s with %s -> %s", len(pending), cfg.input,
                         cfg.encoder, cfg.table_uri)
                result.rows, result.errors, result.truncated = _drain(cfg, committer, dim)
    result.wall_s = time.perf_counter() - t0
    log.info(result.describe())
    return result

"""Embed-text stage: a caption corpus -> CLIP text-embedding tables (Parquet), one file per input part."""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa

from clipcap_core import encoders
from clipcap_core.configs import to_dict
from clipcap_core.encoders import EncoderConfig
from pipelines import console, rows, runtime, stopping
from pipelines.clip_actor import ClipActor
from pipelines.committer import UnitCommitter
from pipelines.embed import job as embed
from pipelines.embed import output
from pipelines.embed import stages as st
from pipelines.io import schemas, storage, text_sources
from pipelines.lease import LEASE_FILE, Lease

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EmbedTextConfig:
    """The ``clipcap embed-text`` config: each field is a flag (``pipelines.commands.flags``), ``CLI_FLAGS`` the
    renamed."""

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

    @property
    def table_uri(self) -> str:
        return storage.join(self.output_root, "text-embeddings", self.dataset, encoders.encoder_tag(self.encoder))

    @property
    def meta_uri(self) -> str:
        """Bookkeeping (errors table, empty-part markers, run record), outside the folder readers glob."""
        return storage.join(self.output_root, embed.META_DIR, "text-embeddings", self.dataset,
                            encoders.encoder_tag(self.encoder))


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
def _run_record(cfg: EmbedTextConfig, parts: list[text_sources.TextPart]) -> dict[str, Any]:
    return {"input": cfg.input, "input_format": cfg.input_format, "caption_col": cfg.caption_col,
            "key_col": cfg.key_col, "part_size": cfg.part_size, "max_caption_chars": cfg.max_caption_chars,
            "encoder": to_dict(cfg.encoder), "dtype": cfg.dtype, "plan_digest": text_sources.plan_digest(parts)}


def validate(cfg: EmbedTextConfig) -> list[text_sources.TextPart]:
    """All job-level checks before any work (model, dtype, input columns, output); the parts."""
    encoders.validate_config(cfg.encoder)
    schemas.embedding_type(1, cfg.dtype)
    parts = text_sources.plan_parts(cfg.input, cfg.input_format, caption_col=cfg.caption_col, key_col=cfg.key_col,
                                    part_size=cfg.part_size, max_chars=cfg.max_caption_chars)
    encoders.fetch_pretrained(cfg.encoder)  # an unreachable hub fails here, not in a restarting actor
    storage.check_writable(cfg.table_uri)
    return parts


def claim(cfg: EmbedTextConfig, parts: list[text_sources.TextPart]) -> None:
    """Refuse a table made from other input or settings, else record this run's (holding the table's lease)."""
    record, run_uri = _run_record(cfg, parts), storage.join(cfg.meta_uri, "run.json")
    previous = storage.read_json(run_uri)
    if previous is not None and previous != record:
        changed = sorted(k for k in record if previous.get(k) != record[k])
        raise ValueError(f"text table {cfg.table_uri} was made from other input or settings (changed: "
                         f"{', '.join(changed)}); use another --dataset, or delete the table to redo it")
    storage.write_json(record, run_uri)


def pending_parts(cfg: EmbedTextConfig, parts: list[text_sources.TextPart]) -> list[text_sources.TextPart]:
    done = set(storage.list_files(cfg.table_uri, ".parquet"))
    done |= {output.part_uri(cfg.table_uri, posixpath.basename(u).removesuffix(".json").removeprefix("part-"))
             for u in storage.list_files(storage.join(cfg.meta_uri, "empty"), ".json")}
    return [p for p in parts if output.part_uri(cfg.table_uri, p.part_id) not in done]


# --- output tables ------------------------------------------------------------------------------------------
def build_tables(table: pa.Table, dim: int, dtype: str, meta: dict[str, str]) -> tuple[pa.Table, list[dict[str, str]]]:
    """Text table (sorted by key, first row per key) + error rows of one part's rows."""
    keep, uniq, errs = output.rows_to_keep(table, failed_stage="read", duplicate_stage="embed-text", unit="part")
    truncated = sum(table.column(st.TRUNCATED).take(pa.array(keep, pa.int64())).to_pylist())
    schema = schemas.with_metadata(schemas.text_embedding_schema(dim, dtype),
                                   {**meta, schemas.META_TRUNCATED: str(truncated)})
    np_dtype = np.float16 if dtype == "float16" else np.float32
    arrays = [pa.array(uniq.tolist(), pa.string()), output.strings(table, st.CAPTION, keep),
              output.vectors(table, rows.TEXT_EMBEDDING, keep, dim, np_dtype)]
    return pa.Table.from_arrays(arrays, schema=schema), errs


def commit_part(cfg: EmbedTextConfig, part: text_sources.TextPart, table: pa.Table | None,
                dim: int) -> tuple[int, int, int]:
    """Errors table (if any), then the part file (the commit marker). Returns (rows, error rows, truncated)."""
    meta = schemas.embedding_metadata(
        clip_model=cfg.encoder.model_name, clip_pretrained=cfg.encoder.pretrained, dim=dim, dtype=cfg.dtype,
        preprocess=f"text: open_clip tokenizer of {cfg.encoder.model_name}, truncated to its context",
        source_shard=part.source)
    if table is None:  # an empty part still gets its done-marker, so reruns skip it
        table = pa.table({**{k: pa.array([], pa.string()) for k in (st.KEY, st.CAPTION, st.SOURCE, st.ERROR)},
                          st.TRUNCATED: pa.array([], pa.bool_()), rows.TEXT_EMBEDDING: pa.array([], pa.binary())})
    table, errs = build_tables(table, dim, cfg.dtype, meta)
    if errs:
        storage.atomic_write_table(pa.Table.from_pylist(errs, schema=schemas.ERRORS_SCHEMA),
                                   output.errors_uri(cfg.meta_uri, part.part_id), tmp_dir=output.tmp_uri(cfg.meta_uri))
    if table.num_rows:  # last: the commit marker
        storage.atomic_write_table(table, output.part_uri(cfg.table_uri, part.part_id),
                                   tmp_dir=output.tmp_uri(cfg.meta_uri))
    else:  # a 0-row Parquet file breaks Hugging Face datasets: the done-marker lives under _meta instead
        storage.write_json({"part": part.part_id, "errors": len(errs)}, output.empty_uri(cfg.meta_uri, part.part_id))
    return table.num_rows, len(errs), int(table.schema.metadata[schemas.META_TRUNCATED.encode()])


# --- the Ray pipeline ---------------------------------------------------------------------------------------
def part_block(part: text_sources.TextPart) -> pa.Table:
    """A part as one block of rows tagged with the part id, member index and row count (the committer's
    columns, as the image embed stage's)."""
    n = len(part)
    return pa.table({st.SHARD: [part.part_id] * n, st.INDEX: pa.array(range(n), pa.int64()),
                     st.TOTAL: pa.array([n] * n, pa.int64()),
                     st.KEY: pa.array(part.keys, pa.string()), st.CAPTION: pa.array(part.captions, pa.string()),
                     st.SOURCE: [f"{part.source}#{k}" for k in part.keys], st.ERROR: part.errors})


def build_dataset(cfg: EmbedTextConfig, pending: list[text_sources.TextPart]) -> Any:
    """The Ray Data pipeline over the pending parts (lazy; iterate it to run)."""
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray

    res = cfg.resources
    cluster = runtime.ClusterShape.from_ray()
    plan = res.plan(cluster)  # no decode tasks here: the driver ships the text parts as blocks
    log.info(plan.describe("embed-text", cluster))
    ds = ray.data.from_arrow([part_block(p) for p in pending if len(p)])
    return ds.map_batches(
        ClipActor, batch_size=res.batch_size, batch_format="pyarrow",
        **plan.pool_args(),
        fn_constructor_kwargs={"encoder": cfg.encoder, "precision": cfg.precision, "use_gpu": plan.use_gpu,
                               "threads": plan.torch_threads, "images": False, "texts": True,
                               "count_truncated": True})


class TextCommitter(UnitCommitter):
    """embed-text's driver side: rows back into parts (the image embed stage's columns), each complete part
    committed by ``commit_part``; a text part has no unreadable input (its reading happened on the driver)."""

    def __init__(self, cfg: EmbedTextConfig, parts: list[text_sources.TextPart], dim: int):
        super().__init__(unit=st.SHARD, index=st.INDEX, total=st.TOTAL, noun="part")
        self.cfg, self.dim, self.parts = cfg, dim, {p.part_id: p for p in parts}

    def commit(self, unit: str, table: pa.Table | None) -> tuple[int, int, int]:
        return commit_part(self.cfg, self.parts[unit], table, self.dim)


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
        return _embed_text(cfg, parts, lease, t0, ray_address)


def _embed_text(cfg: EmbedTextConfig, parts: list[text_sources.TextPart], lease: Lease, t0: float,
                ray_address: str | None) -> EmbedTextResult:
    """``run_embed_text`` once the table's lease is held and the run recorded."""
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
            output.remove_stale_temporaries(cfg.table_uri, cfg.meta_uri)
            log.info("embedding %d caption part(s) of %s with %s -> %s", len(pending), cfg.input, cfg.encoder,
                     cfg.table_uri)
            result.rows, result.errors, result.truncated = _drain(cfg, committer, dim)
    result.wall_s = time.perf_counter() - t0
    log.info(result.describe())
    return result

"""Embed stage: img2dataset webdataset shards -> CLIP embedding tables, one Parquet file per shard."""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import encoders, imaging, uris
from clipcap_core.encoders import EncoderConfig
from pipelines import console, exitcodes, rows, runtime, stopping
from pipelines.clip_actor import ClipActor
from pipelines.committer import UnitCommitter, UnitTable
from pipelines.embed import stages as st
from pipelines.io import schemas, sources, storage
from pipelines.lease import LEASE_FILE, Lease

log = logging.getLogger(__name__)

META_DIR = "_meta"


@dataclass(frozen=True, kw_only=True)
class EmbedResources:
    """How embed uses the cluster (the one place it is set); 0 / None: sized by ``runtime.plan_actors``."""

    num_actors: int = 0
    """CLIP actors, one model each (0: one per GPU; on CPU one per core, up to 8 per node, and on one node those as
    concurrent batches of one actor)"""
    cpus_per_actor: float = 0.0  # Ray CPUs reserved per CLIP actor (0: 1; not a thread cap)
    gpus_per_actor: float | None = None  # GPUs per CLIP actor (default: 1 when the cluster has GPUs, else 0)
    torch_threads: int = 0  # torch threads per CPU actor (0: the node's cores / its actors)
    batch_size: int = 64  # rows per CLIP forward
    decode_cpus: float = 0.0  # CPUs per decode task (0: 1)
    decode_memory_mb: int = 1024  # + torch for the transforms; keeps decode unfused
    """memory per decode task (a shard is read whole)"""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or min(self.num_actors, self.cpus_per_actor, self.decode_cpus, self.torch_threads) < 0:
            raise ValueError("batch_size must be positive; actors, CPUs and threads >= 0 (0 = size from the cluster)")

    def plan(self, cluster: runtime.ClusterShape) -> runtime.ActorPlan:
        plan = runtime.plan_actors(cluster, actors=self.num_actors, cpus_per_actor=self.cpus_per_actor,
                                   gpus_per_actor=self.gpus_per_actor, torch_threads=self.torch_threads,
                                   read_cpus=self.decode_cpus)
        return plan if self.num_actors else runtime.share_process(plan, cluster)


class TableOutput:
    """Where a config with ``output_root``, ``dataset`` and ``encoder`` writes its ``KIND`` of table."""

    KIND: ClassVar[str]
    output_root: str
    dataset: str
    encoder: EncoderConfig

    @property
    def table_uri(self) -> str:
        return storage.join(self.output_root, self.KIND, self.dataset, encoders.encoder_tag(self.encoder))

    @property
    def meta_uri(self) -> str:
        tag = encoders.encoder_tag(self.encoder)
        return storage.join(self.output_root, META_DIR, self.KIND, self.dataset, tag)

    @property
    def units(self) -> UnitTable:
        return UnitTable(self.table_uri, self.meta_uri)


@dataclass(frozen=True, kw_only=True)
class EmbedConfig(TableOutput):
    """The ``clipcap embed`` config: each field is a flag (``pipelines.commands.flags``), ``CLI_FLAGS`` the renamed."""

    KIND: ClassVar[str] = "embeddings"
    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"output_root": "--output"}
    input: str  # img2dataset output folder (webdataset .tar shards + per-shard .parquet)
    output_root: str  # storage root; tables go to <output>/embeddings/<dataset>/<clip-tag>/
    dataset: str  # dataset name in the output path
    encoder: EncoderConfig = EncoderConfig()
    dtype: Literal["float32", "float16"] = "float32"  # stored embedding dtype
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 autocast on GPU, fp32 on CPU
    text_embeddings: bool = False  # also embed the captions
    resources: EmbedResources = EmbedResources()
    force_unlock: bool = False
    """take the table's lease (_meta/.../lease.json) even from a run that looks alive"""


@dataclass
class EmbedResult:
    table_uri: str
    shards: int
    skipped: int
    written: int
    rows: int
    errors: int
    dim: int
    wall_s: float
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, rows so far)
    failed: dict[str, str] = field(default_factory=dict)  # shard URI -> why it could not be read (not committed)

    def describe(self) -> str:
        text = (f"embedded {self.rows} rows into {self.written} new shard file(s) at {self.table_uri} "
                f"({self.skipped} of {self.shards} shard(s) already done, {self.errors} error row(s), D={self.dim}, "
                f"{self.wall_s:.1f}s)")
        if self.failed:
            text += (f"; {len(self.failed)} shard(s) could not be read and are NOT done (a rerun retries them): "
                     + "; ".join(f"{u}: {why}" for u, why in sorted(self.failed.items())[:5]))
        return text

    @property
    def exit_code(self) -> int:
        return exitcodes.outcome(self.shards - len(self.failed), len(self.failed))

    @property
    def first_rows_s(self) -> float | None:
        """Start-up: seconds from the call to the first embedded rows reaching the driver."""
        return self.timeline[0][0] if self.timeline else None

    @property
    def steady_rows_per_s(self) -> float | None:
        """Rows/s from the arrival that passes 10% of the rows to the last one (start-up excluded)."""
        if len(self.timeline) < 3:
            return None
        total = self.timeline[-1][1]
        t0, r0 = next((t, r) for t, r in self.timeline if r >= 0.1 * total)
        t1, r1 = self.timeline[-1]
        return (r1 - r0) / (t1 - t0) if t1 > t0 and r1 > r0 else None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "timeline"}
        return {**out, "first_rows_s": self.first_rows_s, "steady_rows_per_s": self.steady_rows_per_s}


# --- planning and validation (no Ray) ---------------------------------------------------------------

def list_shards(input_uri: str) -> list[str]:
    return storage.list_files(input_uri, ".tar")


def pending_shards(cfg: EmbedConfig, shards: list[str]) -> list[str]:
    done = cfg.units.done()
    return [s for s in shards if st.shard_name(s) not in done]


def check_input(cfg: EmbedConfig, shards: list[str]) -> None:
    """The shards must hold images (and captions when text embeddings are asked for); checks one sample."""
    if not shards:
        raise FileNotFoundError(f"no webdataset shards (*.tar) under {cfg.input!r}; run the download stage first")
    for uri in shards:
        key, files, error = next(sources.webdataset_samples(uri), ("", {}, "no sample"))
        if error is not None:
            continue  # a corrupt shard becomes an error row; look at the next one
        names = [f"{posixpath.basename(key)}.{ext}" for ext in files]
        if not any(imaging.is_image_name(n) for n in names):
            raise ValueError(f"input shards have no image column: first sample of {uri} has {names}")
        if cfg.text_embeddings and "txt" not in files:
            raise ValueError(f"text_embeddings needs captions, but the first sample of {uri} has no .txt: {names}")
        return


def validate(cfg: EmbedConfig) -> list[str]:
    """All job-level checks, before any work; returns the input shard URIs."""
    encoders.validate_config(cfg.encoder)
    schemas.embedding_type(1, cfg.dtype)
    shards = list_shards(cfg.input)
    check_input(cfg, shards)
    encoders.fetch_pretrained(cfg.encoder)  # an unreachable hub fails here, not in a restarting actor
    storage.check_writable(cfg.table_uri)
    return shards


# --- the Ray pipeline ---------------------------------------------------------------------------------

def build_dataset(cfg: EmbedConfig, pending: list[str]) -> Any:
    """The Ray Data pipeline over ``pending`` shard URIs (lazy; iterate it to run)."""
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray

    res = cfg.resources
    cluster = runtime.ClusterShape.from_ray()
    plan = res.plan(cluster)
    log.info(plan.describe("embed", cluster))
    spec = encoders.preprocess_spec(cfg.encoder)
    ds = ray.data.from_items([{"uri": u} for u in pending], override_num_blocks=len(pending))
    # One block per decoded batch: the actors start on the first batch, and rows stream back batch by batch.
    ds.context.target_max_block_size = runtime.pixel_block_bytes(res.batch_size, spec.size)
    ds = ds.map_batches(st.decode_shards, batch_size=1, batch_format="pyarrow", num_cpus=plan.read_cpus,
                        memory=res.decode_memory_mb * 2**20, fn_kwargs={"spec": spec, "batch_rows": res.batch_size})
    return ds.map_batches(
        ClipActor, batch_size=res.batch_size, **plan.pool_args(),
        fn_constructor_kwargs={"encoder": cfg.encoder, "precision": cfg.precision, "threads": plan.torch_threads,
                               "use_gpu": plan.use_gpu, "texts": cfg.text_embeddings})


def _drain(cfg: EmbedConfig, ds: Any, pending: list[str], dim: int, t0: float, result: EmbedResult,
           guard: Callable[[], None] | None = None) -> None:
    committer = ShardCommitter(cfg, pending, dim)
    committer.guard = guard
    done: list[tuple[int, int]] = []
    seen = 0
    timeline: list[tuple[float, int]] = []
    # prefetch_batches=0: a block is handed over as soon as it is done (Ray Data's default prefetch of 1 holds
    # each block back until the next is done too, so the first rows and each shard commit come one actor task
    # late).
    with stopping.counting(lambda: (result.skipped + len(committer.committed), result.shards), "shard"), \
            console.Progress("embed", len(pending), unit="shards", rows="images") as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            got = rows.vector_dim(batch.column(rows.EMBEDDING)) or dim
            if got != dim:
                raise ValueError(f"model {cfg.encoder.model_name} gave D={got}, its config says {dim}")
            seen += batch.num_rows
            timeline.append((time.perf_counter() - t0, seen))
            new = committer.add(batch)
            progress.update(len(new), sum(n for n, _ in new), sum(e for _, e in new))
            done += new
        done += committer.finish("embedding", committer.uris)  # + shards with no samples at all
    result.rows, result.errors = sum(n for n, _ in done), sum(e for _, e in done)
    result.timeline = timeline
    result.failed = {committer.uris[s]: why for s, why in committer.failed.items()}


def run_embed(cfg: EmbedConfig, ray_address: str | None = None) -> EmbedResult:
    """Validate, then embed every shard without a committed part file; returns counts and timings."""
    t0 = time.perf_counter()
    shards = validate(cfg)
    with Lease(storage.join(cfg.meta_uri, LEASE_FILE), force=cfg.force_unlock) as lease:  # one run per table
        dim = encoders.embedding_dim(cfg.encoder)
        pending = pending_shards(cfg, shards)
        result = EmbedResult(table_uri=cfg.table_uri, shards=len(shards), skipped=len(shards) - len(pending),
                             written=len(pending), rows=0, errors=0, dim=dim, wall_s=0.0)
        if pending:
            # a stop before any commit names the shards of earlier runs
            with stopping.counting(lambda: (result.skipped, result.shards), "shard"):
                runtime.ensure_ray(ray_address)
                cfg.units.remove_temporaries()
                log.info("embedding %d shard(s) of %s with %s -> %s", len(pending), cfg.input, cfg.encoder,
                         cfg.table_uri)
                _drain(cfg, build_dataset(cfg, pending), pending, dim, t0, result, lease.check)
            result.written -= len(result.failed)
    result.wall_s = time.perf_counter() - t0
    log.info(result.describe())
    return result


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
    """Of one unit's rows: the indices to write (sorted by key, first row per key), their keys, and the
    error rows (failed rows, repeated keys). Shared by embed and embed-text."""
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
    values = rows.vectors(table.column(name).take(pa.array(take, pa.int64())), dim)  # (N, D) float32
    return pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np_dtype).reshape(-1)), dim)


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


def download_incomplete(shard_uri: str) -> str | None:
    """Why a shard is not final: img2dataset recorded transient failures its download stage retries."""
    # lazy: pandas ~0.55 s to import (python -X importtime)
    from pipelines.download.job import is_transient

    n = sum(1 for e in _download_errors(shard_uri) if is_transient(e["error"]))
    return (f"{n} sample(s) failed to download with transient errors; rerun the download, then embed again"
            if n else None)


def commit_shard(cfg: EmbedConfig, shard_uri: str, table: pa.Table | None, dim: int) -> tuple[int, int]:
    """Commit one shard (``UnitTable.write``); returns (rows, error rows)."""
    shard = st.shard_name(shard_uri)
    meta = schemas.embedding_metadata(
        clip_model=cfg.encoder.model_name, clip_pretrained=cfg.encoder.pretrained, dim=dim, dtype=cfg.dtype,
        preprocess=encoders.preprocess_spec(cfg.encoder).describe(), source_shard=shard_uri)
    if table is None:  # a shard without samples still gets its done-marker, so reruns skip it
        table = pa.table({**{k: pa.array([], pa.string()) for k in (st.KEY, st.CAPTION, st.URL, st.SOURCE, st.ERROR)},
                          rows.EMBEDDING: pa.array([], pa.binary()), rows.TEXT_EMBEDDING: pa.array([], pa.binary())})
    table, errs = build_tables(table, cfg, dim, meta)
    errs = _download_errors(shard_uri) + errs
    cfg.units.write(shard, table, pa.Table.from_pylist(errs, schema=schemas.ERRORS_SCHEMA),
                    {"shard": shard_uri, "rows": 0, "errors": len(errs)})
    return table.num_rows, len(errs)


class ShardCommitter(UnitCommitter):
    """Embed's committer: units are shard names, ``uris`` maps them to the shards."""

    def __init__(self, cfg: EmbedConfig, shard_uris: list[str], dim: int):
        super().__init__(unit=st.SHARD, index=st.INDEX, total=st.TOTAL, noun="shard")
        self.cfg, self.dim = cfg, dim
        self.uris = {st.shard_name(u): u for u in shard_uris}

    def unread(self, unit: str, table: pa.Table | None) -> str | None:
        """The shard's read error (not a per-sample one), else ``download_incomplete``."""
        unread = [] if table is None else table.column(st.UNREAD).to_pylist()
        if any(unread):
            return str(table.column(st.ERROR)[unread.index(True)].as_py())
        return download_incomplete(self.uris[unit])

    def commit(self, unit: str, table: pa.Table | None) -> tuple[int, int]:
        return commit_shard(self.cfg, self.uris[unit], table, self.dim)

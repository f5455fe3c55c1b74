"""Embed stage: img2dataset webdataset shards -> CLIP embedding tables (Parquet), one file per input shard.

    result = run_embed(EmbedConfig(input="s3://b/cc3m/raw", output_root="s3://b/clipcap", dataset="cc3m",
                                   encoder=EncoderConfig(model_name="ViT-B-32", pretrained="openai")))

Data flow (Ray Data, streaming):
  shard URIs --decode tasks (read tar, decode, resize to uint8)--> row batches
             --actor pool (EmbedActor: normalise + CLIP forward, GPU + autocast when present)--> embedded rows
             --driver (ShardAssembler)--> ``<root>/embeddings/<dataset>/<clip-tag>/part-<shard>.parquet``
                                          and ``.../_errors/part-<shard>.parquet``
A shard is committed (atomic write) as soon as all its rows are back, so a killed run loses at most the
shards in flight, and a rerun skips every shard whose ``part-<shard>.parquet`` exists: no duplicates, and a
finished table makes a rerun a no-op that starts no Ray work at all.

Everything that can be checked is checked before Ray starts: the CLIP model name and weights, the input shards
(present, holding images; captions when text embeddings are asked for), the output is writable.
Resources (actor count, CPUs/GPUs per actor, torch threads, batch size, decode task CPUs/memory) live in
``EmbedResources``, the one place this pipeline sets them.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import encoders
from clipcap_core.encoders import EncoderConfig
from pipelines import embed_stages as st
from pipelines import imaging, schemas, storage

log = logging.getLogger(__name__)

ERRORS_DIR = "_errors"


@dataclass(frozen=True, kw_only=True)
class EmbedResources:
    """How the embed pipeline uses the cluster (the only place it is set)."""

    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    torch_threads: int = 0  # CPU actors: torch intra-op threads; 0 = cpus_per_actor (never oversubscribe)
    batch_size: int = 64
    decode_cpus: float = 1.0
    decode_memory_mb: int = 1024  # a shard is read whole (+ torch for the transforms); keeps decode unfused

    def __post_init__(self) -> None:
        if self.num_actors < 1 or self.batch_size < 1 or self.cpus_per_actor <= 0 or self.decode_cpus <= 0:
            raise ValueError("num_actors, batch_size, cpus_per_actor and decode_cpus must be positive")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    input: str  # img2dataset output folder (webdataset .tar shards + per-shard .parquet)
    output_root: str
    dataset: str
    encoder: EncoderConfig = EncoderConfig()
    dtype: Literal["float32", "float16"] = "float32"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 autocast on GPU, fp32 on CPU
    text_embeddings: bool = False
    resources: EmbedResources = EmbedResources()

    @property
    def table_uri(self) -> str:
        return storage.join(self.output_root, "embeddings", self.dataset, encoders.encoder_tag(self.encoder))


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

    def describe(self) -> str:
        return (f"embedded {self.rows} rows into {self.written} new shard file(s) at {self.table_uri} "
                f"({self.skipped} of {self.shards} shard(s) already done, {self.errors} error row(s), D={self.dim}, "
                f"{self.wall_s:.1f}s)")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "timeline"}


# --- planning and validation (no Ray) ---------------------------------------------------------------

def list_shards(input_uri: str) -> list[str]:
    return storage.list_files(input_uri, ".tar")


def part_uri(table_uri: str, shard: str) -> str:
    return storage.join(table_uri, f"part-{shard}.parquet")


def errors_uri(table_uri: str, shard: str) -> str:
    return storage.join(table_uri, ERRORS_DIR, f"part-{shard}.parquet")


def pending_shards(cfg: EmbedConfig, shards: list[str]) -> list[str]:
    done = {posixpath.basename(u) for u in storage.list_files(cfg.table_uri, ".parquet")}
    return [s for s in shards if f"part-{st.shard_name(s)}.parquet" not in done]


def _first_sample_files(uri: str) -> list[str]:
    import fsspec

    names: list[str] = []
    with fsspec.open(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            stem = posixpath.basename(member.name).split(".", 1)[0]
            if names and stem != names[0].split(".", 1)[0]:
                break
            names.append(posixpath.basename(member.name))
    return names


def check_input(cfg: EmbedConfig, shards: list[str]) -> None:
    """The shards must hold images (and captions when text embeddings are asked for); checks one sample."""
    if not shards:
        raise FileNotFoundError(f"no webdataset shards (*.tar) under {cfg.input!r}; run the download stage first")
    for uri in shards:
        try:
            names = _first_sample_files(uri)
        except tarfile.TarError:
            continue  # a corrupt shard becomes an error row; look at the next one
        if not names:
            continue
        if not any(imaging.is_image_name(n) for n in names):
            raise ValueError(f"input shards have no image column: first sample of {uri} has {names}")
        if cfg.text_embeddings and not any(n.endswith(".txt") for n in names):
            raise ValueError(f"text_embeddings needs captions, but the first sample of {uri} has no .txt: {names}")
        return


def validate(cfg: EmbedConfig) -> list[str]:
    """All job-level checks, before any work; returns the input shard URIs."""
    encoders.validate_config(cfg.encoder)
    schemas.embedding_type(1, cfg.dtype)
    shards = list_shards(cfg.input)
    check_input(cfg, shards)
    storage.check_writable(cfg.table_uri)
    return shards


def remove_stale_temporaries(table_uri: str) -> int:
    """Delete ``_tmp.*`` files a killed run left behind (no other writer may be running on this table)."""
    fs, path = storage.filesystem(table_uri)
    n = 0
    for folder in (path, posixpath.join(path, ERRORS_DIR)):
        if fs.exists(folder):
            for p in fs.ls(folder, detail=False):
                if posixpath.basename(p).startswith("_tmp."):
                    fs.rm(p)
                    n += 1
    return n


# --- output tables ------------------------------------------------------------------------------------

def _download_errors(shard_uri: str) -> list[dict[str, str]]:
    """img2dataset's failed samples of a shard (its sibling .parquet) as errors rows (stage 'download')."""
    meta_uri = shard_uri.removesuffix(".tar") + ".parquet"
    if not storage.exists(meta_uri):
        return []
    t = pq.read_table(meta_uri, columns=["key", "url", "status", "error_message"]).to_pylist()
    return [{"key": r["key"], "source": r["url"], "stage": "download", "error": r["error_message"] or r["status"]}
            for r in t if r["status"] != "success"]


def build_tables(cols: dict[str, np.ndarray], cfg: EmbedConfig, dim: int, meta: dict[str, str]
                 ) -> tuple[pa.Table, list[dict[str, str]]]:
    """Embedding table (sorted by key, first row per key) + decode error rows of one shard's columns."""
    errs = [{"key": k, "source": s, "stage": "decode", "error": e}
            for k, s, e in zip(cols[st.KEY], cols[st.SOURCE], cols[st.ERROR], strict=True) if e]
    ok = np.flatnonzero([not e for e in cols[st.ERROR]])
    keys = np.asarray(cols[st.KEY][ok], dtype=str)
    order = np.argsort(keys, kind="stable")
    uniq, first = np.unique(keys[order], return_index=True)
    for i in sorted(set(range(len(order))) - set(first.tolist())):
        j = ok[order[i]]
        errs.append({"key": str(cols[st.KEY][j]), "source": str(cols[st.SOURCE][j]), "stage": "embed",
                     "error": "duplicate key in shard"})
    rows = ok[order[first]]
    np_dtype = np.float16 if cfg.dtype == "float16" else np.float32
    schema = schemas.with_metadata(schemas.embedding_schema(dim, cfg.dtype, cfg.text_embeddings), meta)
    arrays = [pa.array(uniq.tolist(), pa.string()), pa.array(list(cols[st.CAPTION][rows]), pa.string()),
              pa.array(list(cols[st.URL][rows]), pa.string()),
              _fixed_list(cols["image_embedding"][rows], dim, np_dtype)]
    if cfg.text_embeddings:
        arrays.append(_fixed_list(cols["text_embedding"][rows], dim, np_dtype))
    return pa.Table.from_arrays(arrays, schema=schema), errs


def _fixed_list(values: np.ndarray, dim: int, np_dtype: type) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1, dim), dtype=np_dtype).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)


def commit_shard(cfg: EmbedConfig, shard_uri: str, cols: dict[str, np.ndarray] | None, dim: int) -> tuple[int, int]:
    """Write the errors table (if any), then the part file (the commit marker). Returns (rows, error rows)."""
    shard = st.shard_name(shard_uri)
    meta = schemas.embedding_metadata(
        clip_model=cfg.encoder.model_name, clip_pretrained=cfg.encoder.pretrained, dim=dim, dtype=cfg.dtype,
        preprocess=encoders.preprocess_spec(cfg.encoder).describe(), source_shard=shard_uri)
    if cols is None:  # a shard without samples still gets its (empty) part file, so reruns skip it
        cols = {k: np.array([], dtype=object) for k in (st.KEY, st.CAPTION, st.URL, st.SOURCE, st.ERROR)}
        cols["image_embedding"] = cols["text_embedding"] = np.zeros((0, dim), np.float32)
    table, errs = build_tables(cols, cfg, dim, meta)
    errs = _download_errors(shard_uri) + errs
    if errs:
        storage.atomic_write_table(pa.Table.from_pylist(errs, schema=schemas.ERRORS_SCHEMA),
                                   errors_uri(cfg.table_uri, shard))
    storage.atomic_write_table(table, part_uri(cfg.table_uri, shard))
    return table.num_rows, len(errs)


# --- the Ray pipeline ---------------------------------------------------------------------------------

def _gpus_per_actor(res: EmbedResources) -> float:
    import ray

    if res.gpus_per_actor is not None:
        return res.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_dataset(cfg: EmbedConfig, pending: list[str]) -> Any:
    """The Ray Data pipeline over ``pending`` shard URIs (lazy; iterate it to run)."""
    import ray

    res = cfg.resources
    gpus = _gpus_per_actor(res)
    threads = res.torch_threads or max(1, round(res.cpus_per_actor))
    spec = encoders.preprocess_spec(cfg.encoder)
    ds = ray.data.from_items([{"uri": u} for u in pending], override_num_blocks=len(pending))
    # One block per decoded batch (Ray Data would otherwise pack a whole shard, up to 128 MB of pixels, into
    # one block): the actors start on the first batch, and rows stream back batch by batch, not shard by shard.
    height, width = (spec.size, spec.size) if isinstance(spec.size, int) else spec.size
    ds.context.target_max_block_size = max(1 << 16, int(1.2 * res.batch_size * height * width * 3))
    ds = ds.map_batches(st.decode_shards, batch_size=1, num_cpus=res.decode_cpus,
                        memory=res.decode_memory_mb * 2**20,
                        fn_kwargs={"spec": spec, "batch_rows": res.batch_size})
    return ds.map_batches(
        st.EmbedActor, batch_size=res.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=res.num_actors), num_cpus=res.cpus_per_actor, num_gpus=gpus,
        fn_constructor_kwargs={"encoder": cfg.encoder, "precision": cfg.precision, "torch_threads": threads,
                               "use_gpu": gpus > 0, "text_embeddings": cfg.text_embeddings})


def _drain(cfg: EmbedConfig, ds: Any, pending: list[str], dim: int, t0: float) -> tuple[int, int, list]:
    by_name = {st.shard_name(u): u for u in pending}
    assembler, committed = st.ShardAssembler(), set()
    rows = errors = seen = 0
    timeline: list[tuple[float, int]] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        got = np.asarray(batch["image_embedding"]).shape[-1]
        if got != dim:
            raise ValueError(f"model {cfg.encoder.model_name} gave D={got}, its config says {dim}")
        seen += len(batch[st.KEY])
        timeline.append((time.perf_counter() - t0, seen))
        for shard in assembler.add(batch):
            n, e = commit_shard(cfg, by_name[shard], assembler.pop(shard), dim)
            rows, errors, committed = rows + n, errors + e, committed | {shard}
    if assembler.incomplete():
        raise RuntimeError(f"embedding ended with incomplete shard(s) {assembler.incomplete()}")
    for shard in sorted(set(by_name) - committed):  # shards with no samples at all
        n, e = commit_shard(cfg, by_name[shard], None, dim)
        rows, errors = rows + n, errors + e
    return rows, errors, timeline


def run_embed(cfg: EmbedConfig, ray_address: str | None = None) -> EmbedResult:
    """Validate, then embed every shard without a committed part file; returns counts and timings."""
    t0 = time.perf_counter()
    shards = validate(cfg)
    dim = encoders.embedding_dim(cfg.encoder)
    pending = pending_shards(cfg, shards)
    result = EmbedResult(table_uri=cfg.table_uri, shards=len(shards), skipped=len(shards) - len(pending),
                         written=len(pending), rows=0, errors=0, dim=dim, wall_s=0.0)
    if pending:
        import ray

        if not ray.is_initialized():
            ray.init(address=ray_address, log_to_driver=False)
        remove_stale_temporaries(cfg.table_uri)
        log.info("embedding %d shard(s) of %s with %s -> %s", len(pending), cfg.input, cfg.encoder, cfg.table_uri)
        result.rows, result.errors, result.timeline = _drain(cfg, build_dataset(cfg, pending), pending, dim, t0)
    result.wall_s = time.perf_counter() - t0
    log.info(result.describe())
    return result

"""Bulk captioning: image archives in, caption tables + an errors table out; resumable and idempotent.

    summary = caption_archive(CaptionConfig(input="s3://b/archives", output="s3://b/captions/run1", model="tiny"))

Ray Data pipeline (stages in ``pipelines.caption_stages``): the driver plans the input into parts
(``pipelines.sources``) -> read + safe decode + resize (one task per part) -> CLIP (actor pool; skipped when
the input is only embedding tables) -> mapping network + batched decoding (actor pool) -> rows stream back to
the driver, which commits each part as soon as all its rows have arrived.

Output layout under ``output``:
- ``part-<part id>.parquet``: caption table, ``schemas.CAPTIONS_RANKED_SCHEMA``: key, caption, score (mean
  token log-prob), model (``<uri>@<version>``), created_at, rank (one row per caption, 0 = best; with
  ``num_captions`` = 1 the key alone is unique). Rows sorted by (key, rank).
- ``_errors/part-<part id>.parquet``: errors table (key, source, stage, error), only for parts with errors.
- ``_run.json``: the model, decoding options and input plan digest of the run that owns this output.
- ``_summary.json``: the last run's summary.

Resumability: part ids are derived from the input (``sources.plan_parts``); a part is committed by writing
its errors file, then its caption file, each atomically (``storage.atomic_write_table``), so an interrupted
run leaves no partial file and the caption file's presence means "done". A rerun skips done parts and so
never duplicates rows; a rerun with another model / decoding / input is refused (``overwrite=True`` redoes
everything). Job-level faults (unreadable output, missing input or model, embedding dimension or CLIP model
not matching the model) raise before any work starts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from clipcap_core.configs import to_dict
from clipcap_core.decoding import DecodeConfig
from pipelines import schemas, sources, storage
from pipelines.caption_stages import TIMING_COLUMNS

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ResourceOptions:
    """Batch sizes, actor pools and devices: the one place the pipeline's resources are set."""

    decode_block_rows: int = 64    # rows per block out of the read/decode tasks
    clip_batch_size: int = 64
    caption_batch_size: int = 128
    clip_actors: int = 1
    caption_actors: int = 1
    read_cpus: float = 1.0         # per read/decode task
    read_memory_mb: int = 768      # per read/decode task (a worker with torch imported: ~0.6 GB; >= 1)
    cpus_per_actor: float = 1.0    # Ray CPUs reserved per actor
    torch_threads: int = 0         # torch threads per actor; 0: cpus_per_actor rounded down, at least 1
    gpus_per_actor: float = 0.0    # > 0: actors run on CUDA
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    jpeg_draft: bool = False       # faster JPEG decode via DCT scaling (pixels differ slightly)

    def __post_init__(self) -> None:
        if min(self.decode_block_rows, self.clip_batch_size, self.caption_batch_size, self.clip_actors,
               self.caption_actors, self.read_memory_mb) < 1 or min(self.read_cpus, self.cpus_per_actor) <= 0:
            raise ValueError("batch sizes, actor counts and read_memory_mb must be >= 1, CPUs > 0")


@dataclass(frozen=True, kw_only=True)
class CaptionConfig:
    input: str
    output: str
    model: str = "tiny"            # model artifact URI or preset name
    source: sources.SourceConfig = field(default_factory=sources.SourceConfig)
    decoding: DecodeConfig = field(default_factory=DecodeConfig)
    resources: ResourceOptions = field(default_factory=ResourceOptions)
    overwrite: bool = False
    progress_interval_s: float = 10.0


@dataclass
class CaptionSummary:
    output: str
    model: str
    parts_total: int = 0
    parts_skipped: int = 0       # already done before this run
    parts_done: int = 0          # committed by this run
    images: int = 0              # members processed by this run (captioned + errors)
    captioned: int = 0
    captions: int = 0
    errors: int = 0
    seconds: float = 0.0
    first_output_s: float = 0.0  # start -> first rows back (planning, actor start-up, model loads, 1st batch)
    stage_seconds: dict[str, float] = field(default_factory=dict)      # busy wall seconds per stage
    stage_cpu_seconds: dict[str, float] = field(default_factory=dict)  # process CPU seconds per stage

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["images_per_s"] = round(self.images_per_s, 3)
        return d


# --- job-level validation ----------------------------------------------------------------------------------
@dataclass
class Plan:
    parts: list[sources.Part]
    todo: list[sources.Part]
    model_id: str
    model_info: Any   # caption_stages.ModelInfo
    needs_clip: bool
    digest: str


def part_uri(output: str, part_id: str) -> str:
    return storage.join(output, f"part-{part_id}.parquet")


def errors_uri(output: str, part_id: str) -> str:
    return storage.join(output, "_errors", f"part-{part_id}.parquet")


def _check_embeddings(parts: list[sources.Part], info: Any) -> None:
    for p in parts:
        if p.kind != "embeddings":
            continue
        where = p.files[0].uri
        if p.dim != info.clip_dim:
            raise ValueError(f"dimension mismatch: embedding table {where} has D={p.dim} but model "
                             f"{info.uri!r} expects clip_dim={info.clip_dim} (CLIP {info.encoder.model_name})")
        if p.clip_model and p.clip_model != info.encoder.model_name:
            raise ValueError(f"embedding table {where} was made with CLIP {p.clip_model!r} but model "
                             f"{info.uri!r} was trained on {info.encoder.model_name!r} embeddings")


_SPEED_ONLY = ("batch_size", "use_cache", "static_cache")  # decoding options that do not change captions


def _run_record(cfg: CaptionConfig, model_id: str, digest: str) -> dict[str, Any]:
    decoding = {k: v for k, v in to_dict(cfg.decoding).items() if k not in _SPEED_ONLY}
    return {"model": model_id, "decoding": decoding, "input": cfg.input, "plan_digest": digest}


def prepare(cfg: CaptionConfig) -> Plan:
    """Every job-level check, then the plan; raises before any work starts. Claims the output."""
    from pipelines.caption_stages import inspect_model

    storage.check_writable(cfg.output)
    fs, path = storage.filesystem(cfg.output)
    fs.invalidate_cache(path)  # another process (an earlier, killed run) may have written here
    info = inspect_model(cfg.model)
    parts = sources.plan_parts(cfg.input, cfg.source)
    _check_embeddings(parts, info)
    needs_clip = any(p.kind != "embeddings" for p in parts)
    if needs_clip and info.encoder_dim != info.clip_dim:
        raise ValueError(f"dimension mismatch: CLIP {info.encoder.model_name!r} gives D={info.encoder_dim} "
                         f"but model {info.uri!r} expects clip_dim={info.clip_dim}")
    digest = sources.plan_digest(parts)
    record = storage.redact_json(_run_record(cfg, info.model_id, digest))  # as stored: no signed URLs
    run_uri = storage.join(cfg.output, "_run.json")
    previous = storage.read_json(run_uri)
    if cfg.overwrite:
        _clear_output(cfg.output, previous)
    elif previous is not None and previous != record:
        changed = sorted(k for k in record if previous.get(k) != record[k])
        raise ValueError(f"output {cfg.output!r} holds a run with different {', '.join(changed)}; use a new "
                         "output or overwrite=True (--overwrite) to redo it")
    storage.write_json(record, run_uri)
    _remove_stale_temporaries(cfg.output)
    done = set(storage.list_files(cfg.output, ".parquet"))
    todo = [p for p in parts if part_uri(cfg.output, p.part_id) not in done]
    return Plan(parts, todo, info.model_id, info, needs_clip, digest)


def _remove_stale_temporaries(output: str) -> None:
    """Drop ``_tmp.*`` files a killed run left behind (never visible as parts; one run per output)."""
    fs, path = storage.filesystem(output)
    for sub in (path, f"{path.rstrip('/')}/_errors"):
        if fs.exists(sub):
            for name in fs.ls(sub, detail=False):
                if name.rsplit("/", 1)[-1].startswith("_tmp."):
                    fs.rm(name)


def _is_our_part(fs: Any, path: str) -> bool:
    """A part / error file this stage wrote: named ``part-<id>.parquet`` with ``clipcap.part = <id>`` in its
    footer (what every commit writes); anything else in the folder is someone else's."""
    name = path.rsplit("/", 1)[-1]
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return False
    try:
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
    except Exception:  # noqa: BLE001 - unreadable: not provably ours, keep it
        return False
    return meta.get(schemas.META_PART.encode()) == name[len("part-"):-len(".parquet")].encode()


def _clear_output(output: str, previous: dict | None) -> None:
    """``--overwrite``: remove the part / error files our runs wrote, nothing else (an output folder without
    our ``_run.json`` is not ours to clear; other Parquet files there are kept)."""
    if previous is None:
        return
    fs, _ = storage.filesystem(output)
    for uri in storage.list_files(output, ".parquet") + storage.list_files(storage.join(output, "_errors"),
                                                                           ".parquet"):
        path = storage.filesystem(uri)[1]
        if _is_our_part(fs, path):
            fs.rm(path)


# --- committing parts -------------------------------------------------------------------------------------------
class PartCommitter:
    """Collects stage rows per part (dedup by member index) and commits a part once all its rows arrived."""

    def __init__(self, output: str, model_id: str, decoding: DecodeConfig):
        self.output, self.model_id = output, model_id
        self.meta = {schemas.META_MODEL: model_id, schemas.META_DECODING: json.dumps(to_dict(decoding)),
                     schemas.META_SCHEMA_VERSION: schemas.SCHEMA_VERSION}
        self.rows: dict[str, dict[int, dict[str, Any]]] = {}
        self.totals: dict[str, int] = {}
        self.committed: list[str] = []
        self.stage_seconds: dict[str, float] = {}
        self.stage_cpu_seconds: dict[str, float] = {}

    def add(self, table: pa.Table) -> list[tuple[str, int, int, int]]:
        """Take a block of final-stage rows; return (part id, images, captions, errors) of parts committed."""
        done = []
        touched = set()
        for name in TIMING_COLUMNS:
            if name in table.column_names:
                kind, stage = name.split("_", 1)
                bucket = self.stage_seconds if kind == "t" else self.stage_cpu_seconds
                bucket[stage] = bucket.get(stage, 0.0) + float(pa.compute.sum(table.column(name)).as_py() or 0.0)
        for row in table.to_pylist():
            pid = row["part_id"]
            touched.add(pid)
            if row["index"] < 0:
                self.totals[pid] = row["total"]
            else:
                self.rows.setdefault(pid, {})[row["index"]] = row
        for pid in sorted(touched):
            if pid in self.totals and len(self.rows.get(pid, {})) >= self.totals[pid]:
                done.append(self.commit(pid, list(self.rows.pop(pid, {}).values())))
                del self.totals[pid]
        return done

    def pending(self) -> list[str]:
        return sorted(set(self.rows) | set(self.totals))

    def commit(self, part_id: str, rows: list[dict[str, Any]]) -> tuple[str, int, int, int]:
        now = datetime.now(timezone.utc)
        caps: dict[str, list[Any]] = {n: [] for n in schemas.CAPTIONS_RANKED_SCHEMA.names}
        errs: dict[str, list[Any]] = {n: [] for n in schemas.ERRORS_SCHEMA.names}
        for row in sorted(rows, key=lambda r: (r["key"], r["index"])):
            if row["error"] is None and row.get("captions"):
                for rank, (text, score) in enumerate(zip(row["captions"], row["scores"], strict=True)):
                    for name, v in ((schemas.KEY, row["key"]), (schemas.CAPTION, text), (schemas.SCORE, score),
                                    (schemas.MODEL, self.model_id), (schemas.CREATED_AT, now),
                                    (schemas.RANK, rank)):
                        caps[name].append(v)
            else:
                error = row["error"] or "no caption produced"
                for name, v in ((schemas.KEY, row["key"]), (schemas.SOURCE, row["source"]),
                                (schemas.STAGE, row["stage"] or "caption"), (schemas.ERROR, error)):
                    errs[name].append(v)
        meta = dict(self.meta, **{schemas.META_PART: part_id})
        errors = pa.table(errs, schema=schemas.with_metadata(schemas.ERRORS_SCHEMA, meta))
        captions = pa.table(caps, schema=schemas.with_metadata(schemas.CAPTIONS_RANKED_SCHEMA, meta))
        err_uri = errors_uri(self.output, part_id)
        if errors.num_rows:
            storage.atomic_write_table(errors, err_uri)
        elif storage.exists(err_uri):  # stale, from a run this one overwrites
            fs, path = storage.filesystem(err_uri)
            fs.rm(path)
        storage.atomic_write_table(captions, part_uri(self.output, part_id))  # last: "this part is done"
        self.committed.append(part_id)
        images = len(rows)
        return part_id, images, images - errors.num_rows, captions.num_rows


# --- the job ----------------------------------------------------------------------------------------------------
def caption_archive(cfg: CaptionConfig) -> CaptionSummary:
    """Caption every image of ``cfg.input`` into caption tables under ``cfg.output`` (see module docstring)."""
    start = time.monotonic()
    plan = prepare(cfg)
    summary = CaptionSummary(output=cfg.output, model=plan.model_id, parts_total=len(plan.parts),
                             parts_skipped=len(plan.parts) - len(plan.todo))
    log.info("captioning %s -> %s with %s: %d parts (%d already done)", cfg.input, cfg.output, plan.model_id,
             len(plan.parts), summary.parts_skipped)
    if plan.todo:
        committer = PartCommitter(cfg.output, plan.model_id, cfg.decoding)
        last = time.monotonic()
        for block in build_dataset(cfg, plan).iter_batches(batch_size=None, batch_format="pyarrow"):
            summary.first_output_s = summary.first_output_s or round(time.monotonic() - start, 3)
            for _pid, images, captioned, n_caps in committer.add(block):
                summary.parts_done += 1
                summary.images += images
                summary.captioned += captioned
                summary.errors += images - captioned
                summary.captions += n_caps
            if time.monotonic() - last >= cfg.progress_interval_s:
                last = time.monotonic()
                _log_progress(summary, start)
        summary.stage_seconds = {k: round(v, 3) for k, v in committer.stage_seconds.items()}
        summary.stage_cpu_seconds = {k: round(v, 3) for k, v in committer.stage_cpu_seconds.items()}
        if committer.pending():
            raise RuntimeError(f"pipeline ended with incomplete parts {committer.pending()[:5]} (rows lost?)")
    summary.seconds = time.monotonic() - start
    storage.write_json(summary.as_dict(), storage.join(cfg.output, "_summary.json"))
    log.info("done: %s", json.dumps(summary.as_dict()))
    return summary


def fit_resources(res: ResourceOptions, needs_clip: bool, cluster: dict[str, float]) -> ResourceOptions:
    """Check the request against the cluster (``ray.cluster_resources()``): GPUs asked for but absent is a
    job-level error; more CPUs reserved than the cluster has would starve the read tasks behind the actor
    pools, so the CPU reservations (not the torch threads) are scaled down to fit, with a warning."""
    from clipcap_core.configs import replace

    actors = res.caption_actors + (res.clip_actors if needs_clip else 0)
    if res.gpus_per_actor > 0 and cluster.get("GPU", 0.0) < res.gpus_per_actor * actors:
        raise ValueError(f"{actors} actors x {res.gpus_per_actor} GPUs requested but the Ray cluster has "
                         f"{cluster.get('GPU', 0.0):g} GPUs")
    cpus = float(cluster.get("CPU", 0.0))
    wanted = actors * res.cpus_per_actor + res.read_cpus
    if cpus <= 0 or wanted <= cpus:
        return res
    scale = cpus / wanted
    threads = res.torch_threads or max(1, int(res.cpus_per_actor))
    log.warning("actors + read tasks reserve %.2f CPUs but the cluster has %g: scaling the reservations by %.2f "
                "(torch threads per actor stay %d)", wanted, cpus, scale, threads)
    return replace(res, cpus_per_actor=res.cpus_per_actor * scale, read_cpus=res.read_cpus * scale,
                   torch_threads=threads)


def build_dataset(cfg: CaptionConfig, plan: Plan) -> ray.data.Dataset:
    """The Ray Data pipeline over the parts still to do (resources all set here)."""
    import ray
    import ray.data

    from clipcap_core.encoders import preprocess_spec
    from pipelines.caption_stages import CaptionStage, ClipStage, read_decode_batch

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS if set, else a local instance (as Ray Data would do)
    res = fit_resources(cfg.resources, plan.needs_clip, ray.cluster_resources())
    gpu = {"num_gpus": res.gpus_per_actor} if res.gpus_per_actor > 0 else {}
    actor = dict(num_cpus=res.cpus_per_actor, batch_format="pyarrow", **gpu)
    threads = res.torch_threads or max(1, int(res.cpus_per_actor))
    spec = preprocess_spec(plan.model_info.encoder) if plan.needs_clip else None
    items = [{"part": p.to_json()} for p in plan.todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # The memory request also keeps these tasks a stage of their own: Ray Data fuses a task map into the next
    # actor map when their remote args are equal, which would decode inside the CLIP actors, one part at a time.
    ds = ds.map_batches(read_decode_batch, batch_size=1, batch_format="pyarrow", num_cpus=res.read_cpus,
                        memory=res.read_memory_mb * 2**20,
                        fn_kwargs=dict(cfg_json=json.dumps(to_dict(cfg.source)), spec=spec,
                                       block_rows=res.decode_block_rows, jpeg_draft=res.jpeg_draft))
    if plan.needs_clip:
        ds = ds.map_batches(ClipStage, batch_size=res.clip_batch_size,
                            compute=ray.data.ActorPoolStrategy(size=res.clip_actors),
                            fn_constructor_kwargs=dict(encoder_cfg=plan.model_info.encoder, precision=res.precision,
                                                       use_gpu=bool(gpu), threads=threads), **actor)
    return ds.map_batches(CaptionStage, batch_size=res.caption_batch_size,
                          compute=ray.data.ActorPoolStrategy(size=res.caption_actors),
                          fn_constructor_kwargs=dict(model_uri=cfg.model, decoding=cfg.decoding,
                                                     precision=res.precision, use_gpu=bool(gpu), threads=threads),
                          **actor)


def _log_progress(s: CaptionSummary, start: float) -> None:
    elapsed = time.monotonic() - start
    log.info("progress: parts %d/%d (+%d skipped), images %d, captions %d, errors %d, %.1f images/s",
             s.parts_done, s.parts_total - s.parts_skipped, s.parts_skipped, s.images, s.captions, s.errors,
             s.images / elapsed if elapsed > 0 else 0.0)

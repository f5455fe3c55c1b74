"""Bulk captioning: image archives in, caption tables + an errors table out; resumable and idempotent."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from clipcap_core import uris
from clipcap_core.configs import to_dict
from clipcap_core.decap import ProjectionConfig, check_projection
from clipcap_core.decoding import DecodeConfig
from clipcap_core.encoders import preprocess_spec
from pipelines import console, exitcodes, runtime, stopping
from pipelines.caption.output import PartCommitter, _clear_output, layout, meta_uri
from pipelines.caption.stages import CaptionStage, ClipCaptionStage, inspect_model, read_decode_batch
from pipelines.clip_actor import ClipActor
from pipelines.io import sources, storage
from pipelines.lease import LEASE_FILE, Lease

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

@dataclass(frozen=True, kw_only=True)
class ResourceOptions:
    """Batch sizes, actor pools and devices: set in this one place (0 / None: sized from the cluster)."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"read_memory_mb": None}
    decode_block_rows: int = 64  # rows per block out of the read/decode tasks
    clip_batch_size: int = 64  # images per CLIP forward
    caption_batch_size: int = 128  # embeddings per decoding batch
    # fused: one set of threads over the node's cores, one CLIP for the image and the CLIPScore text tower, no
    # embedding hop between processes; split: each pool scaled on its own (clip_actors / caption_actors)
    stages: Literal["auto", "fused", "split"] = "auto"
    """fused (auto): CLIP + captioner in one actor; split: a CLIP pool feeding a captioning pool"""
    caption_actors: int = 0  # captioning (or fused) actors, one model each (0: one per GPU or per CPU node)
    clip_actors: int = 0  # split stages: CLIP actors (0: sized from the cluster)
    read_cpus: float = 0.0  # CPUs per read/decode task (0: 1)
    read_memory_mb: int = 768      # per read/decode task (a worker with torch imported: ~0.6 GB; >= 1)
    cpus_per_actor: float = 0.0  # Ray CPUs reserved per actor (0: 1; scheduling, not a thread cap)
    torch_threads: int = 0  # torch threads per actor (0: the node's cores shared by its actors)
    gpus_per_actor: float | None = None  # GPUs per actor (default: 1 when the cluster has GPUs, else 0)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    jpeg_draft: bool = False  # faster JPEG decoding by DCT scaling (pixels differ slightly)

    def __post_init__(self) -> None:
        if min(self.decode_block_rows, self.clip_batch_size, self.caption_batch_size, self.read_memory_mb) < 1:
            raise ValueError("batch sizes and read_memory_mb must be >= 1")
        if min(self.clip_actors, self.caption_actors, self.read_cpus, self.cpus_per_actor, self.torch_threads) < 0:
            raise ValueError("actor counts, CPUs and threads must be >= 0 (0 = size from the cluster)")
        if self.stages not in ("auto", "fused", "split"):
            raise ValueError(f"stages must be auto, fused or split, got {self.stages!r}")

    def pools(self, needs_clip: bool, cluster: runtime.ClusterShape) -> tuple[runtime.ActorPlan | None,
                                                                              runtime.ActorPlan]:
        """(CLIP pool or None when fused / not needed, captioning pool); split pools share the cores."""
        kw = dict(cpus_per_actor=self.cpus_per_actor, gpus_per_actor=self.gpus_per_actor, read_cpus=self.read_cpus)
        if not needs_clip or self.stages != "split":
            plan = runtime.plan_actors(cluster, actors=self.caption_actors, torch_threads=self.torch_threads, **kw)
            # one node, CPU, no actor count given: the single-thread actors as concurrent batches of one actor
            # (CLIP and the LM loaded and held once, not once per core)
            return None, plan if self.caption_actors else runtime.share_process(plan, cluster)
        caption = runtime.plan_actors(cluster, actors=self.caption_actors, fit_cluster=False, **kw)
        threads = self.torch_threads or max(1, caption.torch_threads // 2)
        clip = runtime.plan_actors(cluster, actors=self.clip_actors, torch_threads=threads, fit_cluster=False, **kw)
        clip, caption = runtime.fit(cluster, [clip, replace(caption, torch_threads=threads)])
        return clip, caption


@dataclass(frozen=True, kw_only=True)
class CaptionConfig:
    # each field is a `clipcap caption` flag (pipelines.commands.flags); CLI_FLAGS: named otherwise / None: no flag
    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"decoding.n": "--num-captions", "progress_interval_s": None}
    input: str  # directory, archive or Parquet file URI (local, s3://, ...)
    output: str  # caption table directory URI
    model: str  # trained model artifact URI (`clipcap train` or `clipcap import-reference` makes one)
    allow_untrained: bool = False  # accept an untrained preset (random captions: wiring tests, benchmarks)
    source: sources.SourceConfig = field(default_factory=sources.SourceConfig)
    decoding: DecodeConfig = field(default_factory=DecodeConfig)
    resources: ResourceOptions = field(default_factory=ResourceOptions)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)  # DeCap memory projection
    overwrite: bool = False  # redo every part of the output
    force_unlock: bool = False  # take the output's lease (_meta/lease.json) even from a run that looks alive
    progress_interval_s: float = 10.0
    rerank: Literal["none", "clip"] = "none"  # clip: rank each image's captions by CLIP similarity
    # ViT-B-32: a text forward costs ~2/3 of an image forward; the column is null without it
    clip_score: bool = True
    """the clip_score column: CLIPScore per caption with the model's CLIP text tower (off: no text forward)"""

    def __post_init__(self) -> None:
        if self.rerank not in ("none", "clip"):
            raise ValueError(f"rerank must be 'none' or 'clip', got {self.rerank!r}")
        if self.rerank == "clip" and not self.clip_score:
            raise ValueError("rerank 'clip' needs clip_score=True (it ranks by the CLIP similarity)")

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
    empty_captions: int = 0      # captioned images whose first caption is empty
    untrained: bool = False      # an untrained preset was asked for (allow_untrained): empty captions expected
    parts_failed: dict[str, str] = field(default_factory=dict)  # input not readable: not committed, retried
    files_skipped: int = 0       # hidden / bookkeeping files of the input (``sources.scan_input``), not read
    files_skipped_first: list[str] = field(default_factory=list)  # the first of them, by path
    seconds: float = 0.0
    first_output_s: float = 0.0  # start -> first rows back (planning, actor start-up, model loads, 1st batch)
    stage_seconds: dict[str, float] = field(default_factory=dict)      # busy wall seconds per stage
    stage_cpu_seconds: dict[str, float] = field(default_factory=dict)  # process CPU seconds per stage

    @property
    def mostly_empty(self) -> bool:
        """Most captions empty: a model that decodes nothing (NaN-trained, wrong tokenizer)."""
        return self.captioned > 0 and 2 * self.empty_captions > self.captioned

    @property
    def exit_code(self) -> int:
        code = exitcodes.outcome(self.parts_total - len(self.parts_failed), len(self.parts_failed))
        unhealthy = code == exitcodes.OK and self.mostly_empty and not self.untrained
        return exitcodes.UNHEALTHY if unhealthy else code

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "images_per_s": round(self.images_per_s, 3)}

# --- job-level validation ----------------------------------------------------------------------------------
@dataclass
class Plan:
    parts: list[sources.Part]
    todo: list[sources.Part]
    model_id: str
    model_info: Any   # pipelines.caption.stages.ModelInfo
    needs_clip: bool
    skipped: list[str] = field(default_factory=list)  # hidden / bookkeeping input paths, not read

def check_output_outside_input(cfg: CaptionConfig) -> None:
    """An output inside the input would be read back as input by the next run."""
    try:
        fs_in, p_in = uris.filesystem(cfg.input)
        fs_out, p_out = uris.filesystem(cfg.output)
    except Exception:  # noqa: BLE001 - a bad URI is reported by the input / output checks that follow
        return
    if storage.protocol_prefix(fs_in) != storage.protocol_prefix(fs_out):
        return
    norm_in, norm_out = p_in.rstrip("/"), p_out.rstrip("/")
    if fs_in.protocol[0] in ("file", "local"):
        norm_in, norm_out = os.path.realpath(norm_in), os.path.realpath(norm_out)
    if norm_out == norm_in or norm_out.startswith(norm_in + "/"):
        raise ValueError(f"output {cfg.output!r} is inside input {cfg.input!r}: its files would be read back as "
                         "input by the next run; choose an output outside the input")

def _check_embeddings(parts: list[sources.Part], info: Any) -> None:
    for p in [p for p in parts if p.kind == "embeddings"]:
        where = p.files[0].uri
        if p.dim != info.clip_dim:
            raise ValueError(f"dimension mismatch: embedding table {where} has D={p.dim} but model "
                             f"{info.uri!r} expects clip_dim={info.clip_dim} (CLIP {info.encoder.model_name})")
        if p.clip_model and p.clip_model != info.encoder.model_name:
            raise ValueError(f"embedding table {where} was made with CLIP {p.clip_model!r} but model "
                             f"{info.uri!r} was trained on {info.encoder.model_name!r} embeddings")


def _check_projection(cfg: CaptionConfig, info: Any) -> None:
    # lazy: safetensors.torch + torch ~6.7 s to import (python -X importtime)
    from clipcap_core import artifacts

    try:
        has_memory = bool(artifacts.read_metadata(cfg.model)["weights"].get("decap"))
    except FileNotFoundError:  # a preset
        has_memory = False
    check_projection(cfg.projection, info.clip_dim, has_memory)


_SPEED_ONLY = ("batch_size", "use_cache", "static_cache")  # decoding options that do not change captions

def _run_record(cfg: CaptionConfig, model_id: str, digest: str) -> dict[str, Any]:
    decoding = {k: v for k, v in to_dict(cfg.decoding).items() if k not in _SPEED_ONLY}
    record = {"model": model_id, "decoding": decoding, "input": cfg.input, "plan_digest": digest}
    if cfg.rerank != "none":  # only when set, so outputs of runs from before the option stay resumable
        record["rerank"] = cfg.rerank
    if not cfg.clip_score:
        record["clip_score"] = False
    if cfg.projection != ProjectionConfig():  # only when set: records of default runs stay as they were
        record["projection"] = to_dict(cfg.projection)
    return record

def prepare(cfg: CaptionConfig) -> Plan:
    """Every job-level check (raising before any work), then the plan; call it holding the output's lease."""
    check_output_outside_input(cfg)
    storage.check_writable(cfg.output)
    fs, path = uris.filesystem(cfg.output)
    fs.invalidate_cache(path)  # another process (an earlier, killed run) may have written here
    info = inspect_model(cfg.model, allow_untrained=cfg.allow_untrained)
    _check_projection(cfg, info)
    parts, skipped = sources.plan_input(cfg.input, cfg.source)
    _check_embeddings(parts, info)
    needs_clip = any(p.kind != "embeddings" for p in parts)
    if needs_clip and info.encoder_dim != info.clip_dim:
        raise ValueError(f"dimension mismatch: CLIP {info.encoder.model_name!r} gives D={info.encoder_dim} "
                         f"but model {info.uri!r} expects clip_dim={info.clip_dim}")
    record = storage.redact_json(_run_record(cfg, info.model_id, sources.plan_digest(parts)))  # as stored
    run_uri = meta_uri(cfg.output, "run.json")
    previous = storage.read_json(run_uri)
    if cfg.overwrite:
        _clear_output(cfg.output, previous)
    elif previous is not None and previous != record:
        changed = sorted(k for k in record if previous.get(k) != record[k])
        raise ValueError(f"output {cfg.output!r} holds a run with different {', '.join(changed)}; use a new "
                         "output or overwrite=True (--overwrite) to redo it")
    storage.write_json(record, run_uri)
    layout(cfg.output).remove_temporaries()
    todo = [p for p in parts if p.part_id not in layout(cfg.output).done()]
    return Plan(parts, todo, info.model_id, info, needs_clip, skipped)

# --- the job ----------------------------------------------------------------------------------------------------
def caption_archive(cfg: CaptionConfig) -> CaptionSummary:
    """Caption every image of ``cfg.input`` into caption tables under ``cfg.output``."""
    start = time.monotonic()
    check_output_outside_input(cfg)
    storage.check_writable(cfg.output)
    with Lease(meta_uri(cfg.output, LEASE_FILE), force=cfg.force_unlock) as lease:  # one run per output
        plan = prepare(cfg)
        summary = CaptionSummary(output=cfg.output, model=plan.model_id, parts_total=len(plan.parts),
                                 parts_skipped=len(plan.parts) - len(plan.todo),
                                 files_skipped=len(plan.skipped),
                                 files_skipped_first=plan.skipped[:sources.SHOW_SKIPPED])
        log.info("captioning %s -> %s with %s: %d parts (%d already done)", cfg.input, cfg.output,
                 plan.model_id, len(plan.parts), summary.parts_skipped)
        if plan.todo:
            committer = PartCommitter(cfg.output, plan.model_id, cfg.decoding, cfg.rerank)
            committer.guard = lease.check
            # a stop or a failed commit names the parts committed so far (earlier runs' included)
            with stopping.counting(lambda: (summary.parts_skipped + len(committer.committed),
                                            summary.parts_total), "part"):
                _drain(cfg, plan, committer, summary, start)
        summary.seconds = time.monotonic() - start
        storage.write_json(summary.as_dict(), meta_uri(cfg.output, "summary.json"))
        return summary


def _drain(cfg: CaptionConfig, plan: Plan, committer: PartCommitter, summary: CaptionSummary,
           start: float) -> None:
    """Run the pipeline, committing each part as its rows complete; counts into ``summary``."""
    ds = build_dataset(cfg, plan)  # starts Ray (its log path printed) before the progress line is drawn
    with console.Progress("caption", len(plan.todo), unit="parts", rows="images",
                          interval_s=cfg.progress_interval_s) as progress:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):  # see embed
            summary.first_output_s = summary.first_output_s or round(time.monotonic() - start, 3)
            for _pid, images, captioned, n_caps in committer.add(block):
                summary.parts_done += 1
                summary.images += images
                summary.captioned += captioned
                summary.errors += images - captioned
                summary.captions += n_caps
                progress.update(1, images, images - captioned)
    summary.empty_captions = committer.empty_captions
    summary.untrained = cfg.allow_untrained
    if summary.mostly_empty and not summary.untrained:
        log.error("%d of %d captions are empty: the model decodes nothing useful (exit %d)",
                  summary.empty_captions, summary.captioned, exitcodes.UNHEALTHY)
    summary.stage_seconds = {k: round(v, 3) for k, v in committer.stage_seconds.items()}
    summary.stage_cpu_seconds = {k: round(v, 3) for k, v in committer.stage_cpu_seconds.items()}
    summary.parts_failed = dict(committer.failed)
    committer.finish("caption")  # every part has a marker row: none can be left without rows

def build_dataset(cfg: CaptionConfig, plan: Plan) -> ray.data.Dataset:
    """The Ray Data pipeline over the parts still to do (resources all set here)."""
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray.data

    runtime.ensure_ray()  # RAY_ADDRESS if set, else a local instance (as Ray Data would do)
    res = cfg.resources
    cluster = runtime.ClusterShape.from_ray()
    clip_pool, pool = res.pools(plan.needs_clip, cluster)
    if clip_pool is not None:
        log.info(clip_pool.describe("caption: CLIP pool", cluster))
    fused = plan.needs_clip and clip_pool is None
    log.info(pool.describe("caption: CLIP + captioner pool" if fused else "caption: captioner pool", cluster))
    spec = preprocess_spec(plan.model_info.encoder) if plan.needs_clip else None
    items = [{"part": p.to_json()} for p in plan.todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if spec is not None:  # one block per decoded batch, so every actor of the pool gets work
        ds.context.target_max_block_size = runtime.pixel_block_bytes(res.decode_block_rows, spec.size)
    # The memory request also keeps these tasks a stage of their own: Ray Data fuses a task map into the next
    # actor map when their remote args are equal, which would decode inside the CLIP actors, one part at a time.
    ds = ds.map_batches(read_decode_batch, batch_size=1, batch_format="pyarrow", num_cpus=pool.read_cpus,
                        memory=res.read_memory_mb * 2**20,
                        fn_kwargs=dict(cfg_json=json.dumps(to_dict(cfg.source)), spec=spec,
                                       block_rows=res.decode_block_rows, jpeg_draft=res.jpeg_draft))
    caption_kw = dict(model_uri=plan.model_info.uri, decoding=cfg.decoding, precision=res.precision,
                      use_gpu=pool.use_gpu, threads=pool.torch_threads, rerank=cfg.rerank,
                      projection=cfg.projection)
    score_cfg = plan.model_info.encoder if cfg.clip_score else None
    if fused:
        return ds.map_batches(ClipCaptionStage, batch_size=res.caption_batch_size, **pool.pool_args(),
                              fn_constructor_kwargs=dict(caption_kw, encoder_cfg=plan.model_info.encoder,
                                                         clip_batch_size=res.clip_batch_size,
                                                         clip_score=cfg.clip_score))
    if clip_pool is not None:
        ds = ds.map_batches(ClipActor, batch_size=res.clip_batch_size, **clip_pool.pool_args(),
                            fn_constructor_kwargs=dict(encoder=plan.model_info.encoder, precision=res.precision,
                                                       use_gpu=clip_pool.use_gpu, threads=clip_pool.torch_threads))
    return ds.map_batches(CaptionStage, batch_size=res.caption_batch_size, **pool.pool_args(),
                          fn_constructor_kwargs=dict(caption_kw, encoder_cfg=score_cfg))

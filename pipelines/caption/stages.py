"""The stages of bulk captioning: pure cores plus the callables Ray Data runs (no Ray import here)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipcap_core.configs import from_dict
from clipcap_core.encoders import resolve_precision
from clipcap_core.imaging import ImageDecodeError, ImageResizer, decode_image
from clipcap_core.metrics import ClipScorer, W
from clipcap_core.metrics import rerank as clip_order
from pipelines import rows, runtime
from pipelines.clip_actor import ClipActor
from pipelines.io import sources

STAGE_SCHEMA = pa.schema([
    ("part_id", pa.string()), ("index", pa.int32()), ("key", pa.string()), ("source", pa.string()),
    ("pixels", pa.binary()), ("embedding", pa.binary()), ("error", pa.string()), ("stage", pa.string()),
    ("total", pa.int32()), ("t_read", pa.float64()), ("cpu_read", pa.float64()),
])
TIMING_COLUMNS = ("t_read", "cpu_read", "t_clip", "cpu_clip", "t_caption", "cpu_caption")  # pipelines.rows.Clock


def _stage_table(buf: list[dict[str, Any]], lap: tuple[float, float]) -> pa.Table:
    """One block of stage rows, the read time shared out per row."""
    n = len(buf)
    return pa.Table.from_pylist([{"pixels": b"", "embedding": b"", "total": -1, **r, "t_read": lap[0] / n,
                                  "cpu_read": lap[1] / n} for r in buf], schema=STAGE_SCHEMA)


def _decode_record(rec: sources.Record, resizer: Any, cfg: sources.SourceConfig,
                   draft: tuple[int, int] | None) -> dict[str, Any]:
    if rec.error is not None:
        return {"error": rec.error, "stage": rec.stage}
    if rec.embedding is not None:
        return {"embedding": np.asarray(rec.embedding, dtype=np.float32).tobytes()}
    try:
        image = decode_image(rec.data or b"", max_pixels=cfg.max_pixels, draft_size=draft)
    except ImageDecodeError as exc:
        return {"error": str(exc), "stage": "decode"}
    try:
        return {"pixels": np.ascontiguousarray(resizer(image), dtype=np.uint8).tobytes()}
    except Exception as exc:  # noqa: BLE001 - an image that decodes but cannot be resized is still a row
        return {"error": f"preprocess failed: {type(exc).__name__}: {exc}", "stage": "preprocess"}


def read_decode_part(part: sources.Part, cfg: sources.SourceConfig, resizer: Any, block_rows: int,
                     draft: tuple[int, int] | None = None) -> Iterator[pa.Table]:
    """Records of ``part`` as stage rows in blocks of ``block_rows``, then the part's marker row."""
    buf: list[dict[str, Any]] = []
    n, clock = 0, rows.Clock()
    for rec in sources.read_part(part, cfg):
        buf.append(dict(part_id=part.part_id, index=n, key=rec.key, source=rec.source,
                        **_decode_record(rec, resizer, cfg, draft)))
        n += 1
        if len(buf) >= block_rows:
            yield _stage_table(buf, clock.lap())
            buf = []
            clock.lap()  # the time spent downstream while suspended is not ours
    buf.append(dict(part_id=part.part_id, index=-1, key="", source="", total=n))
    yield _stage_table(buf, clock.lap())


def read_decode_batch(batch: pa.Table, *, cfg_json: str, spec: Any, block_rows: int,
                      jpeg_draft: bool = False) -> Iterator[pa.Table]:
    """Ray Data task function over batches of ``{"part": [Part json]}``; yields several blocks per part."""
    cfg = from_dict(sources.SourceConfig, json.loads(cfg_json))
    resizer = ImageResizer(spec) if spec is not None else None
    draft = None
    if jpeg_draft and spec is not None:
        size = spec.size if isinstance(spec.size, tuple) else (spec.size, spec.size)
        draft = (int(size[0]), int(size[1]))
    for text in batch.column("part").to_pylist():
        yield from read_decode_part(sources.Part.from_json(text), cfg, resizer, block_rows, draft)


class CaptionStage:
    """Actor: CLIP embeddings -> n captions, scores and CLIPScores per image (``rerank="clip"``: by CLIP)."""

    def __init__(self, model_uri: str, decoding: Any, precision: str = "fp32", use_gpu: bool = False,
                 threads: int = 0, encoder_cfg: Any = None, rerank: str = "none", projection: Any = None):
        self.decoder = Decoder(model_uri, decoding, device=runtime.actor_device(use_gpu, threads),
                               precision=precision, projection=projection)
        self.call_threads = runtime.CallThreads(threads)
        self.scorer = None if encoder_cfg is None else ClipScorer(
            ClipActor(encoder_cfg, precision=precision, use_gpu=use_gpu, threads=threads).encoder)
        self.rerank = rerank

    def __call__(self, table: pa.Table) -> pa.Table:
        self.call_threads()  # each of a shared actor's call threads runs the plan's torch threads
        clock = rows.Clock()
        idx, blobs = rows.binary_rows(table.column("embedding"))
        n = len(table)
        captions: list[list[str] | None] = [None] * n
        scores: list[list[float] | None] = [None] * n
        clip: list[list[float] | None] = [None] * n
        if len(idx):
            emb = np.stack([np.frombuffer(b, dtype=np.float32) for b in blobs])  # (B, D)
            texts, vals = self.decoder(emb)
            if self.scorer is not None:
                texts, vals, sims = score_and_rank(emb, texts, vals, self.scorer, self.rerank == "clip")
            for j, i in enumerate(idx):
                captions[i], scores[i] = texts[j], vals[j]
                clip[i] = sims[j] if self.scorer is not None else None
        table = table.drop_columns(["embedding"])
        table = table.append_column("captions", pa.array(captions, type=pa.list_(pa.string())))
        table = table.append_column("scores", pa.array(scores, type=pa.list_(pa.float32())))
        table = table.append_column("clip_scores", pa.array(clip, type=pa.list_(pa.float32())))
        return rows.with_time(table, "caption", clock.lap())


class ClipCaptionStage:
    """Actor (the default): CLIP and the captioner in one process, one set of torch threads over the node's
    cores; the embeddings never leave it and the CLIPScore text tower is the same CLIP."""

    def __init__(self, encoder_cfg: Any, model_uri: str, decoding: Any, precision: str = "fp32",
                 use_gpu: bool = False, threads: int = 0, rerank: str = "none", projection: Any = None,
                 clip_batch_size: int = 64, clip_score: bool = True):
        self.clip = ClipActor(encoder_cfg, precision=precision, use_gpu=use_gpu, threads=threads)
        self.caption = CaptionStage(model_uri, decoding, precision, use_gpu, threads, encoder_cfg=None,
                                    rerank=rerank, projection=projection)
        if clip_score:
            self.caption.scorer = ClipScorer(self.clip.encoder)
        self.clip_batch = clip_batch_size

    def __call__(self, table: pa.Table) -> pa.Table:
        # per-row CLIP times of the slices stay per row; the captioner then sees the whole batch at once
        starts = range(0, max(len(table), 1), self.clip_batch)
        return self.caption(pa.concat_tables([self.clip(table.slice(s, self.clip_batch)) for s in starts]))


def score_and_rank(image_emb: np.ndarray, texts: list[list[str]], scores: list[list[float]], scorer: Any,
                   rerank: bool) -> tuple[list[list[str]], list[list[float]], list[list[float]]]:
    """CLIPScore of each image's n captions; ``rerank``: captions and scores ordered by CLIP similarity."""
    n = len(texts[0]) if texts else 0
    flat = [t for group in texts for t in group]
    order, cos = clip_order(image_emb, scorer.embed_texts(flat), n)  # (B, n) each
    if not rerank:
        order = np.tile(np.arange(n), (len(texts), 1))
    clip = W * np.clip(cos, 0.0, None)
    return ([[g[k] for k in o] for g, o in zip(texts, order, strict=True)],
            [[v[k] for k in o] for v, o in zip(scores, order, strict=True)],
            [[float(c[k]) for k in o] for c, o in zip(clip, order, strict=True)])


# --- the model, seen from the pipeline ------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    uri: str
    model_id: str      # "<uri>@<version>", written into every caption row
    clip_dim: int      # D the mapping network consumes
    encoder: Any       # EncoderConfig of the CLIP that made the training embeddings
    encoder_dim: int   # D that CLIP produces


UNTRAINED_HINT = ("model {uri!r} is an untrained preset (random weights: its captions mean nothing); pass "
                  "--model <trained model artifact>: `clipcap train --input <embeddings> --output <dir>` makes "
                  "one, `clipcap import-reference coco_weights.pt --output <dir>` imports the authors' released weights")


def inspect_model(uri: str, allow_untrained: bool = False) -> ModelInfo:
    """The model's config and version, every weights file checked, none loaded: ValueError before any work."""
    # lazy: safetensors.torch + torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from clipcap_core import __version__, artifacts, encoders
    from clipcap_core.model import ModelConfig

    if artifacts.is_preset(uri) and not allow_untrained:
        raise ValueError(UNTRAINED_HINT.format(uri=uri))
    try:
        if artifacts.is_preset(uri):
            cfg, version = artifacts.read_config(uri), f"preset-{__version__}"
        else:
            meta = artifacts.read_metadata(uri)
            cfg = from_dict(ModelConfig, meta["model"])
            version = model_version(meta, artifacts.verify_weights(uri, meta))
        encoders.validate_config(cfg.encoder)
        encoders.fetch_pretrained(cfg.encoder)  # an unreachable hub fails here, not in a restarting actor
    except Exception as exc:  # noqa: BLE001 - one clear job-level message whatever the backend raised
        raise ValueError(f"cannot use model {uri!r}: {exc}") from exc
    encoder_dim = encoders.embedding_dim(cfg.encoder)
    return ModelInfo(uri=uri, model_id=f"{uri}@{version}", clip_dim=int(cfg.clip_dim),
                     encoder=cfg.encoder, encoder_dim=encoder_dim)


def model_version(meta: dict[str, Any], weights: dict[str, str]) -> str:
    """A hash of the artifact's config.json and every weights file's sha256 (other weights: another id)."""
    body = json.dumps({"config": meta, "weights": weights}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


class Decoder:
    """Model + tokenizer on a device; ``(N, D)`` embeddings -> ``n`` captions and scores per input."""

    def __init__(self, model_uri: str, decoding: Any, device: str = "cpu", precision: str = "fp32",
                 projection: Any = None):
        # lazy: safetensors.torch + torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
        import torch

        from clipcap_core.artifacts import load_model
        from clipcap_core.decap import ProjectionConfig, resolve_projection

        precision = resolve_precision(precision, torch.device(device))  # auto: fp16 on GPU, fp32 on CPU
        loaded = load_model(model_uri, device=device, precision=precision)
        self.model, self.tokenizer, self.cfg = loaded.model.eval(), loaded.tokenizer, decoding
        # DeCap memory (the artifact's, or --memory's): loaded once per actor, on its device, in the model's dtype
        memory = resolve_projection(projection or ProjectionConfig(), loaded.decap, loaded.config.clip_dim)
        self.memory = memory.to(self.model.device, self.model.dtype) if memory is not None else None

    def __call__(self, embeds: np.ndarray) -> tuple[list[list[str]], list[list[float]]]:
        # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
        import torch

        from clipcap_core.decoding import generate

        inputs: Any = embeds
        if self.memory is not None:  # one batched projection for the whole block, on the device
            inputs = self.memory.project(torch.from_numpy(np.ascontiguousarray(embeds)))
        gen = generate(self.model, inputs, self.tokenizer, config=self.cfg)
        n = gen.n
        scores = np.asarray(gen.scores, dtype=np.float32).tolist()
        return gen.grouped(), [scores[i: i + n] for i in range(0, len(scores), n)]

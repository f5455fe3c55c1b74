"""``clipcap eval-clip``: retrieval R@1/5/10, the modality gap and zero-shot classification of a CLIP."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from clipcap_core import synthetic, uris
from clipcap_core.clip_eval import class_embeddings, modality_gap, retrieval, zero_shot
from clipcap_core.encoders import EncoderConfig, encoder_tag, load_encoder
from pipelines.clip import data as clip_data
from pipelines.io import schemas, tables

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EvalClipConfig:
    """The ``clipcap eval-clip`` config: each field is a flag but ``CLI_FLAGS``' None ones."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"batch_size": None}
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    shards: tuple[str, ...] = ()  # webdataset shard folders or .tar files
    tables: tuple[str, ...] = ()  # embedding tables with image and text embeddings
    part: Literal["all", "heldout", "train"] = "all"  # key-hash split to evaluate
    heldout_fraction: float = 0.05  # the training job's held-out fraction
    split_salt: str = "clipcap-heldout"  # the training job's split salt
    max_samples: int = 5000  # pairs evaluated (0 = all)
    classes: str | None = None  # file with one class name per line (zero-shot)
    templates: str | None = None  # file with one prompt template per line, each with {} (default: {})
    batch_size: int = 256
    device: str = "cpu"  # torch device (cpu, cuda, cuda:1)
    output: str | None = None  # write the JSON report here (any URI)

    def __post_init__(self) -> None:
        if bool(self.shards) == bool(self.tables):
            raise ValueError("give either shards or tables (exactly one of them)")
        if self.templates and not self.classes:
            raise ValueError("templates without classes: give --classes too")

    def split(self) -> tables.Split:
        return tables.Split(part=self.part, heldout_fraction=self.heldout_fraction, salt=self.split_salt)


def read_lines(uri: str) -> list[str]:
    fs, path = uris.filesystem(uri)
    with fs.open(path, "r") as f:
        lines = [ln.strip() for ln in f.read(16 << 20).splitlines()]  # bounded: 16 MB of class names
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise ValueError(f"{uri}: no lines (one entry per line expected)")
    return out


def _pairs_from_shards(cfg: EvalClipConfig, encoder: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    spec = encoder.spec
    size = spec.size if isinstance(spec.size, int) else int(spec.size[0])
    prep = clip_data.PairPrep(model_name=cfg.encoder.model_name, size=size, interpolation=spec.interpolation,
                              augment="none", split=cfg.split())
    pixels, _tokens, captions = clip_data.load_pairs(clip_data.list_shards(cfg.shards), prep, cfg.max_samples)
    img = np.concatenate([encoder.encode_pixels(pixels[s: s + cfg.batch_size])
                          for s in range(0, len(pixels), cfg.batch_size)]) if len(pixels) else np.zeros((0, 1))
    return img, encode_texts(encoder, captions, cfg.batch_size), captions


def encode_texts(encoder: Any, texts: list[str], batch_size: int = 256) -> np.ndarray:
    if not texts:
        return np.zeros((0, encoder.dim), np.float32)
    return np.concatenate([encoder.encode_text(texts[s: s + batch_size]) for s in range(0, len(texts), batch_size)])


def _pairs_from_tables(cfg: EvalClipConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    files = tables.list_table_files(cfg.tables)
    t = tables.read_split(files, cfg.split(), max_rows=cfg.max_samples or None)
    if schemas.TEXT_EMBEDDING not in t.column_names:
        raise ValueError(f"{cfg.tables}: no {schemas.TEXT_EMBEDDING!r} column; embed with --text-embeddings")
    return (tables.embeddings_numpy(t), tables.embeddings_numpy(t, schemas.TEXT_EMBEDDING),
            t.column(schemas.CAPTION).to_pylist())


def zero_shot_report(encoder: Any, img: np.ndarray, captions: list[str], classes: list[str],
                     templates: list[str]) -> dict[str, Any]:
    """Zero-shot top-1/top-5 over ``classes`` for the images whose caption is a class (+ synthetic attributes)."""
    index = {c.strip().lower(): i for i, c in enumerate(classes)}
    labelled = [(i, index[c.strip().lower()]) for i, c in enumerate(captions) if c.strip().lower() in index]
    out: dict[str, Any] = {"classes": len(classes), "templates": len(templates),
                           "unlabelled_images": len(captions) - len(labelled)}
    if not labelled:
        out["error"] = "no image caption matches a class name"
        return out
    rows, labels = zip(*labelled, strict=True)
    weights = class_embeddings(lambda xs: encode_texts(encoder, xs), classes, templates)
    z = zero_shot(img[list(rows)], list(labels), weights)
    preds = z.pop("predictions")
    out.update(z)
    out.update(synthetic_attributes([classes[p] for p in preds], [classes[y] for y in labels]))
    return out


def synthetic_attributes(predicted: list[str], truth: list[str]) -> dict[str, float]:
    """Per-attribute accuracy when every caption is a synthetic one (else {})."""
    parsed_t = [synthetic.parse_caption(c) for c in truth]
    if not parsed_t or any(p is None for p in parsed_t):
        return {}
    parsed_p = [synthetic.parse_caption(c) for c in predicted]
    return {f"attr_{name}": float(np.mean([p is not None and getattr(p, name) == getattr(t, name)
                                           for p, t in zip(parsed_p, parsed_t, strict=True)]))
            for name in ("count", "size", "color", "shape", "position")}


def evaluate_clip(cfg: EvalClipConfig) -> dict[str, Any]:
    """Retrieval (and zero-shot with ``classes``) figures of ``cfg.encoder`` on the selected pairs."""
    classes = read_lines(cfg.classes) if cfg.classes else None
    templates = read_lines(cfg.templates) if cfg.templates else ["{}"]
    t0 = time.perf_counter()
    encoder = load_encoder(cfg.encoder, device=cfg.device)
    img, txt, captions = _pairs_from_shards(cfg, encoder) if cfg.shards else _pairs_from_tables(cfg)
    if not captions:
        raise ValueError(f"no image-caption pairs in the {cfg.part!r} split of {cfg.shards or cfg.tables}")
    report: dict[str, Any] = {"model": encoder_tag(cfg.encoder), "part": cfg.part,
                              "retrieval": retrieval(img, txt, captions)}
    if len(captions) > 1:
        report["gap"] = modality_gap(img, txt)
    if classes:
        report["zero_shot"] = zero_shot_report(encoder, img, captions, classes, templates)
    report["seconds"] = time.perf_counter() - t0
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"eval-clip {report['model']} ({report['part']} split)", f"{'metric':<28}{'value':>10}"]
    for section in ("retrieval", "gap", "zero_shot"):
        for k, v in report.get(section, {}).items():
            lines.append(f"{section + '/' + k:<28}{v:>10.4f}" if isinstance(v, float) else
                         f"{section + '/' + k:<28}{v!s:>10}")
    return "\n".join(lines)

"""``clipcap evaluate``: config, checks before work, scoring, outputs."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa

from clipcap_core.metrics import ClipScorer
from pipelines.evaluate import images as image_input
from pipelines.evaluate.inputs import (
    ID_MODES,
    Matched,
    Predictions,
    match_ids,
    read_predictions,
    read_references,
)
from pipelines.io import schemas, storage

log = logging.getLogger(__name__)
SHOW_IDS = 10  # ids named in the summary per kind of problem


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """The ``clipcap evaluate`` config: each field is a flag (``pipelines.commands.flags``); ``CLI_FLAGS`` names the
    renamed flag, ``CLI_COMMA`` the one given as a comma-separated list."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"clip_model": "--clip"}
    CLI_COMMA: ClassVar[tuple[str, ...]] = ("metrics",)
    predictions: str  # caption table, COCO results JSON or table URI
    references: str  # COCO annotations JSON or reference table URI
    output: str  # folder for per_image.parquet, summary.json, results.json
    images: str | None = None
    """images (folder / archives / Parquet) or an embedding table: adds CLIPScore / RefCLIPScore"""
    model: str | None = None  # model artifact whose CLIP scores (default: the caption table's model)
    clip_model: str | None = None  # open_clip model name (instead of the model's CLIP)
    clip_pretrained: str | None = None  # open_clip tag, local file or URI of the CLIP weights
    id_match: Literal["auto", "key", "stem", "number"] = "auto"
    """how ids pair up: exact key, file stem, or trailing number (COCO file names)"""
    prediction_id_column: str | None = None  # default: key, then image_id
    reference_id_column: str | None = None  # default: key, then image_id
    caption_column: str = schemas.CAPTION  # predictions table: the caption column (default: caption)
    metrics: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider")
    """comma list of bleu,meteor,rouge,cider,spice (default: all but spice)"""
    tokenize: Literal["ptb", "simple"] = "ptb"  # ptb (COCO's, Java) or simple
    spice: Literal["auto", "on", "off"] = "auto"
    """auto: when Stanford CoreNLP is present; on: try (downloads it when online)"""
    device: str = "cpu"  # for the CLIP forward passes (cpu, cuda)

    def __post_init__(self) -> None:
        # lazy: transformers ~1.4 s to import (python -X importtime)
        from clipcap_core.metrics import METRICS

        if self.id_match != "auto" and self.id_match not in ID_MODES:
            raise ValueError(f"id_match must be auto or one of {sorted(ID_MODES)}, got {self.id_match!r}")
        unknown = sorted(set(self.metrics) - set(METRICS) - {"spice"})
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown} (known: {list(METRICS)})")
        if self.tokenize not in ("ptb", "simple") or self.spice not in ("auto", "on", "off"):
            raise ValueError("tokenize must be ptb|simple and spice auto|on|off")
        if self.clip_pretrained and not self.clip_model:
            raise ValueError("clip_pretrained needs clip_model")


def resolve_clip(cfg: EvaluateConfig, preds: Predictions) -> Any:
    """The CLIP (EncoderConfig) to score with: --clip, else --model's, else the caption table's model's."""
    # lazy: safetensors.torch + torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from clipcap_core import artifacts, encoders

    if cfg.clip_model:
        enc = encoders.EncoderConfig(model_name=cfg.clip_model, pretrained=cfg.clip_pretrained)
    else:
        source = cfg.model or preds.model
        if not source:
            raise ValueError("CLIPScore needs the captioner's CLIP: pass --model <artifact> or --clip "
                             "(the predictions do not name the model that wrote them)")
        try:
            enc = artifacts.read_config(source).encoder
        except Exception as exc:  # noqa: BLE001 - one clear job-level message
            raise ValueError(f"cannot read the CLIP of model {source!r} ({type(exc).__name__}: {exc}); "
                             "pass --model or --clip") from exc
    encoders.validate_config(enc)
    return enc


def _named(ids: list[str]) -> dict[str, Any]:
    return {"count": len(ids), "first": ids[:SHOW_IDS]}


def _clip_scores(cfg: EvaluateConfig, enc_cfg: Any, parts: list, m: Matched
                 ) -> tuple[dict[str, list[float]], dict[str, str], dict[str, float]]:
    """Per-image CLIPScore / RefCLIPScore (NaN where the image is missing), problems per id, corpus means."""
    # lazy: torch ~6.7 s to import (python -X importtime)
    from clipcap_core.encoders import load_encoder

    encoder = load_encoder(enc_cfg, device=cfg.device)
    emb, problems = image_input.image_embeddings(parts, set(m.ids), m.resolve, encoder)
    have = [i for i, rid in enumerate(m.ids) if rid in emb]
    per = {schemas.CLIP_SCORE: [math.nan] * len(m.ids), "ref_clip_score": [math.nan] * len(m.ids)}
    corpus: dict[str, float] = {}
    if have:
        s = ClipScorer(encoder).score(np.stack([emb[m.ids[i]] for i in have]), [m.captions[i] for i in have],
                                      [m.refs[i] for i in have])
        for j, i in enumerate(have):
            per[schemas.CLIP_SCORE][i] = float(s.clip_score[j])
            per["ref_clip_score"][i] = float(s.ref_clip_score[j])
        corpus = {schemas.CLIP_SCORE: float(np.mean(s.clip_score)), "ref_clip_score": float(np.mean(s.ref_clip_score)),
                  "clip_n": float(len(have))}
    return per, problems, corpus


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate ``cfg.predictions`` against ``cfg.references``; write the outputs; return the summary."""
    # lazy: transformers ~1.4 s to import (python -X importtime)
    from clipcap_core.metrics import evaluate_predictions

    storage.check_writable(cfg.output)
    preds = read_predictions(cfg.predictions, id_column=cfg.prediction_id_column, caption_column=cfg.caption_column)
    refs = read_references(cfg.references, id_column=cfg.reference_id_column, caption_column=cfg.caption_column)
    m = match_ids(preds, refs, cfg.id_match)
    enc_cfg = parts = None
    if cfg.images:  # every check of the CLIP side before the (slow) metrics
        enc_cfg = resolve_clip(cfg, preds)
        parts = image_input.plan(cfg.images, enc_cfg)
    log.info("evaluating %d predictions (id match %s; %d without reference, %d references without prediction, "
             "%d references without a caption)", len(m.ids), m.mode, len(m.missing_references),
             len(m.missing_predictions), len(m.empty_references))
    ev = evaluate_predictions(m.captions, m.refs, metrics=[x for x in cfg.metrics if x != "spice"],
                              tokenize=cfg.tokenize, spice="on" if "spice" in cfg.metrics else cfg.spice)
    per, summary_metrics, notes = dict(ev.per_item), dict(ev.summary), dict(ev.notes)
    problems: dict[str, str] = {}
    if enc_cfg is not None:
        clip_per, problems, clip_corpus = _clip_scores(cfg, enc_cfg, parts, m)
        per.update(clip_per)
        summary_metrics.update(clip_corpus)
    else:
        notes["clip_score"] = "no --images given: CLIPScore / RefCLIPScore need images or image embeddings"
    summary = {
        "predictions": cfg.predictions, "references": cfg.references, "images": cfg.images,
        "output": cfg.output, "id_match": m.mode, "evaluated": len(m.ids), "metrics": summary_metrics,
        "notes": notes, "tokenize": cfg.tokenize,
        "clip": None if enc_cfg is None else {"model_name": enc_cfg.model_name, "pretrained": enc_cfg.pretrained},
        "missing_references": _named(m.missing_references), "missing_predictions": _named(m.missing_predictions),
        "duplicate_predictions": _named(preds.duplicates),
        "empty_references": _named(m.empty_references), "blank_reference_captions": refs.blank,
        "missing_images": _named(sorted(problems)),
        "image_problems": dict(sorted(problems.items())[:SHOW_IDS]),
    }
    _write(cfg.output, m, per, summary)
    return summary


def _write(output: str, m: Matched, per: dict[str, list[float]], summary: dict[str, Any]) -> None:
    names = [s for s in schemas.EVAL_SCORES if s in per]
    cols: dict[str, Any] = {schemas.IMAGE_ID: m.ids, schemas.CAPTION: m.captions, schemas.REFERENCES: m.refs}
    for s in names:
        cols[s] = pa.array([None if math.isnan(v) else v for v in per[s]], type=pa.float64())
    table = pa.table(cols, schema=schemas.evaluation_schema(names))
    storage.atomic_write_table(table, storage.join(output, "per_image.parquet"))
    results = [{"image_id": int(i) if i.isdigit() else i, "caption": c} for i, c in zip(m.ids, m.captions,
                                                                                          strict=True)]
    storage.write_json(results, storage.join(output, "results.json"))
    storage.write_json(summary, storage.join(output, "summary.json"))  # last: the evaluation is complete


# the printed table: label, summary key, scale (COCO papers print BLEU/METEOR/ROUGE/CIDEr/SPICE x 100)
ROWS = (("BLEU-1", "bleu1", 100), ("BLEU-2", "bleu2", 100), ("BLEU-3", "bleu3", 100), ("BLEU-4", "bleu4", 100),
        ("METEOR", "meteor", 100), ("ROUGE-L", "rouge_l", 100), ("CIDEr", "cider", 100), ("SPICE", "spice", 100),
        ("exact match", "exact_match", 100), ("CLIPScore", "clip_score", 100),
        ("RefCLIPScore", "ref_clip_score", 100))


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, formatted value) for the metrics present, x100 like COCO tables."""
    ms = summary["metrics"]
    return [(label, f"{ms[key] * scale:.2f}") for label, key, scale in ROWS if key in ms]


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"evaluated {summary['evaluated']} images (id match: {summary['id_match']}); scores x100"]
    lines += [f"  {label:<14s}{value:>8s}" for label, value in metric_rows(summary)]
    for kind in ("missing_references", "missing_predictions", "duplicate_predictions", "empty_references",
                 "missing_images"):
        if summary[kind]["count"]:
            lines.append(f"  {kind.replace('_', ' ')}: {summary[kind]['count']} (e.g. {summary[kind]['first'][:3]})")
    lines += [f"  note: {k}: {v}" for k, v in summary["notes"].items()]
    return "\n".join(lines)

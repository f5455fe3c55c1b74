"""``clipcap report``: gather a bounded sample and the run's artifacts, write one HTML file."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from clipcap_core import uris
from clipcap_core.encoders import load_encoder
from clipcap_core.model import interpret_prefix
from pipelines.caption import output as caption_output
from pipelines.io import storage
from pipelines.report import card, charts, page, scales
from pipelines.report.failures import Failures, find_failures, matches_reference, row_flags, worst_first
from pipelines.report.sample import (
    Sampled,
    attach_evaluation,
    evaluation_rows,
    fetch_images,
    sample_captions,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """The ``clipcap report`` config: each field is a flag (``pipelines.commands.flags``); ``CLI_FLAGS`` names the
    renamed ones."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"captions": "--input", "out": "--output"}
    captions: str  # caption table folder URI (required)
    out: str  # the HTML file to write (required)
    evaluation: str | None = None  # folder written by clipcap evaluate (metric table, per-image scores)
    run: str | None = None  # training run folder with history.json (training curves)
    model: str | None = None  # model artifact (default: the one recorded in the caption table)
    images: str | None = None  # the captioned images (default: the input in the table's _meta/run.json)
    sample: int = 24  # images in the gallery
    max_parts: int = 4  # caption parts read at most
    interpret: int = 4  # images with prefix interpretation
    thumb_px: int = 160  # thumbnail size
    seed: int = 0  # seed of the sampled parts and images
    order: Literal["worst", "key"] = "worst"
    """gallery order (worst: flagged and lowest-scoring first; the page can switch)"""
    failures: int = 50  # rows listed per kind of failure (all are counted)
    studies: tuple[str, ...] = ()  # clipcap study output folders (<output>/<name>/): tables and plots in a section

    def __post_init__(self) -> None:
        if self.sample < 1 or self.max_parts < 1 or self.interpret < 0 or not 16 <= self.thumb_px <= 1024:
            raise ValueError("need sample >= 1, max_parts >= 1, interpret >= 0, 16 <= thumb_px <= 1024")
        if self.order not in ("worst", "key") or self.failures < 1:
            raise ValueError(f"need order worst|key (got {self.order!r}) and failures >= 1")
        if not self.out.endswith((".html", ".htm")):
            raise ValueError(f"--output must be an .html file, got {self.out!r}")


def _load_model(uri: str | None) -> Any:
    if not uri:
        return None
    # lazy: safetensors.torch + torch ~6.7 s to import (python -X importtime)
    from clipcap_core.artifacts import load_model

    try:
        return load_model(uri)
    except Exception as exc:  # noqa: BLE001 - the report goes on without interpretation / card
        log.warning("report: cannot load model %s: %s", uri, exc)
        return None


def _model_card(uri: str | None) -> str | None:
    if not uri or not uris.exists(storage.join(uri, "README.md")):
        return None
    fs, path = uris.filesystem(storage.join(uri, "README.md"))
    with fs.open(path, "r") as f:
        return f.read(64 << 10)  # bounded: a card is a page, not a book


def _interpretation(loaded: Any, items: list[Sampled], n: int) -> list[dict[str, Any]]:
    chosen = [it for it in items if it.embedding is not None][:n]
    if loaded is None or not chosen:
        return []
    tokens = interpret_prefix(loaded.model, loaded.tokenizer, np.stack([it.embedding for it in chosen]))
    return [{"key": it.key, "caption": it.captions[0]["caption"] if it.captions else "",
             "tokens": [t[0] if t else "" for t in toks]} for it, toks in zip(chosen, tokens, strict=True)]


def _evaluation_context(evaluation: str | None, items: list[Sampled]) -> dict[str, Any]:
    summary = storage.read_json(storage.join(evaluation, "summary.json")) if evaluation else None
    if summary is None:
        return {"metrics": [], "eval_note": "", "eval_rows": []}
    attach_evaluation(evaluation, items)
    note = (f"{summary['evaluated']} images evaluated against {summary['references']}; "
            f"{summary['missing_references']['count']} predictions without reference, "
            f"{summary['missing_predictions']['count']} references without prediction.")
    return {"metrics": scales.metric_table(summary), "eval_note": note, "eval_rows": evaluation_rows(evaluation)}


def item_row(it: Sampled) -> dict[str, Any]:
    """One sampled image as an evaluation-shaped row: its rank-0 caption, references and scores."""
    first = it.captions[0] if it.captions else {}
    row = {"image_id": it.key, "caption": first.get("caption") or "", "references": [],
           "clip_score": first.get("clip_score")}
    row.update({k: v for k, v in it.evaluation.items() if v is not None and k != "image_id"})
    return row


def gallery_cards(items: list[Sampled], order: str) -> list[dict[str, Any]]:
    """One card per item with its flags, references (matched or not) and both ranks, in ``order``."""
    rows = [item_row(it) for it in items]
    worst_rank = {i: r for r, i in enumerate(worst_first(rows))}
    cards = [{"it": it, "flags": row_flags(row), "worst_rank": worst_rank[i], "key_rank": i,
              "refs": [(ref, matches_reference(row["caption"], [ref])) for ref in row["references"]]}
             for i, (it, row) in enumerate(zip(items, rows, strict=True))]
    return sorted(cards, key=lambda c: c["worst_rank"]) if order == "worst" else cards


def _failures(eval_rows: list[dict[str, Any]], items: list[Sampled], shown: int) -> Failures:
    if eval_rows:
        return find_failures(eval_rows, source="evaluation", shown=shown)
    return find_failures([item_row(it) for it in items], source="sample", shown=shown)


def study_sections(folders: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each ``clipcap study`` folder's Markdown table and plot (a data URI), for the page's Studies section."""
    import base64

    out = []
    for folder in folders:
        fs, path = storage.filesystem(storage.join(folder, "table.md"))
        if not fs.exists(path):
            raise ValueError(f"{folder} is not a `clipcap study` output folder (no table.md)")
        with fs.open(path, "r") as f:
            table = f.read()
        plot = None
        for name in ("prefix.png", "decoding.png"):
            pfs, ppath = storage.filesystem(storage.join(folder, name))
            if pfs.exists(ppath):
                with pfs.open(ppath, "rb") as f:
                    plot = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        out.append({"name": posixpath.basename(folder.rstrip("/")), "table": table, "plot": plot})
    return out


def build_report(cfg: ReportConfig) -> str:
    """Write the report to ``cfg.out``; returns its URI."""
    sampled = sample_captions(cfg.captions, cfg.sample, max_parts=cfg.max_parts, seed=cfg.seed)
    model_uri = cfg.model or sampled.model
    loaded = _load_model(model_uri)
    run_record = caption_output.run_record(cfg.captions)
    images = cfg.images or run_record.get("input")
    encoder = None
    if loaded is not None and cfg.interpret:
        encoder = load_encoder(loaded.config.encoder)
    if images:
        fetch_images(images, sampled.items, cfg.thumb_px, encoder)
    history = storage.read_json(storage.join(cfg.run, "history.json")) if cfg.run else None
    clip_values = [c.get("clip_score") for it in sampled.items for c in it.captions[:1]]
    interpretation = _interpretation(loaded, sampled.items, cfg.interpret)
    evaluated = _evaluation_context(cfg.evaluation, sampled.items)
    context = {
        "title": posixpath.basename(cfg.captions.rstrip("/")) or cfg.captions, "captions": cfg.captions,
        "model": model_uri, "parts_read": sampled.parts_read, "items": sampled.items,
        "parts_total": sampled.parts_total, "rows_read": sampled.rows_read,
        "cards": gallery_cards(sampled.items, cfg.order), "order": cfg.order,
        "failures": _failures(evaluated.pop("eval_rows"), sampled.items, cfg.failures),
        "training_chart": charts.training_chart(history) if history else None,
        "clip_chart": charts.histogram(clip_values, "CLIPScore (0-2.5)"),
        "score_keys": ("bleu4", "cider", "clip_score", "ref_clip_score", "exact_match"),
        "scale": scales.scale, "log_prob_scale": scales.LOG_PROB_SCALE,
        "interpretation": interpretation,
        "interpretation_note": "no model or no image embeddings for prefix interpretation"
        if not interpretation else "",
        "card": card.card_sections(model_uri, evaluated["metrics"]),
        "model_card": _model_card(model_uri), "model_card_note": f"no model card found for {model_uri!r}",
        "studies": study_sections(cfg.studies),
        **evaluated,
    }
    html = page.render(context)
    fs, path = uris.filesystem(cfg.out)
    storage.ensure_dir(fs, posixpath.dirname(path) or ".")
    with fs.open(path, "w") as f:
        f.write(html)
    log.info("report: %s (%d images, %.0f KB)", cfg.out, len(sampled.items), len(html) / 1024)
    return cfg.out

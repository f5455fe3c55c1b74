"""``clipcap report``: a bounded sample of a caption table, the images behind it and the run's artifacts as one
self-contained HTML file: failures first (no matching reference, empty or looping, lowest CLIPScore), every score
with its scale, charts as PNG data URIs, and the model card from the artifact's config and metrics. The page
(``page.html``) has no scripts and is autoescaped: captions, references, keys and model cards are untrusted text.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import posixpath
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar, Literal

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipcap_core import uris
from clipcap_core.artifacts import load_model, read_metadata
from clipcap_core.encoders import describe_weights, load_encoder
from clipcap_core.imaging import ImageDecodeError, decode_image
from clipcap_core.metrics import normalize_caption
from clipcap_core.model import interpret_prefix
from pipelines.caption import output as caption_output
from pipelines.caption.output import resolve_table
from pipelines.evaluate.run import ROWS, number, stem
from pipelines.io import schemas, sources, storage


@dataclass
class Sampled:
    key: str
    part_id: str
    captions: list[dict[str, Any]]       # this image's rows (rank order): caption, score, clip_score, rank
    thumbnail: str | None = None         # data URI
    image_error: str | None = None
    embedding: np.ndarray | None = None  # CLIP image embedding (for prefix interpretation)
    evaluation: dict[str, Any] = field(default_factory=dict)  # per-image scores + references


@dataclass
class CaptionSample:
    items: list[Sampled]
    model: str | None       # model artifact URI from the table's metadata
    parts_total: int
    parts_read: int
    rows_read: int


def _part_id(uri: str) -> str:
    name = posixpath.basename(uri)
    return name[len("part-"):-len(".parquet")] if name.startswith("part-") else name.rsplit(".", 1)[0]


def _first_batch(uri: str, rng: random.Random, batch_rows: int) -> tuple[pa.Table, dict[str, str]]:
    fs, path = uris.filesystem(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = schemas.read_metadata(pf.schema_arrow)
        if pf.num_row_groups == 0:
            return pf.schema_arrow.empty_table(), meta
        group = rng.randrange(pf.num_row_groups)
        batch = next(pf.iter_batches(batch_size=batch_rows, row_groups=[group]), None)
        table = pa.Table.from_batches([batch]) if batch is not None else pf.schema_arrow.empty_table()
    return table, meta


def sample_captions(captions: str, n: int, *, max_parts: int = 4, batch_rows: int = 2048,
                    seed: int = 0) -> CaptionSample:
    """Up to ``n`` images (all their ranked captions) from at most ``max_parts`` parts of ``captions``."""
    table = resolve_table(captions)[0]
    files = storage.list_files(table, ".parquet") if not captions.endswith(".parquet") else [captions]
    if not files:
        raise ValueError(f"no caption table parts (part-*.parquet) under {captions!r}")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(files, min(max_parts, len(files))))
    by_key: dict[str, Sampled] = {}
    model, rows = None, 0
    per_part = max(1, -(-n // len(chosen)))  # ceil: spread the sample over the parts read
    for uri in chosen:
        table, meta = _first_batch(uri, rng, batch_rows)
        rows += table.num_rows
        model = model or (meta.get(schemas.META_MODEL, "").rsplit("@", 1)[0] or None)
        keys = sorted(set(table.column(schemas.KEY).to_pylist())) if table.num_rows else []
        for key in rng.sample(keys, min(per_part, len(keys))):
            rows_of = table.filter(pc.equal(table.column(schemas.KEY), key)).to_pylist()
            rows_of.sort(key=lambda r: r.get(schemas.RANK, 0))
            by_key[key] = Sampled(key, _part_id(uri), rows_of)
    items = [by_key[k] for k in sorted(by_key)][:n]
    return CaptionSample(items, model, len(files), len(chosen), rows)


def fetch_images(input_uri: str, items: list[Sampled], px: int, encoder: Any = None) -> None:
    """Thumbnails (and CLIP embeddings with ``encoder``) of ``items`` from the captioned input, in place."""
    wanted: dict[str, list[Sampled]] = {}
    for it in items:
        wanted.setdefault(it.part_id, []).append(it)
    cfg = sources.SourceConfig()
    parts = [p for p in sources.plan_parts(input_uri, cfg) if p.part_id in wanted]
    for part in parts:
        todo = {it.key: it for it in wanted[part.part_id]}
        if part.kind == "images":  # loose files: read only the wanted ones
            part = sources.Part(part.part_id, part.kind, tuple(f for f in part.files if f.rel in todo))
        for rec in sources.read_part(part, cfg):
            it = todo.pop(rec.key, None)
            if it is not None:
                _attach(it, rec, px, encoder)
            if not todo:
                break
    for it in items:
        if it.thumbnail is None and it.image_error is None and it.embedding is None:
            it.image_error = "image not found in the captioned input"


def _attach(it: Sampled, rec: sources.Record, px: int, encoder: Any) -> None:
    if rec.error is not None or rec.embedding is not None:  # an embedding-table input has no pixels to show
        it.embedding = rec.embedding
        it.image_error = rec.error or "input was an embedding table (no image)"
        return
    try:
        image = decode_image(rec.data or b"")
    except ImageDecodeError as exc:
        it.image_error = str(exc)
        return
    if encoder is not None:
        it.embedding = encoder.encode_pixels(encoder.resize(image)[None])[0]
    image.thumbnail((px, px))  # a JPEG re-encoded by us: the original bytes never reach the page
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    it.thumbnail = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


log = logging.getLogger(__name__)

# score -> (maximum per image; what it measures). Every score is >= 0.
SCALES: dict[str, tuple[float, str]] = {
    **{f"bleu{n}": (1.0, f"BLEU-{n}: n-gram precision against the references, with a brevity penalty")
       for n in range(1, 5)},
    "meteor": (1.0, "METEOR: unigram match with stems and synonyms"),
    "rouge_l": (1.0, "ROUGE-L: longest common subsequence F-score"),
    "cider": (10.0, "CIDEr-D: TF-IDF weighted n-gram similarity to the references (x10 by definition)"),
    "spice": (1.0, "SPICE: F-score of scene-graph tuples"),
    "exact_match": (1.0, "1 when the caption equals a reference after normalisation (per run: the share)"),
    "clip_score": (2.5, "CLIPScore: 2.5 x max(cos(image, caption), 0) with the captioner's CLIP"),
    "ref_clip_score": (2.5 * 2 / 3.5, "RefCLIPScore: harmonic mean of CLIPScore and the best reference cosine"),
}
LOG_PROB_SCALE = "<= 0; 0 = certain"  # the caption table's score: mean token log-prob


def scale(name: str, *, x100: bool = False) -> str:
    """``"0-<max>"`` of score ``name`` (x100 for the metric table); ``""`` for a score with no known range."""
    if name not in SCALES:
        return ""
    top = SCALES[name][0] * (100 if x100 else 1)
    return f"0-{top:.3g}" if top < 1000 else f"0-{top:.0f}"


def metric_table(summary: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, value x100, range x100, meaning) per metric of an evaluation summary, in the COCO order."""
    ms = summary["metrics"]
    return [(label, f"{ms[key] * factor:.2f}", scale(key, x100=True), SCALES[key][1])
            for label, key, factor in ROWS if ms.get(key) is not None and key in SCALES]


LOOP_MAX_NGRAM = 4  # a loop is an n-gram (n <= 4) repeated back to back: "red red red", "a dog a dog"


@dataclass
class Failures:
    source: str                       # "evaluation" (every evaluated image) or "sample" (the gallery's)
    checked: int                      # rows looked at
    with_references: int              # rows that had a reference to compare with
    mismatches: list[dict[str, Any]] = field(default_factory=list)   # worst first, at most ``shown``
    mismatch_count: int = 0
    degenerate: list[dict[str, Any]] = field(default_factory=list)   # empty or looping (``why`` says which)
    degenerate_count: int = 0
    lowest_clip: list[dict[str, Any]] = field(default_factory=list)  # lowest CLIPScore first

    @property
    def any(self) -> bool:
        return bool(self.mismatch_count or self.degenerate_count)


def loop_of(caption: str) -> str | None:
    """The repeated n-gram when ``caption`` loops (a word 3 times in a row, or a 2..4-gram twice), else None."""
    words = normalize_caption(caption).split()
    for n in range(1, LOOP_MAX_NGRAM + 1):
        times = 3 if n == 1 else 2
        for i in range(len(words) - n * times + 1):
            gram = words[i:i + n]
            if all(words[i + k * n:i + (k + 1) * n] == gram for k in range(1, times)):
                return " ".join(gram)
    return None


def degenerate_reason(caption: str | None) -> str | None:
    """Why a caption is useless whatever the references: empty, or looping; None when it is neither."""
    if not (caption or "").strip():
        return "empty caption"
    gram = loop_of(caption or "")
    return f"loops on {gram!r}" if gram else None


def matches_reference(caption: str, references: list[str]) -> bool:
    """``clipcap evaluate``'s exact match: ``caption`` equals a reference after normalisation."""
    return normalize_caption(caption) in {normalize_caption(r) for r in references}


def is_mismatch(row: dict[str, Any]) -> bool:
    """A row with references whose caption matches none of them (its exact_match, or computed here)."""
    refs = row.get("references") or []
    if not refs:
        return False
    if row.get("exact_match") is not None:
        return row["exact_match"] < 0.5
    return not matches_reference(row.get("caption") or "", refs)


def _badness(row: dict[str, Any]) -> tuple[float, float]:
    """Sort key, worst first: lowest CIDEr, then lowest CLIPScore (missing scores sort last)."""
    cider, clip = row.get("cider"), row.get("clip_score")
    return (cider if cider is not None else float("inf"), clip if clip is not None else float("inf"))


def find_failures(rows: list[dict[str, Any]], *, source: str, shown: int = 50, lowest: int = 5) -> Failures:
    """Mismatches, degenerate captions and the ``lowest`` CLIPScores among ``rows`` (lists cut to ``shown``)."""
    for row in rows:
        row["why"] = degenerate_reason(row.get("caption"))
    bad = sorted((r for r in rows if is_mismatch(r)), key=_badness)
    odd = sorted((r for r in rows if r["why"]), key=_badness)
    scored = sorted((r for r in rows if r.get("clip_score") is not None), key=lambda r: r["clip_score"])
    return Failures(source=source, checked=len(rows), with_references=sum(bool(r.get("references")) for r in rows),
                    mismatches=bad[:shown], mismatch_count=len(bad), degenerate=odd[:shown],
                    degenerate_count=len(odd), lowest_clip=scored[:lowest])


def row_flags(row: dict[str, Any]) -> list[str]:
    """What is wrong with one caption row, for its gallery card ([] when nothing is)."""
    flags = ["matches no reference"] if is_mismatch(row) else []
    why = degenerate_reason(row.get("caption"))
    return flags + ([why] if why else [])


MIN_STEP_ROWS = 3  # fewer step rows draw no line: plot the epoch rows' train loss instead
HELDOUT = ("exact_match", "bleu4", "cider", "clip_score")  # clipcap_core.metrics.heldout_metrics


def _pyplot() -> Any:
    # lazy: matplotlib.pyplot ~1.1 s to import (python -X importtime)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _data_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def train_loss_points(history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], str]:
    """(step, train loss) points and their legend: the step rows, or the epoch means when a short run logged
    fewer than ``MIN_STEP_ROWS`` steps."""
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    steps = [(r["step"], r["train_loss"]) for r in history if r.get("kind") == "step" and finite(r.get("train_loss"))]
    if len(steps) >= MIN_STEP_ROWS:
        return steps, "train loss"
    epochs = [(r["step"], r["train_loss"]) for r in history
              if r.get("kind") == "epoch" and finite(r.get("train_loss"))]
    return (epochs, "train loss (epoch mean)") if len(epochs) > len(steps) else (steps, "train loss")


def training_chart(history: list[dict[str, Any]]) -> str | None:
    """Loss curves beside the held-out metrics per epoch."""
    plt = _pyplot()
    epochs = [r for r in history if r.get("kind") == "epoch"]
    steps, label = train_loss_points(history)
    if not steps and not epochs:
        return None
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
    if steps:
        loss_ax.plot(*zip(*steps, strict=True), "-" if label == "train loss" else "s-", lw=1, label=label)
    val = [(r["step"], r["val_loss"]) for r in epochs if "val_loss" in r]
    if val:
        loss_ax.plot(*zip(*val, strict=True), "o-", label="held-out loss")
    loss_ax.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    for name in HELDOUT:
        points = [(r["step"], r[name]) for r in epochs if isinstance(r.get(name), (int, float))]
        if points:
            metric_ax.plot(*zip(*points, strict=True), "o-", label=name)
    metric_ax.set(xlabel="step", title="held-out metrics")
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _data_uri(fig)


def histogram(values: Sequence[float], label: str) -> str | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.hist(values, bins=min(20, max(5, len(values) // 2)), color="#4c72b0")
    ax.set(xlabel=label, ylabel="captions", title=f"{label} of the sampled captions (n={len(values)})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _data_uri(fig)


Section = tuple[str, list[tuple[str, str]]]  # (title, [(name, value)])
SHOW_TABLES = 3  # training tables named on the card (the rest counted)


def _model_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    m = meta["model"]
    enc, lm = m["encoder"], m["lm"]
    return [("CLIP", describe_weights(enc["model_name"], enc.get("pretrained"))),
            ("CLIP embedding size D", str(m["clip_dim"])),
            ("mapping", f"{m['mapping']['kind']}, prefix length {m['mapping']['prefix_length']}"),
            ("language model", f"{lm['name_or_path']} ({'frozen' if lm.get('freeze') else 'fine-tuned'})"),
            ("created", f"{meta.get('created_at', '?')} with clipcap-pipeline {meta.get('code_version', '?')}")]


def _data_rows(training: dict[str, Any]) -> list[tuple[str, str]]:
    tables = list(training.get("tables") or [])
    named = ", ".join(tables[:SHOW_TABLES]) + (f" and {len(tables) - SHOW_TABLES} more" if len(tables) > SHOW_TABLES
                                                else "")
    dropped = training.get("input_errors") or {}
    rows = [("training tables", f"{len(tables)}: {named}" if tables else "not recorded"),
            ("run", str(training.get("run", "?"))), ("initialised from", str(training.get("init", "?"))),
            ("trained", f"{training.get('step', '?')} steps, {training.get('epochs', '?')} epochs"),
            ("rows dropped before training", ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) or "none")]
    if training.get("replay"):
        rows.append(("replayed tables", f"{len(training['replay'])} (fraction {training.get('replay_fraction')})"))
    return rows


def _metric_rows(metrics: dict[str, Any], eval_metrics: list[tuple[str, str, str, str]]) -> list[tuple[str, str]]:
    if metrics:
        return [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in sorted(metrics.items())]
    if eval_metrics:
        return [(f"{label} (this report's evaluation, x100)", f"{value} of {scale}")
                for label, value, scale, _ in eval_metrics]
    return [("metrics", "none recorded with the model and no --evaluation given")]


def card_sections(uri: str | None, eval_metrics: list[tuple[str, str, str, str]]) -> list[Section]:
    """Sections of the card of the artifact at ``uri`` ([] when it has no readable config.json)."""
    if not uri:
        return []
    try:
        meta = read_metadata(uri)
    except Exception as exc:  # noqa: BLE001 - the report goes on and says the card is missing
        log.warning("report: cannot read the config of model %s: %s", uri, exc)
        return []
    metrics = storage.read_json(storage.join(uri, "metrics.json")) or {}
    training = meta.get("training") or {}
    train = training.get("train") or {}
    recipe = [(k, "default" if v is None else str(v)) for k, v in train.items()] or [
        ("recipe", "not recorded (an imported or untrained model)")]
    sections: list[Section] = [("Model", _model_rows(meta)), ("Metrics", _metric_rows(metrics, eval_metrics))]
    if training:
        sections.append(("Data", _data_rows(training)))
    sections.append(("Training recipe", recipe))
    return sections




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
    """The evaluation's metric table and per-image rows; each sampled item gets its row by key, stem or number."""
    summary = storage.read_json(storage.join(evaluation, "summary.json")) if evaluation else None
    if summary is None:
        return {"metrics": [], "eval_note": "", "eval_rows": []}
    fs, path = uris.filesystem(storage.join(evaluation, "per_image.parquet"))
    rows = []
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            rows = pq.read_table(f).to_pylist()
    forms = {form: it for it in items for form in (it.key, stem(it.key), number(it.key))}
    for row in rows:
        if row[schemas.IMAGE_ID] in forms:
            forms[row[schemas.IMAGE_ID]].evaluation = dict(row)
    note = (f"{summary['evaluated']} images evaluated against {summary['references']}; "
            f"{summary['missing_references']['count']} predictions without reference, "
            f"{summary['missing_predictions']['count']} references without prediction.")
    return {"metrics": metric_table(summary), "eval_note": note, "eval_rows": rows}


def item_row(it: Sampled) -> dict[str, Any]:
    """One sampled image as an evaluation-shaped row: its rank-0 caption, references and scores."""
    first = it.captions[0] if it.captions else {}
    row = {"image_id": it.key, "caption": first.get("caption") or "", "references": [],
           "clip_score": first.get("clip_score")}
    row.update({k: v for k, v in it.evaluation.items() if v is not None and k != "image_id"})
    return row


def gallery_cards(items: list[Sampled], order: str) -> list[dict[str, Any]]:
    """One card per item with its flags, references (matched or not) and both ranks, in ``order``; worst first
    is flagged cards, then lowest CIDEr and CLIPScore, then by id."""
    cards = []
    for i, it in enumerate(items):
        row = item_row(it)
        cards.append({"it": it, "flags": row_flags(row), "key_rank": i, "row": row,
                      "refs": [(ref, matches_reference(row["caption"], [ref])) for ref in row["references"]]})
    worst = sorted(cards, key=lambda c: (not c["flags"], *_badness(c["row"]), str(c["row"]["image_id"])))
    for rank, card in enumerate(worst):
        card["worst_rank"] = rank
    return worst if order == "worst" else cards


def study_sections(folders: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each ``clipcap study`` folder's Markdown table and plot (a data URI), for the page's Studies section."""
    out = []
    for folder in folders:
        fs, root = uris.filesystem(folder)
        if not fs.exists(posixpath.join(root, "table.md")):
            raise ValueError(f"{folder} is not a `clipcap study` output folder (no table.md)")
        plots = [fs.cat_file(p) for p in (posixpath.join(root, n) for n in ("prefix.png", "decoding.png"))
                 if fs.exists(p)]
        out.append({"name": posixpath.basename(folder.rstrip("/")),
                    "table": fs.cat_file(posixpath.join(root, "table.md")).decode(),
                    "plot": "data:image/png;base64," + base64.b64encode(plots[-1]).decode() if plots else None})
    return out


def build_report(cfg: ReportConfig) -> str:
    """Write the report to ``cfg.out``; returns its URI."""
    sampled = sample_captions(cfg.captions, cfg.sample, max_parts=cfg.max_parts, seed=cfg.seed)
    model_uri = cfg.model or sampled.model
    loaded = _load_model(model_uri)
    images = cfg.images or caption_output.run_record(cfg.captions).get("input")
    encoder = load_encoder(loaded.config.encoder) if loaded is not None and cfg.interpret else None
    if images:
        fetch_images(images, sampled.items, cfg.thumb_px, encoder)
    history = storage.read_json(storage.join(cfg.run, "history.json")) if cfg.run else None
    clip_values = [c.get("clip_score") for it in sampled.items for c in it.captions[:1]]
    interpretation = _interpretation(loaded, sampled.items, cfg.interpret)
    evaluated = _evaluation_context(cfg.evaluation, sampled.items)
    eval_rows = evaluated.pop("eval_rows")
    failures = find_failures(eval_rows or [item_row(it) for it in sampled.items],
                             source="evaluation" if eval_rows else "sample", shown=cfg.failures)
    context = {
        "title": posixpath.basename(cfg.captions.rstrip("/")) or cfg.captions, "captions": cfg.captions,
        "model": model_uri, "parts_read": sampled.parts_read, "items": sampled.items,
        "parts_total": sampled.parts_total, "rows_read": sampled.rows_read,
        "cards": gallery_cards(sampled.items, cfg.order), "order": cfg.order,
        "failures": failures,
        "training_chart": training_chart(history) if history else None,
        "clip_chart": histogram(clip_values, "CLIPScore (0-2.5)"),
        "score_keys": ("bleu4", "cider", "clip_score", "ref_clip_score", "exact_match"),
        "scale": scale, "log_prob_scale": LOG_PROB_SCALE,
        "interpretation": interpretation,
        "interpretation_note": "no model or no image embeddings for prefix interpretation"
        if not interpretation else "",
        "card": card_sections(model_uri, evaluated["metrics"]),
        "model_card": _model_card(model_uri), "model_card_note": f"no model card found for {model_uri!r}",
        "studies": study_sections(cfg.studies),
        **evaluated,
    }
    template = resources.files(__package__).joinpath("page.html").read_text("utf-8")
    html = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(template).render(**context)
    storage.write_file(cfg.out, html)
    log.info("report: %s (%d images, %.0f KB)", cfg.out, len(sampled.items), len(html) / 1024)
    return cfg.out

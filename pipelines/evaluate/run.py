"""``clipcap evaluate``: config, checks before work, reading what it compares (predictions, references, matching
their ids), image embeddings for CLIPScore (from an embedding table or from images), scoring, outputs."""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq

from clipcap_core import uris
from clipcap_core.encoders import embedding_dim
from clipcap_core.imaging import ImageDecodeError, decode_image
from clipcap_core.metrics import ClipScorer
from pipelines.io import schemas, sources, storage

ID_COLUMNS = (schemas.KEY, schemas.IMAGE_ID)  # tried in this order when no id column is named
TABLE_SUFFIXES = (".parquet", ".jsonl", ".csv")


@dataclass
class Predictions:
    ids: list[str]
    captions: list[str]
    model: str | None = None                    # caption tables: the model URI that wrote them
    duplicates: list[str] = field(default_factory=list)  # ids seen more than once (first kept)


@dataclass
class References:
    refs: dict[str, list[str]]  # non-blank captions only
    aliases: dict[str, str] = field(default_factory=dict)  # COCO file_name -> image id
    blank: int = 0  # blank captions dropped (an empty reference would be scored as a real one)

    def add(self, rid: str, caption: str) -> None:
        if caption.strip():
            self.refs.setdefault(rid, []).append(caption)
        else:
            self.refs.setdefault(rid, [])
            self.blank += 1


# --- files and tables -----------------------------------------------------------------------------------
def _files(uri: str) -> list[str]:
    # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from pipelines.caption.output import resolve_table

    uri = resolve_table(uri)[0]  # a caption run's output folder -> its captions/ table
    fs, path = uris.filesystem(uri)
    if not fs.exists(path):
        raise ValueError(f"{uri!r} does not exist")
    if fs.isdir(path):
        files = [u for s in TABLE_SUFFIXES for u in storage.list_files(uri, s)
                 if not posixpath.basename(u).startswith(("_", "."))]
        if not files:
            raise ValueError(f"no {'/'.join(TABLE_SUFFIXES)} files in {uri!r}")
        return sorted(files)
    return [uri]


def _read_text(uri: str) -> str:
    fs, path = uris.filesystem(uri)
    with fs.open(path, "r") as f:
        return f.read()


def _read_table(uri: str, columns: set[str] | None = None) -> pa.Table:
    """One Parquet / JSONL / CSV file (strings stay strings; our metadata is kept for Parquet)."""
    # lazy: pandas ~0.55 s to import (python -X importtime)
    import pandas as pd

    fs, path = uris.filesystem(uri)
    if uri.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            # only what evaluation can use: a caption table's other columns (model, timestamps...) stay unread
            wanted = [c for c in pf.schema_arrow.names if c in columns] if columns else None
            return pf.read(columns=wanted)
    text = _read_text(uri)
    try:
        if uri.endswith(".jsonl"):
            frame = pd.read_json(io.StringIO(text), lines=True, dtype=False)
        elif uri.endswith(".csv"):
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        else:
            raise ValueError(f"{uri!r}: unknown table format (use {', '.join(TABLE_SUFFIXES)} or .json)")
    except ValueError as exc:
        raise ValueError(f"cannot read {uri!r}: {exc}") from exc
    return pa.Table.from_pandas(frame, preserve_index=False)


def _id_column(table: pa.Table, wanted: str | None, where: str) -> str:
    for name in [wanted] if wanted else ID_COLUMNS:
        if name in table.column_names:
            return name
    looked = repr(wanted) if wanted else f"(looked for {list(ID_COLUMNS)})"
    raise ValueError(f"{where}: no id column {looked}; columns are {table.column_names}")


def _table_rows(uri: str, id_column: str | None, caption_column: str, where: str, best_rank: bool = False
                ) -> tuple[list[str], list[str], dict[str, str]]:
    ids: list[str] = []
    captions: list[str] = []
    meta: dict[str, str] = {}
    wanted = {caption_column, schemas.RANK, *ID_COLUMNS, *([id_column] if id_column else [])}
    for f in _files(uri):
        table = _read_table(f, wanted)
        meta = meta or schemas.read_metadata(table.schema)
        if caption_column not in table.column_names:
            raise ValueError(f"{where} {f!r}: no caption column {caption_column!r}; columns are {table.column_names}")
        if best_rank and schemas.RANK in table.column_names:
            table = table.filter(pa.compute.equal(table.column(schemas.RANK), 0))
        col = _id_column(table, id_column, f"{where} {f!r}")
        ids += [_id_str(v) for v in table.column(col).to_pylist()]
        captions += ["" if c is None else str(c) for c in table.column(caption_column).to_pylist()]
    return ids, captions, meta


def _id_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _load_json(uri: str, where: str) -> Any:
    try:
        return json.loads(_read_text(uri))
    except FileNotFoundError:
        raise ValueError(f"{where} {uri!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} {uri!r} is not valid JSON: {exc}") from exc


# --- predictions ----------------------------------------------------------------------------------------
def read_predictions(uri: str, *, id_column: str | None = None, caption_column: str = schemas.CAPTION
                     ) -> Predictions:
    if uri.endswith(".json"):
        data = _load_json(uri, "predictions")
        if not isinstance(data, list) or not all(isinstance(r, dict) and {"image_id", "caption"} <= set(r)
                                                 for r in data):
            raise ValueError(f"predictions {uri!r}: a COCO results JSON is a list of "
                             '{"image_id": ..., "caption": ...} objects')
        ids, captions, meta = [_id_str(r["image_id"]) for r in data], [str(r["caption"] or "") for r in data], {}
    else:
        ids, captions, meta = _table_rows(uri, id_column, caption_column, "predictions", best_rank=True)
    model = meta.get(schemas.META_MODEL)
    out = Predictions([], [], model=model.rsplit("@", 1)[0] if model else None)
    kept: dict[str, str] = {}
    for i, c in zip(ids, captions, strict=True):
        if i in kept:
            out.duplicates.append(i)
        else:
            kept[i] = c
    out.ids, out.captions = list(kept), list(kept.values())
    return out


# --- references -----------------------------------------------------------------------------------------
def read_references(uri: str, *, id_column: str | None = None, caption_column: str = schemas.CAPTION
                    ) -> References:
    out = References({})
    if uri.endswith(".json"):
        data = _load_json(uri, "references")
        if isinstance(data, dict) and "annotations" in data:  # COCO captions annotations
            for a in data["annotations"]:
                out.add(_id_str(a["image_id"]), str(a.get("caption") or ""))
            for img in data.get("images", []):
                out.refs.setdefault(_id_str(img["id"]), [])  # an image without captions is still an image
                if img.get("file_name"):
                    out.aliases[img["file_name"]] = _id_str(img["id"])
        elif isinstance(data, dict):
            for k, v in data.items():
                out.refs.setdefault(str(k), [])
                for c in [v] if isinstance(v, str) else v:
                    out.add(str(k), str(c))
        else:
            raise ValueError(f"references {uri!r}: expected a COCO annotations JSON (with 'annotations') or "
                             "an object {id: [captions]}")
        return out
    ids, captions, _ = _table_rows(uri, id_column, caption_column, "references")
    for i, c in zip(ids, captions, strict=True):
        out.add(i, c)
    return out


# --- id matching ----------------------------------------------------------------------------------------
def stem(key: str) -> str:
    base = posixpath.basename(key.rstrip("/"))
    return base.rsplit(".", 1)[0] if "." in base[1:] else base


def number(key: str) -> str:
    m = re.search(r"(\d+)$", stem(key))
    return str(int(m.group(1))) if m else key


ID_MODES: dict[str, Callable[[str], str]] = {"key": lambda k: k, "stem": stem, "number": number}


@dataclass
class Matched:
    mode: str
    ids: list[str]                 # evaluated ids (the references' ids), in prediction order
    captions: list[str]
    refs: list[list[str]]
    missing_references: list[str]  # prediction ids with no reference
    missing_predictions: list[str]  # reference ids with no prediction
    lookup: dict[str, str] = field(repr=False, default_factory=dict)  # normalised id / file name -> reference id
    empty_references: list[str] = field(default_factory=list)  # reference ids without a caption: not scored

    def resolve(self, key: str) -> str | None:
        """The reference id that ``key`` (a prediction or image key) stands for under this match mode."""
        return self.lookup.get(ID_MODES[self.mode](key))


def match_ids(preds: Predictions, refs: References, mode: str = "auto") -> Matched:
    """Pair predictions with references. ``auto``: the first of key, stem, number that pairs any id."""
    if mode != "auto" and mode not in ID_MODES:
        raise ValueError(f"id match must be auto or one of {sorted(ID_MODES)}, got {mode!r}")
    for name in ([mode] if mode != "auto" else list(ID_MODES)):
        m = _match(preds, refs, name)
        if m.ids:
            return m
    raise ValueError(f"no prediction id matches a reference id (mode {mode}; e.g. prediction "
                     f"{preds.ids[:2]} vs reference {list(refs.refs)[:2]}); use --id-match key|stem|number "
                     "or name the id columns")


def _reference_lookup(refs: References, norm: Callable[[str], str]) -> dict[str, list[str]]:
    """Normalised id -> the distinct reference ids (and COCO file names' ids) that give it."""
    out: dict[str, list[str]] = {}
    for name, rid in [(rid, rid) for rid in refs.refs] + list(refs.aliases.items()):
        if rid in refs.refs and rid not in out.setdefault(norm(name), []):
            out[norm(name)].append(rid)
    return out


def _check_unambiguous(preds: Predictions, by_norm: dict[str, list[str]], mode: str) -> None:
    """Two references, or two predictions, that meet one id of the other side under ``mode``: a clear error."""
    pred_by_norm: dict[str, list[str]] = {}
    for pid in preds.ids:
        pred_by_norm.setdefault(ID_MODES[mode](pid), []).append(pid)
    for n, pids in pred_by_norm.items():
        rids = by_norm.get(n, [])
        if rids and (len(rids) > 1 or len(pids) > 1):
            raise ValueError(f"id match {mode}: prediction(s) {pids[:3]} and reference(s) {rids[:3]} all match as "
                             f"{n!r}, so which image is which is ambiguous; use --id-match key (equal ids) or give "
                             "ids that stay unique under this match")


def _match(preds: Predictions, refs: References, mode: str) -> Matched:
    norm = ID_MODES[mode]
    candidates = _reference_lookup(refs, norm)
    if mode != "key":
        _check_unambiguous(preds, candidates, mode)
    by_norm = {n: rids[0] for n, rids in candidates.items()}
    ids, captions, ref_lists, missing, used = [], [], [], [], set()
    for pid, cap in zip(preds.ids, preds.captions, strict=True):
        rid = by_norm.get(norm(pid))
        if rid is None or rid in used:  # no reference, or a second prediction for the same image (key mode)
            missing.append(pid)
            continue
        used.add(rid)
        if refs.refs[rid]:  # a reference without a caption is not scored (named in empty_references)
            ids.append(rid)
            captions.append(cap)
            ref_lists.append(refs.refs[rid])
    empty = [r for r, rs in refs.refs.items() if not rs]
    unpredicted = [r for r, rs in refs.refs.items() if rs and r not in used]
    return Matched(mode, ids, captions, ref_lists, missing, unpredicted, by_norm, empty)


def plan(uri: str, encoder_cfg: Any) -> list[sources.Part]:
    """The input's parts, with embedding tables checked against the CLIP (job-level ValueError)."""
    parts = sources.plan_parts(uri, sources.SourceConfig())
    dim = embedding_dim(encoder_cfg)
    for p in parts:
        if p.kind != "embeddings":
            continue
        if p.dim != dim:
            raise ValueError(f"image embeddings {p.files[0].uri} have D={p.dim} but CLIP "
                             f"{encoder_cfg.model_name!r} gives D={dim}")
        if p.clip_model and p.clip_model != encoder_cfg.model_name:
            raise ValueError(f"image embeddings {p.files[0].uri} were made with CLIP {p.clip_model!r}, "
                             f"not {encoder_cfg.model_name!r} (the captioner's CLIP)")
    return parts


def _records(parts: list[sources.Part], wanted: set[str], resolve: Callable[[str], str | None]
             ) -> Iterator[tuple[str, sources.Record]]:
    cfg = sources.SourceConfig()
    for part in parts:
        for rec in sources.read_part(part, cfg):
            rid = resolve(rec.key)
            if rid is not None and rid in wanted:
                yield rid, rec


def image_embeddings(parts: list[sources.Part], wanted: set[str], resolve: Callable[[str], str | None],
                     encoder: Any | None, batch_size: int = 64) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Embeddings of the ``wanted`` ids and the problems of those that have none (error text per id).
    ``encoder`` (a loaded ``ClipEncoder``) is needed only when the input holds images."""
    out: dict[str, np.ndarray] = {}
    problems: dict[str, str] = {}
    ids: list[str] = []
    pixels: list[np.ndarray] = []

    def flush() -> None:
        if ids:
            emb = encoder.encode_pixels(np.stack(pixels))
            out.update(zip(ids, emb, strict=True))
            ids.clear()
            pixels.clear()

    for rid, rec in _records(parts, wanted, resolve):
        if rid in out or rid in ids:
            continue  # the first image of an id counts (another part may hold a copy)
        if rec.error is not None:
            problems[rid] = rec.error
        elif rec.embedding is not None:
            out[rid] = np.asarray(rec.embedding, dtype=np.float32)
        else:
            try:
                image = decode_image(rec.data or b"")
            except ImageDecodeError as exc:
                problems[rid] = str(exc)
                continue
            ids.append(rid)
            pixels.append(encoder.resize(image))
            if len(ids) >= batch_size:
                flush()
    flush()
    for rid in out:
        problems.pop(rid, None)
    for rid in wanted - set(out) - set(problems):
        problems[rid] = "no image with this id"
    return out, problems


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
    emb, problems = image_embeddings(parts, set(m.ids), m.resolve, encoder)
    have = [i for i, rid in enumerate(m.ids) if rid in emb]
    clip, ref_clip = np.full(len(m.ids), np.nan), np.full(len(m.ids), np.nan)
    corpus: dict[str, float] = {}
    if have:
        s = ClipScorer(encoder).score(np.stack([emb[m.ids[i]] for i in have]), [m.captions[i] for i in have],
                                      [m.refs[i] for i in have])
        clip[have], ref_clip[have] = s.clip_score, s.ref_clip_score
        corpus = {schemas.CLIP_SCORE: float(np.mean(s.clip_score)), "ref_clip_score": float(np.mean(s.ref_clip_score)),
                  "clip_n": float(len(have))}
    return {schemas.CLIP_SCORE: clip.tolist(), "ref_clip_score": ref_clip.tolist()}, problems, corpus


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
        parts = plan(cfg.images, enc_cfg)
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


def format_table(summary: dict[str, Any]) -> str:
    """The summary as the printed table: the metrics present, x100 like COCO tables, then what was missing."""
    ms = summary["metrics"]
    lines = [f"evaluated {summary['evaluated']} images (id match: {summary['id_match']}); scores x100"]
    lines += [f"  {label:<14s}{ms[key] * scale:>8.2f}" for label, key, scale in ROWS if key in ms]
    for kind in ("missing_references", "missing_predictions", "duplicate_predictions", "empty_references",
                 "missing_images"):
        if summary[kind]["count"]:
            lines.append(f"  {kind.replace('_', ' ')}: {summary[kind]['count']} (e.g. {summary[kind]['first'][:3]})")
    lines += [f"  note: {k}: {v}" for k, v in summary["notes"].items()]
    return "\n".join(lines)

"""Reading what ``clipcap evaluate`` compares: predictions, references, and matching their ids."""

from __future__ import annotations

import io
import json
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq

from clipcap_core import uris
from pipelines.io import schemas, storage

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
    names = table.column_names
    if wanted:
        if wanted not in names:
            raise ValueError(f"{where}: no id column {wanted!r}; columns are {names}")
        return wanted
    for name in ID_COLUMNS:
        if name in names:
            return name
    raise ValueError(f"{where}: no id column (looked for {list(ID_COLUMNS)}); columns are {names}")


def _table_rows(uri: str, id_column: str | None, caption_column: str, where: str,
                keep: Callable[[pa.Table], pa.Table] = lambda t: t) -> tuple[list[str], list[str], dict[str, str]]:
    ids: list[str] = []
    captions: list[str] = []
    meta: dict[str, str] = {}
    wanted = {caption_column, schemas.RANK, *ID_COLUMNS, *([id_column] if id_column else [])}
    for f in _files(uri):
        table = _read_table(f, wanted)
        meta = meta or schemas.read_metadata(table.schema)
        if caption_column not in table.column_names:
            raise ValueError(f"{where} {f!r}: no caption column {caption_column!r}; columns are {table.column_names}")
        table = keep(table)
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
def _best_rank(table: pa.Table) -> pa.Table:
    if schemas.RANK in table.column_names:
        return table.filter(pa.compute.equal(table.column(schemas.RANK), 0))
    return table


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
        ids, captions, meta = _table_rows(uri, id_column, caption_column, "predictions", _best_rank)
    model = meta.get(schemas.META_MODEL)
    out = Predictions([], [], model=model.rsplit("@", 1)[0] if model else None)
    seen: set[str] = set()
    for i, c in zip(ids, captions, strict=True):
        if i in seen:
            out.duplicates.append(i)
            continue
        seen.add(i)
        out.ids.append(i)
        out.captions.append(c)
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

"""The output side of bulk captioning: the output layout and the per-part committer (``PartCommitter``)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from clipcap_core import uris
from clipcap_core.configs import to_dict
from clipcap_core.decoding import DecodeConfig
from pipelines.caption.stages import TIMING_COLUMNS
from pipelines.committer import UnitCommitter, UnitTable
from pipelines.io import schemas, sources, storage

log = logging.getLogger(__name__)

TABLE_DIR, META_DIR = "captions", "_meta"


def table_uri(output: str) -> str:
    return storage.join(output, TABLE_DIR)


def meta_uri(output: str, *parts: str) -> str:
    return storage.join(output, META_DIR, *parts)


def layout(output: str) -> UnitTable:
    return UnitTable(table_uri(output), meta_uri(output))


def resolve_table(uri: str) -> tuple[str, str | None]:
    """(caption table folder, run output root or None) of a run output, its ``captions/`` or any table."""
    if storage.list_files(table_uri(uri), ".parquet"):
        return table_uri(uri), uri
    parent = uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else ""
    if uri.rstrip("/").endswith("/" + TABLE_DIR) and parent and uris.exists(meta_uri(parent, "run.json")):
        return uri, parent
    return uri, None


def run_record(uri: str) -> dict[str, Any]:
    """The ``_meta/run.json`` of the run that wrote the caption table at ``uri`` ({} if none)."""
    _, root = resolve_table(uri)
    return (storage.read_json(meta_uri(root, "run.json")) or {}) if root else {}


def top_captions(output: str) -> list[tuple[str, str]]:
    """(key, caption) of every committed image's rank-0 caption, sorted by key (``caption --show``)."""
    rows: list[tuple[str, str]] = []
    for uri in storage.list_files(table_uri(output), ".parquet"):
        fs, path = uris.filesystem(uri)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            ranked = schemas.RANK in pf.schema_arrow.names
            table = pf.read(columns=[schemas.KEY, schemas.CAPTION] + ([schemas.RANK] if ranked else []))
        if ranked:
            table = table.filter(pa.compute.equal(table.column(schemas.RANK), 0))
        rows += zip(table.column(schemas.KEY).to_pylist(), table.column(schemas.CAPTION).to_pylist(), strict=True)
    return sorted(rows)


def _is_our_part(fs: Any, path: str) -> bool:
    """A ``part-<id>.parquet`` whose footer says ``clipcap.part = <id>``: a file this stage wrote."""
    name = path.rsplit("/", 1)[-1]
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return False
    try:
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
    except Exception:  # noqa: BLE001 - unreadable: not provably ours, keep it
        return False
    return meta.get(schemas.META_PART.encode()) == name[len("part-"):-len(".parquet")].encode()


def _clear_output(output: str, previous: dict | None = None) -> None:
    """``--overwrite``: remove the part / error files and markers our runs wrote, nothing else."""
    if previous is None:
        return
    fs, units = uris.filesystem(output)[0], layout(output)
    for uri in storage.list_files(units.table, ".parquet") + storage.list_files(units.dir("errors"),
                                                                                ".parquet"):
        if _is_our_part(fs, path := uris.filesystem(uri)[1]):
            fs.rm(path)
    for uri in storage.list_files(units.dir("empty"), ".json"):
        fs.rm(uris.filesystem(uri)[1])


# --- committing parts -------------------------------------------------------------------------------------------
class PartCommitter(UnitCommitter):
    """Caption's committer: a part with a ``sources.UNIT_STAGE`` row is unread (not committed, retried); sums
    the stages' timing columns."""

    def __init__(self, output: str, model_id: str, decoding: DecodeConfig, rerank: str = "none"):
        super().__init__(unit="part_id", index="index", total="total", noun="part")
        self.output, self.model_id = output, model_id
        self.meta = {schemas.META_MODEL: model_id, schemas.META_DECODING: json.dumps(to_dict(decoding)),
                     schemas.META_SCHEMA_VERSION: schemas.SCHEMA_VERSION, schemas.META_RERANK: rerank}
        self.stage_seconds: dict[str, float] = {}
        self.stage_cpu_seconds: dict[str, float] = {}
        self.empty_captions = 0  # captioned images whose first caption is empty (a broken or untrained model)

    def add(self, block: pa.Table) -> list[tuple[str, int, int, int]]:
        """Take a block of final-stage rows; return (part id, images, captions, errors) of parts committed."""
        for name in TIMING_COLUMNS:
            if name in block.column_names:
                kind, stage = name.split("_", 1)
                bucket = self.stage_seconds if kind == "t" else self.stage_cpu_seconds
                bucket[stage] = bucket.get(stage, 0.0) + float(pa.compute.sum(block.column(name)).as_py() or 0.0)
        return super().add(block)

    def unread(self, part_id: str, rows: pa.Table | None) -> str | None:
        stages = [] if rows is None else rows.column("stage").to_pylist()
        if rows is None or sources.UNIT_STAGE not in stages:
            return None
        row = rows.slice(stages.index(sources.UNIT_STAGE), 1).to_pylist()[0]
        return f"{row['source']}: {row['error']}"

    def commit(self, part_id: str, rows: pa.Table | None) -> tuple[str, int, int, int]:
        """Errors table, then the caption part file or the empty marker (last: "done")."""
        members = rows.to_pylist() if rows is not None else []
        now = datetime.now(timezone.utc)
        caps, errs = [], []
        for row in sorted(members, key=lambda r: (r["key"], r["index"])):
            if row["error"] is None and row.get("captions"):
                clip = row.get("clip_scores") or [None] * len(row["captions"])
                ranked = enumerate(zip(row["captions"], row["scores"], strict=True))
                caps += [{schemas.KEY: row["key"], schemas.CAPTION: text, schemas.SCORE: score,
                          schemas.MODEL: self.model_id, schemas.CREATED_AT: now, schemas.RANK: rank,
                          schemas.CLIP_SCORE: clip[rank]} for rank, (text, score) in ranked]
            else:
                errs.append({schemas.KEY: row["key"], schemas.SOURCE: row["source"],
                             schemas.STAGE: row["stage"] or "caption",
                             schemas.ERROR: row["error"] or "no caption produced"})
        meta = dict(self.meta, **{schemas.META_PART: part_id})
        errors = pa.Table.from_pylist(errs, schemas.with_metadata(schemas.ERRORS_SCHEMA, meta))
        captions = pa.Table.from_pylist(caps, schemas.with_metadata(schemas.CAPTIONS_SCORED_SCHEMA, meta))
        layout(self.output).write(part_id, captions, errors, {"part": part_id, "errors": errors.num_rows})
        self.empty_captions += sum(1 for r in members if r["error"] is None and r.get("captions")
                                   and not str(r["captions"][0] or "").strip())
        return part_id, len(members), len(members) - errors.num_rows, captions.num_rows

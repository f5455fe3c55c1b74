"""Caption corpora for ``clipcap embed-text``: input files -> deterministic parts of (key, caption, error) rows.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field

import fsspec
import pandas as pd
import pyarrow.parquet as pq

from clipcap_core import uris
from pipelines.embed.stages import MAX_SHARD_BYTES, read_shard, shard_name
from pipelines.io import schemas, storage
from pipelines.io.delimited import read_delimited

FORMATS = ("text", "csv", "tsv", "jsonl", "parquet", "img2dataset")
_EXTENSIONS = {"txt": "text", "text": "text", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl",
               "parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class TextPart:
    part_id: str
    source: str  # file URI the rows come from
    keys: list[str] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "" = a good row

    def __len__(self) -> int:
        return len(self.keys)


def file_format(uri: str) -> str | None:
    """``text`` / ``csv`` / ... from a file name (compression suffixes ignored), None when unknown."""
    name = posixpath.basename(uri).lower()
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    return _EXTENSIONS.get(name.rsplit(".", 1)[-1]) if "." in name else None


def list_inputs(uri: str, fmt: str = "auto") -> list[tuple[str, str]]:
    """(file URI, format) of every input file; a folder with ``.tar`` shards is an img2dataset output."""
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"input format must be one of {['auto', *FORMATS]}, got {fmt!r}")
    fs, path = uris.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"caption input {uri!r} does not exist")
    if not fs.isdir(path):
        found = fmt if fmt != "auto" else file_format(uri)
        if found is None or found == "img2dataset":
            raise ValueError(f"cannot tell the format of {uri!r}; set --input-format to one of {list(FORMATS)}")
        return [(uri, found)]
    shards = storage.list_files(uri, ".tar")
    if fmt == "img2dataset" or (fmt == "auto" and shards):
        if not shards:
            raise FileNotFoundError(f"no img2dataset shards (*.tar) under {uri!r}")
        return [(s, "img2dataset") for s in shards]
    files = [(f, fmt if fmt != "auto" else file_format(f)) for f in storage.list_files(uri, "")]
    files = [(f, k) for f, k in files if k is not None and not posixpath.basename(f).startswith(("_", "."))]
    if not files:
        raise FileNotFoundError(f"no caption files ({', '.join(sorted(_EXTENSIONS))}) under {uri!r}")
    return files


def _stem(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name.rsplit(".", 1)[0]) or "captions"


def _check(caption: str | None, max_chars: int) -> str:
    if caption is None or not caption.strip():
        return "empty caption"
    if len(caption) > max_chars:
        return f"caption longer than {max_chars} characters ({len(caption)})"
    return ""


def read_text_lines(uri: str, max_chars: int) -> tuple[list[str | None], list[str]]:
    """Captions and per-row errors of a one-caption-per-line file (each line decoded on its own)."""
    with fsspec.open(uri, "rb", compression="infer") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the file's final newline ends the last line; it does not start another
    captions: list[str | None] = []
    errors = []
    for raw in lines:
        try:
            text: str | None = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            captions.append(None)
            errors.append(f"line is not UTF-8: {exc.reason} at byte {exc.start}")
            continue
        captions.append(text)
        errors.append(_check(text, max_chars))
    return captions, errors


def read_table_file(uri: str, fmt: str, caption_col: str, key_col: str | None) -> pd.DataFrame:
    """A csv / tsv / jsonl / parquet file as string columns ``caption`` (+ ``key``); checks the columns."""
    if fmt in ("csv", "tsv"):
        df = read_delimited(uri, "\t" if fmt == "tsv" else ",", what="caption file")  # names file and line
    else:
        try:
            df = pd.read_parquet(uri) if fmt == "parquet" else pd.read_json(uri, lines=True, dtype=False)
        except ValueError as exc:
            raise ValueError(f"cannot read {uri} as {fmt}: {exc}") from exc
    wanted = [caption_col] + ([key_col] if key_col else [])
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise ValueError(f"{uri} has no column(s) {missing}; it has {list(df.columns)} (set --caption-col / "
                         "--key-col)")
    out = pd.DataFrame({schemas.CAPTION: df[caption_col].astype("string")})
    if key_col:
        out[schemas.KEY] = df[key_col].astype("string")
    return out


def read_img2dataset_shard(uri: str, max_chars: int) -> TextPart:
    """Keys and captions of one shard: from its ``.parquet`` sibling, else from the tar's ``.txt`` members."""
    meta = uri.removesuffix(".tar") + ".parquet"
    part = TextPart(part_id=shard_name(uri), source=uri)
    if uris.exists(meta):
        fs, path = uris.filesystem(meta)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        if schemas.CAPTION not in table.column_names or schemas.KEY not in table.column_names:
            raise ValueError(f"img2dataset shard metadata {meta} has no key / caption column (has "
                             f"{table.column_names}); download with a caption column")
        rows = ((k, c, "") for k, c in zip(table.column(schemas.KEY).to_pylist(), table.column(schemas.CAPTION).to_pylist(),
                                            strict=True))
    else:
        fs, path = uris.filesystem(uri)
        with fs.open(path, "rb") as f:
            data = f.read(MAX_SHARD_BYTES + 1)
        if len(data) > MAX_SHARD_BYTES:
            raise ValueError(f"shard {uri} is larger than {MAX_SHARD_BYTES} bytes")
        rows = ((posixpath.basename(s.key), s.files["txt"].decode("utf-8", "replace") if "txt" in s.files
                 else None, s.refused) for s in read_shard(data))
    for key, caption, refused in rows:
        part.keys.append(str(key))
        part.captions.append(caption)
        part.errors.append(refused or _check(caption, max_chars))
    return part


def read_file_parts(uri: str, fmt: str, *, caption_col: str, key_col: str | None, part_size: int,
                    max_chars: int) -> list[TextPart]:
    """The parts of one caption file: ``part_size`` rows each, ids ``<stem>-<00000>``."""
    stem = _stem(uri)
    if fmt == "text":
        captions, errors = read_text_lines(uri, max_chars)
        keys = [f"{stem}-{i:08d}" for i in range(len(captions))]
    else:
        df = read_table_file(uri, fmt, caption_col, key_col)
        captions = [None if pd.isna(c) else str(c) for c in df[schemas.CAPTION]]
        errors = [_check(c, max_chars) for c in captions]
        keys = ([str(k) if not pd.isna(k) else f"{stem}-{i:08d}" for i, k in enumerate(df[schemas.KEY])] if key_col
                else [f"{stem}-{i:08d}" for i in range(len(captions))])
    parts = []
    for n, start in enumerate(range(0, max(len(keys), 1), part_size)):
        sl = slice(start, start + part_size)
        parts.append(TextPart(f"{stem}-{n:05d}", uri, keys[sl], captions[sl], errors[sl]))
    return parts


def plan_parts(uri: str, fmt: str = "auto", *, caption_col: str = schemas.CAPTION, key_col: str | None = None,
               part_size: int = 10000, max_chars: int = 2000) -> list[TextPart]:
    """Every part of the input, in a deterministic order; part ids must be unique (two files with one stem fail)."""
    parts: list[TextPart] = []
    for file, kind in list_inputs(uri, fmt):
        if kind == "img2dataset":
            parts.append(read_img2dataset_shard(file, max_chars))
        else:
            parts.extend(read_file_parts(file, kind, caption_col=caption_col, key_col=key_col,
                                         part_size=part_size, max_chars=max_chars))
    seen: dict[str, str] = {}
    for p in parts:
        if p.part_id in seen:
            raise ValueError(f"inputs {seen[p.part_id]} and {p.source} give the same part id {p.part_id!r}: "
                             "rename one of the files")
        seen[p.part_id] = p.source
    return parts


def plan_digest(parts: list[TextPart]) -> str:
    """A digest of the plan (part ids, sources, keys and captions): a rerun on changed input is refused."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps([p.part_id, p.source, p.keys, p.captions]).encode())
    return h.hexdigest()[:16]

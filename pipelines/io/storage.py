"""Storage helpers over fsspec: one code path for local paths, ``s3://`` (s3fs), ``gs://`` and ``memory://``.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core.configs import finite_json
from clipcap_core.uris import filesystem
from pipelines.io import schemas
from pipelines.io.urlsafety import redact_text


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return posixpath.join(uri, *[p.strip("/") for p in parts])


def protocol_prefix(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return "" if proto in ("file", "local") else f"{proto}://"


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # HTTP(S) filesystems keep the whole URL as the path: prefixing again gave "http://http://host/...".
    return path if "://" in path else protocol_prefix(fs) + path


def ensure_dir(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create a directory on local-like filesystems only (s3fs's ``makedirs`` would create a bucket)."""
    if protocol_prefix(fs) in ("", "memory://"):
        fs.makedirs(path, exist_ok=True)


def write_file(uri: str, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``uri``, creating its folder on local-like filesystems."""
    fs, path = filesystem(uri)
    ensure_dir(fs, posixpath.dirname(path) or ".")
    with fs.open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def remove(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(uri, storage_options)
    fs.rm(path)


# Columns that may hold URLs from user data: redacted (query strings, credentials) before any write.
REDACTED_COLUMNS = (schemas.URL, schemas.SOURCE, schemas.ERROR)


def redact_table(table: pa.Table) -> pa.Table:
    """``table`` with URLs in its url / source / error string columns redacted (``urlsafety.redact_text``)."""
    for name in REDACTED_COLUMNS:
        if name in table.column_names and pa.types.is_string(table.schema.field(name).type):
            values = [None if v is None else redact_text(v) for v in table.column(name).to_pylist()]
            idx = table.column_names.index(name)
            table = table.set_column(idx, table.schema.field(name), pa.array(values, pa.string()))
    return table


def redact_json(obj: Any) -> Any:
    """``obj`` with every string (keys included) URL-redacted."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {redact_json(k): redact_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_json(v) for v in obj]
    return obj


def atomic_write_table(table: pa.Table, uri: str, storage_options: dict[str, Any] | None = None,
                       compression: str = "zstd", tmp_dir: str | None = None) -> None:
    """Write ``table`` so the final name appears only when complete (URL columns redacted first)."""
    table = redact_table(table)
    fs, path = filesystem(uri, storage_options)
    tmp_parent = filesystem(tmp_dir, storage_options)[1] if tmp_dir else posixpath.dirname(path)
    ensure_dir(fs, posixpath.dirname(path))
    ensure_dir(fs, tmp_parent)
    tmp = posixpath.join(tmp_parent, f"_tmp.{uuid.uuid4().hex}.{posixpath.basename(path)}")
    try:
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression=compression)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def write_json(obj: Any, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write JSON via a temporary name + rename (atomic on local disk, single PUT on S3); URLs redacted."""
    obj = redact_json(json.loads(json.dumps(finite_json(obj), default=str)))
    fs, path = filesystem(uri, storage_options)
    parent = posixpath.dirname(path)
    if parent:
        ensure_dir(fs, parent)
    tmp = posixpath.join(parent, f"_tmp.{uuid.uuid4().hex}.json")
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str, allow_nan=False)
    fs.mv(tmp, path)


def read_json(uri: str, storage_options: dict[str, Any] | None = None, default: Any = None) -> Any:
    """The JSON document at ``uri`` or ``default``; one whole read (a ranged read fails on a rewrite)."""
    fs, path = filesystem(uri, storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return default


def list_files(uri: str, suffix: str, storage_options: dict[str, Any] | None = None,
               recursive: bool = False) -> list[str]:
    """Sorted full URIs of the files under ``uri`` ending in ``suffix`` (no ``_tmp.*``), never cached."""
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    names = fs.find(path) if recursive else fs.ls(path, detail=False)
    names = [p for p in names if p.endswith(suffix) and not posixpath.basename(p).startswith("_tmp.")]
    return sorted(full_uri(fs, p) for p in names)


def remove_temporaries(*uris: str) -> int:
    """Delete the ``_tmp.*`` files a killed writer left under each folder (one run per output)."""
    n = 0
    for uri in uris:
        fs, path = filesystem(uri)
        if fs.exists(path):
            for name in fs.ls(path, detail=False):
                if posixpath.basename(name.rstrip("/")).startswith("_tmp."):
                    fs.rm(name)
                    n += 1
    return n


def check_writable(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail before any work if ``uri`` cannot be written (missing bucket, no credentials, bad scheme)."""
    try:
        fs, path = filesystem(uri, storage_options)
        probe = posixpath.join(path, f"_tmp.write-probe.{uuid.uuid4().hex}")
        ensure_dir(fs, path)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as exc:  # noqa: BLE001 - turn any backend error into one clear message
        raise OSError(f"output URI {uri!r} is not writable: {type(exc).__name__}: {exc}") from exc

"""Signed URLs out of img2dataset's shards: img2dataset stores each sample's URL as fetched (query string with
``X-Amz-Signature`` / ``X-Amz-Credential`` included) in ``<shard>.parquet`` and in every ``<key>.json`` of
``<shard>.tar``, with no option to leave it out. After a download, each shard whose URLs carry a query string,
fragment or credentials is rewritten with ``urlsafety.redact_url`` URLs (written to a temporary name, then
renamed over the original). Shards whose URLs are all plain are not touched (no cost for CC3M-like lists), and
a rerun finds nothing left to do.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
import urllib.parse
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import uris
from pipelines.io import schemas, storage
from pipelines.io.urlsafety import redact_url

log = logging.getLogger(__name__)


def _secret(url: str | None) -> bool:
    if not url:
        return False
    parts = urllib.parse.urlsplit(url)
    return bool(parts.fragment or "@" in parts.netloc
                or (parts.query and not parts.query.startswith("redacted-")))


def _replace(fs, path: str, data: bytes) -> None:
    tmp = posixpath.join(posixpath.dirname(path), f"_tmp.{uuid.uuid4().hex}.{posixpath.basename(path)}")
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def _redacted_tar(raw: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            if data is not None and member.name.endswith(".json"):
                meta = json.loads(data)
                if isinstance(meta, dict) and isinstance(meta.get(schemas.URL), str):
                    meta[schemas.URL] = redact_url(meta[schemas.URL])
                data = json.dumps(meta).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def redact_shard(parquet_uri: str) -> bool:
    """Redact the URLs of one shard (``<id>.parquet`` + ``<id>.tar``); True if it had secrets."""
    fs, path = uris.filesystem(parquet_uri)
    with fs.open(path, "rb") as f:
        if schemas.URL not in pq.read_schema(f).names:
            return False
    with fs.open(path, "rb") as f:
        if not any(_secret(u) for u in pq.read_table(f, columns=[schemas.URL]).column(schemas.URL).to_pylist()):
            return False
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    tar_path = path[: -len(".parquet")] + ".tar"
    if fs.exists(tar_path):  # the tar first: a crash in between leaves the parquet to flag the shard again
        with fs.open(tar_path, "rb") as f:
            _replace(fs, tar_path, _redacted_tar(f.read()))
    urls = pa.array([None if u is None else redact_url(u) for u in table.column(schemas.URL).to_pylist()], pa.string())
    table = table.set_column(table.column_names.index(schemas.URL), schemas.URL, urls)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _replace(fs, path, buf.getvalue())
    return True


def redact_shards(output: str) -> int:
    """Redact every shard under ``output`` that still holds secret-bearing URLs; returns how many."""
    shards = [u for u in storage.list_files(output, ".parquet") if posixpath.basename(u)[:1].isdigit()]
    done = sum(redact_shard(u) for u in shards)
    if done:
        log.info("removed URL query strings / credentials from %d shard(s) at %s", done, output)
    return done

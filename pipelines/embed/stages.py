"""The per-row work of the embed stage: read + decode img2dataset shards into row blocks for CLIP."""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from clipcap_core import imaging
from clipcap_core.imaging import ImageResizer, PreprocessSpec
from pipelines import rows
from pipelines.io.sources import SourceConfig, tar_member_problem

# Columns flowing from the decode tasks to the encoder and on to the driver (pixels, error, caption and the
# CLIP actor's vectors are the row format's, ``pipelines.rows``).
SHARD, INDEX, TOTAL, KEY, URL, SOURCE, UNREAD = ("shard", "index", "shard_total", "key", "url", "source",
                                                 "shard_unread")
CAPTION, ERROR, PIXELS = rows.CAPTION, rows.ERROR, rows.PIXELS
# UNREAD marks the one row of a shard that could not be read at all: the shard is then not committed (a
# rerun retries it), because an outage or a half-copied file must not become "done, 0 samples".
TRUNCATED = rows.TRUNCATED  # embed-text: the caption was longer than the CLIP context (cut to it)


MAX_SHARD_BYTES = 4 << 30  # a shard is read whole: img2dataset's are ~10k samples, a few hundred MB


@dataclass
class Sample:
    """One webdataset sample: its files by extension; ``refused``: why one of its members was not read."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    refused: str = ""


@dataclass
class DecodedRow:
    key: str
    caption: str | None
    url: str | None
    source: str
    pixels: np.ndarray | None
    error: str = ""
    unread: bool = False  # the whole shard could not be read (not a per-sample problem)


def shard_name(uri: str) -> str:
    """``.../00012.tar`` -> ``00012`` (also the ``part-<shard>.parquet`` name of its output)."""
    return posixpath.basename(uri).removesuffix(".tar")


def read_shard(data: bytes, cfg: SourceConfig | None = None) -> list[Sample]:
    """Tar members grouped into samples by key, in archive order; a member refused by
    ``sources.tar_member_problem`` is not read and marks its sample ``refused``."""
    cfg = cfg or SourceConfig()
    samples: dict[str, Sample] = {}
    seen: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isdir():
                continue
            base = posixpath.basename(member.name)
            if base.startswith(".") or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = posixpath.join(posixpath.dirname(member.name), stem)
            sample = samples.setdefault(key, Sample(key))
            why = tar_member_problem(member, seen, cfg)
            if why is not None:
                sample.refused = sample.refused or f"archive member {member.name[:200]!r} refused: {why}"
                continue
            f = tar.extractfile(member)
            sample.files[ext.lower()] = f.read() if f else b""
        end = tar.offset
    # tarfile takes a file cut between two members for a complete archive; every tar writer ends an archive
    # with zero blocks, so their absence means a truncated (half-copied / half-uploaded) shard.
    tail = data[end:end + tarfile.BLOCKSIZE]
    if len(tail) < tarfile.BLOCKSIZE or any(tail):
        raise tarfile.ReadError(f"truncated archive: no end-of-archive marker after {end} of {len(data)} bytes")
    return list(samples.values())


def decode_sample(sample: Sample, resizer: ImageResizer, shard: str) -> DecodedRow:
    """Caption, url and resized uint8 pixels (H, W, 3) of one sample, or the same row with ``error`` set."""
    try:
        meta: dict[str, Any] = json.loads(sample.files.get("json", b"{}"))
    except ValueError:
        meta = {}
    caption = sample.files["txt"].decode("utf-8", "replace") if "txt" in sample.files else meta.get("caption")
    key = str(meta.get("key") or posixpath.basename(sample.key))
    image_ext = next((e for e in sample.files if imaging.is_image_name("x." + e)), None)
    source = f"{shard}.tar/{sample.key}" + (f".{image_ext}" if image_ext else "")
    row = DecodedRow(key=key, caption=caption, url=meta.get("url"), source=source, pixels=None)
    if sample.refused or image_ext is None:
        row.error = sample.refused or f"no image file in sample (has {sorted(sample.files)})"
        return row
    try:
        row.pixels = resizer(imaging.decode_image(sample.files[image_ext]))
    except Exception as exc:  # noqa: BLE001 - any decode failure of one sample is an error row
        row.error = f"{type(exc).__name__}: {exc}"
    return row


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _block(decoded: list[DecodedRow], shard: str, start: int, total: int) -> pa.Table:
    n = len(decoded)
    return pa.table({
        SHARD: pa.array([shard] * n, pa.string()), INDEX: pa.array(range(start, start + n), pa.int64()),
        TOTAL: pa.array([total] * n, pa.int64()), KEY: pa.array([r.key for r in decoded], pa.string()),
        CAPTION: pa.array([_text(r.caption) for r in decoded], pa.string()),
        URL: pa.array([_text(r.url) for r in decoded], pa.string()),
        SOURCE: pa.array([r.source for r in decoded], pa.string()),
        ERROR: pa.array([r.error for r in decoded], pa.string()),
        PIXELS: pa.array([r.pixels.tobytes() if r.pixels is not None else b"" for r in decoded], pa.binary()),
        UNREAD: pa.array([r.unread for r in decoded], pa.bool_()),
    })


def iter_shard_batches(uri: str, resizer: ImageResizer, batch_rows: int) -> Iterator[pa.Table]:
    """Decode one shard into blocks of ``batch_rows`` rows (an unreadable shard is one ``UNREAD`` row)."""
    shard = shard_name(uri)
    try:
        with fsspec.open(uri, "rb") as f:  # one GET: shards are read whole, up to MAX_SHARD_BYTES
            data = f.read(MAX_SHARD_BYTES + 1)
        if len(data) > MAX_SHARD_BYTES:
            raise OSError(f"shard larger than {MAX_SHARD_BYTES} bytes")
        samples = read_shard(data)
    except (tarfile.TarError, EOFError, OSError) as exc:  # truncated / garbage tar, vanished file, network
        row = DecodedRow(key=shard, caption=None, url=None, source=uri, pixels=None, unread=True,
                         error=f"unreadable shard: {type(exc).__name__}: {exc}")
        yield _block([row], shard, 0, 1)
        return
    for start in range(0, len(samples), batch_rows):
        decoded = [decode_sample(s, resizer, shard) for s in samples[start:start + batch_rows]]
        yield _block(decoded, shard, start, len(samples))


def decode_shards(batch: pa.Table, spec: PreprocessSpec, batch_rows: int) -> Iterator[pa.Table]:
    """Ray Data UDF (decode tasks): a batch of shard URIs -> decoded row blocks."""
    resizer = ImageResizer(spec)
    for uri in batch.column("uri").to_pylist():
        yield from iter_shard_batches(str(uri), resizer, batch_rows)

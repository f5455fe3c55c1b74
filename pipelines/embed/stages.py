"""The per-row work of the embed stage: read + decode img2dataset shards into column batches for CLIP.

Pure cores (no Ray): ``read_shard`` (tar bytes -> samples), ``decode_sample`` (one sample -> pixels or an
error), ``iter_shard_batches`` (a shard -> column batches for the encoder). Ray adapter: ``decode_shards`` (the
function ``map_batches`` runs in decode tasks). The actor pool runs ``pipelines.clip_actor.ClipActor`` (its
numpy adapter reads these columns); the driver puts the rows back into shards with
``pipelines.embed.output.ShardCommitter``. No torch on import: decode tasks import this module.

Every row carries its shard name, its member index in the shard and the shard's total row count, so the driver
knows when a shard is complete and can commit it, whichever actors its rows went through, and keeps a row
that a retried task sent twice once. Rows that failed carry a non-empty ``error`` and zero pixels; the actor
does not encode them. The embed-text stage uses the same columns (without pixels).
"""

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

from clipcap_core import imaging
from clipcap_core.preprocess import ImageResizer, PreprocessSpec
from pipelines.io.sources_base import SourceConfig
from pipelines.io.sources_safety import tar_member_problem

# Columns flowing from the decode tasks to the encoder and on to the driver.
SHARD, INDEX, TOTAL, KEY, CAPTION, URL, SOURCE, ERROR, PIXELS, UNREAD = (
    "shard", "index", "shard_total", "key", "caption", "url", "source", "error", "pixels", "shard_unread")
# UNREAD marks the one row of a shard that could not be read at all: the shard is then not committed (a
# rerun retries it), because an outage or a half-copied file must not become "done, 0 samples".
TRUNCATED = "truncated"  # embed-text: the caption was longer than the CLIP context (cut to it)


MAX_SHARD_BYTES = 4 << 30  # a shard is read whole: img2dataset's are ~10k samples, a few hundred MB


@dataclass
class Sample:
    """One webdataset sample: its key and its files by extension (``jpg``, ``txt``, ``json``...); ``refused``:
    why one of its members was not read (the sample becomes an error row)."""

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
    """Group tar members into samples by key (the member name up to its first dot), in archive order. Members
    go through ``sources_safety.tar_member_problem`` (unsafe paths, links, devices, duplicates, ``max_member_bytes``):
    a refused member is not read and marks its sample ``refused``."""
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
    meta: dict[str, Any] = {}
    if "json" in sample.files:
        try:
            meta = json.loads(sample.files["json"])
        except ValueError:
            meta = {}
    caption = sample.files["txt"].decode("utf-8", "replace") if "txt" in sample.files else meta.get("caption")
    key = str(meta.get("key") or posixpath.basename(sample.key))
    image_ext = next((e for e in sample.files if imaging.is_image_name("x." + e)), None)
    source = f"{shard}.tar/{sample.key}" + (f".{image_ext}" if image_ext else "")
    row = DecodedRow(key=key, caption=caption, url=meta.get("url"), source=source, pixels=None)
    if sample.refused:
        row.error = sample.refused
        return row
    if image_ext is None:
        row.error = f"no image file in sample (has {sorted(sample.files)})"
        return row
    try:
        row.pixels = resizer(imaging.decode_image(sample.files[image_ext]))
    except Exception as exc:  # noqa: BLE001 - any decode failure of one sample is an error row
        row.error = f"{type(exc).__name__}: {exc}"
    return row


def _columns(rows: list[DecodedRow], shard: str, start: int, total: int, shape: tuple[int, int, int]
             ) -> dict[str, np.ndarray]:
    pixels = np.zeros((len(rows), *shape), dtype=np.uint8)
    for i, r in enumerate(rows):
        if r.pixels is not None:
            pixels[i] = r.pixels
    return {
        SHARD: np.array([shard] * len(rows), dtype=object), INDEX: np.arange(start, start + len(rows)),
        TOTAL: np.full(len(rows), total, dtype=np.int64),
        KEY: np.array([r.key for r in rows], dtype=object), CAPTION: np.array([r.caption for r in rows], dtype=object),
        URL: np.array([r.url for r in rows], dtype=object), SOURCE: np.array([r.source for r in rows], dtype=object),
        ERROR: np.array([r.error for r in rows], dtype=object), PIXELS: pixels,
        UNREAD: np.array([r.unread for r in rows], dtype=bool),
    }


def iter_shard_batches(uri: str, resizer: ImageResizer, batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Decode one shard into column batches of ``batch_rows`` rows (an unreadable shard is one ``UNREAD`` row)."""
    shard = shard_name(uri)
    size = resizer.spec.size
    shape = (size, size, 3) if isinstance(size, int) else (size[0], size[1], 3)
    try:
        with fsspec.open(uri, "rb") as f:  # one GET: shards are read whole, up to MAX_SHARD_BYTES
            data = f.read(MAX_SHARD_BYTES + 1)
        if len(data) > MAX_SHARD_BYTES:
            raise OSError(f"shard larger than {MAX_SHARD_BYTES} bytes")
        samples = read_shard(data)
    except (tarfile.TarError, EOFError, OSError) as exc:  # truncated / garbage tar, vanished file, network
        row = DecodedRow(key=shard, caption=None, url=None, source=uri, pixels=None, unread=True,
                         error=f"unreadable shard: {type(exc).__name__}: {exc}")
        yield _columns([row], shard, 0, 1, shape)
        return
    for start in range(0, len(samples), batch_rows):
        rows = [decode_sample(s, resizer, shard) for s in samples[start:start + batch_rows]]
        yield _columns(rows, shard, start, len(samples), shape)


def decode_shards(batch: dict[str, np.ndarray], spec: PreprocessSpec, batch_rows: int
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF (decode tasks): a batch of shard URIs -> decoded column batches."""
    resizer = ImageResizer(spec)
    for uri in batch["uri"]:
        yield from iter_shard_batches(str(uri), resizer, batch_rows)

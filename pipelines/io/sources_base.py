"""The types every input reader shares (``pipelines.io.sources`` plans and reads with them): ``SourceConfig``,
``InputFile``, ``Part``, ``Record``, the ``Reader`` protocol, part ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import numpy as np

from clipcap_core import imaging
from pipelines.io import schemas

Format = Literal["auto", "images", "tar", "zip", "webdataset", "parquet", "embeddings"]


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """How an input is listed, partitioned and read. ``CLI_FLAGS``: the fields that are not ``clipcap caption``
    flags (``pipelines.commands.flags``)."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"max_member_bytes": None, "url_schemes": None,
                                                  "fetch_timeout_s": None, "fetch_threads": None, "read_batch": None}

    format: Format = "auto"  # input format (auto: by file extension)
    part_size: int = 1000  # loose images (or Parquet rows) per output part
    max_member_bytes: int = 64 << 20  # larger files / members / downloads are error rows
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS
    """decompression-bomb limit per image (default: 64 megapixels)"""
    image_column: str | None = None
    """Parquet input: column with the encoded image bytes (default: the first of schemas.IMAGE_BYTES_COLUMNS present)"""
    url_column: str = schemas.URL
    """Parquet input: column with image URLs (fetched when no bytes; default: url)"""
    key_column: str = schemas.KEY
    """Parquet input: column with the row key (default: key, else the row position)"""
    url_schemes: tuple[str, ...] = ("http", "https", "s3", "gs")
    allow_private_urls: bool = False
    """URL inputs: fetch private / loopback / link-local hosts too (refused by default)"""
    allow_object_store_urls: bool = False
    """URL inputs: fetch s3:// / gs:// URLs with this job's credentials (refused by default)"""
    fetch_timeout_s: float = 20.0
    fetch_threads: int = 16
    read_batch: int = 64              # loose files fetched / URLs downloaded per round

    def __post_init__(self) -> None:
        if self.part_size < 1 or self.read_batch < 1 or self.fetch_threads < 1:
            raise ValueError("part_size, read_batch and fetch_threads must be >= 1")


@dataclass(frozen=True)
class InputFile:
    uri: str   # full URI
    rel: str   # path relative to the input root: the key prefix
    size: int


@dataclass(frozen=True)
class Part:
    part_id: str
    kind: str
    files: tuple[InputFile, ...]
    row_groups: tuple[int, ...] = ()  # Parquet parts
    row_offset: int = 0               # Parquet: index of the part's first row in its file
    dim: int = 0                      # embedding tables: D
    clip_model: str = ""              # embedding tables: the CLIP model recorded in the metadata

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Part:
        d = json.loads(text)
        d["files"] = tuple(InputFile(**f) for f in d["files"])
        d["row_groups"] = tuple(d["row_groups"])
        return cls(**d)


# Stage of an error row that means "the part's input could not be read" (unreadable / truncated archive or
# Parquet file, I/O error on a loose file): the part is then not committed, and a rerun retries it.
UNIT_STAGE = "read-part"


@dataclass
class Record:
    key: str
    source: str
    data: bytes | None = None
    url: str | None = None
    embedding: np.ndarray | None = None  # (D,) float32
    error: str | None = None
    stage: str = "read"


class Reader(Protocol):
    name: str

    def plan(self, file: InputFile, cfg: SourceConfig) -> list[Part]: ...

    def read(self, part: Part, cfg: SourceConfig) -> Iterator[Record]: ...


def part_name(rel: str, suffix: str = "") -> str:
    """A file-name-safe, collision-free part id for a file path (readable tail + hash of the full path)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", rel).strip("._")[-80:] or "root"
    return f"{safe}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}{suffix}"


class OneFileReader:
    """``plan`` of the readers whose unit is a whole file: one part per file, named after its path."""

    name = ""

    def plan(self, file: InputFile, cfg: SourceConfig) -> list[Part]:
        return [Part(part_name(file.rel), self.name, (file,))]

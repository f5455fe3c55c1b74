"""Archive readers for bulk captioning: an input URI -> deterministic *parts* -> *records*.

Hidden files and tool bookkeeping (``_meta/``, ``_SUCCESS``, ``_metadata``, ...) are skipped and counted; any
other underscore-prefixed name is input (cameras write ``_DSC0001.JPG``). Auto format by extension: tar (any
compression), zip, Parquet (an ``image_embedding`` column: an embedding table), else a loose image; a ``.tar``
beside an img2dataset sidecar is a webdataset shard and the sidecars are metadata.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from clipcap_core import imaging, uris
from pipelines.io import sources_parquet, storage
from pipelines.io.sources_base import (
    UNIT_STAGE,
    Format,
    InputFile,
    OneFileReader,
    Part,
    Reader,
    Record,
    SourceConfig,
    part_name,
)
from pipelines.io.sources_safety import (
    clean_name,
    member_problem,
    read_loose_file,
    tar_member_problem,
)

log = logging.getLogger(__name__)


# --- listing and planning -------------------------------------------------------------------------------
# Names that are bookkeeping, not input: ours (caption / embed outputs, atomic writes) and Spark's / Parquet's.
BOOKKEEPING_NAMES = frozenset({"_meta", "_errors", "_run.json", "_summary.json", "_SUCCESS", "_metadata",
                               "_common_metadata"})
SHOW_SKIPPED = 10  # skipped paths named in the log line


@dataclass(frozen=True)
class Listing:
    files: list[InputFile]  # sorted by path
    skipped: list[str]      # hidden / bookkeeping paths relative to the input, sorted


def is_skipped_name(name: str) -> bool:
    """True for a hidden name or a bookkeeping name (see the module docstring); other ``_`` names are input."""
    return name.startswith((".", "_tmp.")) or name in BOOKKEEPING_NAMES


def scan_input(uri: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """Every file under ``uri`` (or ``uri`` itself), sorted, with the hidden / bookkeeping paths set apart."""
    try:
        fs, root = uris.filesystem(uri, storage_options)
        if not fs.exists(root):
            raise FileNotFoundError(f"input {uri!r} does not exist")
        if fs.isfile(root):
            info = fs.info(root)
            return Listing([InputFile(storage.full_uri(fs, root), posixpath.basename(root),
                                      int(info.get("size") or 0))], [])
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad scheme, missing bucket, no credentials: one clear error
        raise OSError(f"cannot list input {uri!r}: {type(exc).__name__}: {exc}") from exc
    files, skipped = [], []
    root = root.rstrip("/")
    for path, info in sorted(found.items()):
        rel = posixpath.relpath(path, root)
        if info.get("type") == "directory":
            continue
        if any(is_skipped_name(p) for p in rel.split("/")):
            skipped.append(rel)
            continue
        files.append(InputFile(storage.full_uri(fs, path), rel, int(info.get("size") or 0)))
    return Listing(files, skipped)


def list_input(uri: str, storage_options: dict[str, Any] | None = None) -> list[InputFile]:
    """The input files of ``uri`` (``scan_input``), the skipped ones logged by count and name."""
    listing = scan_input(uri, storage_options)
    log_skipped(uri, listing.skipped)
    return listing.files


def log_skipped(uri: str, skipped: list[str]) -> None:
    if skipped:
        more = f" and {len(skipped) - SHOW_SKIPPED} more" if len(skipped) > SHOW_SKIPPED else ""
        log.info("skipped %d hidden / bookkeeping file(s) under %s: %s%s", len(skipped), uri,
                 ", ".join(skipped[:SHOW_SKIPPED]), more)


# tar archives by name; tarfile's stream mode ("r|*") reads each compression, member by member, unextracted
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")


def _ext_kind(rel: str) -> str:
    low = rel.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(".zip"):
        return "zip"
    if low.endswith(".parquet"):
        return "parquet"
    return "images"


def classify(files: list[InputFile], fmt: Format) -> dict[str, list[InputFile]]:
    """Group files by reader name (see the module docstring for the rules)."""
    rels = {f.rel for f in files}
    shard_meta: dict[str, set[str]] = {}  # img2dataset shard .tar -> its sidecar files present
    for f in files:
        if f.rel.endswith(".tar"):
            shard_meta[f.rel] = {f.rel[:-4] + ".parquet", f.rel[:-4] + "_stats.json"} & rels
    sidecars = set().union(*shard_meta.values()) if fmt in ("auto", "webdataset") else set()
    groups: dict[str, list[InputFile]] = {}
    for f in files:
        if f.rel in sidecars:
            continue
        kind = "images" if fmt == "images" else _ext_kind(f.rel)
        if kind == "tar" and (fmt == "webdataset" or shard_meta.get(f.rel)):
            kind = "webdataset"
        wanted = {"auto": None, "embeddings": "parquet"}.get(fmt, fmt)
        if wanted is not None and kind != wanted:
            continue  # an explicit format reads only its own files
        groups.setdefault(kind, []).append(f)
    return groups


def plan_parts(uri: str, cfg: SourceConfig, storage_options: dict[str, Any] | None = None) -> list[Part]:
    """List ``uri`` and cut it into parts (sorted by id); see ``plan_input``."""
    return plan_input(uri, cfg, storage_options)[0]


def plan_input(uri: str, cfg: SourceConfig, storage_options: dict[str, Any] | None = None
               ) -> tuple[list[Part], list[str]]:
    """The parts of ``uri`` (sorted by id) and the hidden / bookkeeping paths skipped (logged). Raises for
    job-level faults (missing input, a Parquet file with neither image nor URL column)."""
    listing = scan_input(uri, storage_options)
    log_skipped(uri, listing.skipped)
    return _cut_parts(uri, listing, cfg), listing.skipped


def _cut_parts(uri: str, listing: Listing, cfg: SourceConfig) -> list[Part]:
    groups = classify(listing.files, cfg.format)
    if not any(groups.values()):
        hidden = f"; skipped {len(listing.skipped)} hidden / bookkeeping" if listing.skipped else ""
        raise ValueError(f"no input files under {uri!r} (format {cfg.format!r}{hidden})")
    parts: list[Part] = []
    images = groups.pop("images", [])
    for i in range(0, len(images), cfg.part_size):
        parts.append(Part(f"images-{i // cfg.part_size:05d}", "images", tuple(images[i: i + cfg.part_size])))
    for kind, members in sorted(groups.items()):
        reader = get_reader("parquet" if kind == "embeddings" else kind)
        for f in members:
            parts.extend(reader.plan(f, cfg))
    return sorted(parts, key=lambda p: p.part_id)


def plan_digest(parts: list[Part]) -> str:
    """Fingerprint of a plan: part ids, kinds, member paths and sizes, row groups."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.to_json().encode())
    return h.hexdigest()[:16]


def read_part(part: Part, cfg: SourceConfig) -> Iterator[Record]:
    return get_reader(part.kind).read(part, cfg)


# --- loose images ---------------------------------------------------------------------------------------
class ImagesReader(OneFileReader):
    name = "images"

    def read(self, part: Part, cfg: SourceConfig) -> Iterator[Record]:
        fs, _ = uris.filesystem(part.files[0].uri)

        def fetch(f: InputFile) -> Record:
            if f.size > cfg.max_member_bytes:
                return Record(f.rel, f.uri, error=f"file too large ({f.size} bytes > {cfg.max_member_bytes})")
            try:
                return Record(f.rel, f.uri, data=read_loose_file(fs, f, cfg.max_member_bytes))
            except Exception as exc:  # noqa: BLE001 - vanished file, permission, network: an error row
                return Record(f.rel, f.uri, error=f"cannot read file: {type(exc).__name__}: {exc}",
                              stage=UNIT_STAGE)

        with ThreadPoolExecutor(cfg.fetch_threads) as pool:
            for i in range(0, len(part.files), cfg.read_batch):
                yield from pool.map(fetch, part.files[i: i + cfg.read_batch])


# --- tar and webdataset ---------------------------------------------------------------------------------
def _tar_members(part: Part, cfg: SourceConfig) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(member name, bytes or None, error or None) in archive order; ("", None, error) for the archive."""
    f = part.files[0]
    seen: set[str] = set()
    try:
        fs, path = uris.filesystem(f.uri)
        with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
            for m in tf:
                name = clean_name(m.name)
                if m.isdir():
                    continue
                why = tar_member_problem(m, seen, cfg)
                if why is not None:
                    yield name, None, why
                    continue
                src = tf.extractfile(m)
                yield name, (src.read() if src is not None else b""), None
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as exc:
        yield "", None, f"unreadable archive: {type(exc).__name__}: {exc}"


def _member_record(part: Part, name: str, data: bytes | None, error: str | None) -> Record:
    f = part.files[0]
    key = f"{f.rel}/{name}" if name else f.rel
    return Record(key, f.uri, data=data, error=error, stage="read" if name else UNIT_STAGE)


class TarReader(OneFileReader):
    name = "tar"

    def read(self, part: Part, cfg: SourceConfig) -> Iterator[Record]:
        for name, data, error in _tar_members(part, cfg):
            yield _member_record(part, name, data, error)


def _sample_key(name: str) -> str:
    d, base = posixpath.split(name)
    return posixpath.join(d, base.split(".", 1)[0])


class WebDatasetReader(TarReader):
    """A webdataset shard: one row per sample key, from the sample's first image member in archive order."""

    name = "webdataset"

    def read(self, part: Part, cfg: SourceConfig) -> Iterator[Record]:
        group: list[tuple[str, bytes]] = []
        done: set[str] = set()
        for name, data, error in _tar_members(part, cfg):
            if error is not None or data is None:  # a refused member is its own error row; its sample goes on
                yield _member_record(part, name, None, error)
                continue
            if group and _sample_key(group[0][0]) != _sample_key(name):
                yield from self._sample(part, group, done)
                group = []
            group.append((name, data))
        yield from self._sample(part, group, done)

    @staticmethod
    def _sample(part: Part, group: list[tuple[str, bytes]], done: set[str]) -> Iterator[Record]:
        if not group:
            return
        key = _sample_key(group[0][0])
        if key in done:
            for n, _ in group:
                yield _member_record(part, n, None, f"member of sample {key!r} after other samples (a webdataset "
                                                    "sample's members must be consecutive)")
            return
        done.add(key)
        f = part.files[0]
        images = [(n, d) for n, d in group if imaging.is_image_name(n)]
        if not images:
            exts = ", ".join(sorted(n.split(".", 1)[-1] for n, _ in group))
            yield Record(f"{f.rel}/{key}", f.uri, error=f"sample has no image member (has: {exts})")
            return
        yield Record(f"{f.rel}/{key}", f.uri, data=images[0][1])
        for n, _ in images[1:]:
            yield _member_record(part, n, None, f"second image of sample {key!r} (captioned from {images[0][0]}); "
                                                "a webdataset sample has one image: use format tar to caption "
                                                "every member")


def webdataset_samples(uri: str, cfg: SourceConfig | None = None
                       ) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(sample key, {extension: bytes}, None) per sample of a webdataset shard at ``uri``, members grouped by key,
    through the same member-safety checks as the readers; a refused member or an unreadable archive gives
    (member name or "", {}, error). For stages that need more than the image (captions for CLIP training)."""
    cfg = cfg or SourceConfig()
    part = Part(part_name(posixpath.basename(uri)), "webdataset", (InputFile(uri, posixpath.basename(uri), 0),))
    key, group = None, {}
    for name, data, error in _tar_members(part, cfg):
        if error is not None or data is None:
            yield name, {}, error
            continue
        k = _sample_key(name)
        if key is not None and k != key:
            yield key, group, None
            group = {}
        key = k
        group[posixpath.basename(name).split(".", 1)[-1].lower()] = data
    if key is not None and group:
        yield key, group, None


# --- zip ------------------------------------------------------------------------------------------------
class ZipReader(OneFileReader):
    name = "zip"

    def read(self, part: Part, cfg: SourceConfig) -> Iterator[Record]:
        f = part.files[0]
        seen: set[str] = set()
        try:
            fs, path = uris.filesystem(f.uri)
            with fs.open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
                infos = zf.infolist()
                for info in infos:
                    if info.is_dir():
                        continue
                    yield self._member(part, zf, info, seen, cfg)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
            yield _member_record(part, "", None, f"unreadable archive: {type(exc).__name__}: {exc}")

    @staticmethod
    def _member(part: Part, zf: zipfile.ZipFile, info: zipfile.ZipInfo, seen: set[str],
                cfg: SourceConfig) -> Record:
        name = clean_name(info.filename)
        why = member_problem(info.filename, name, info.file_size, seen, cfg,
                              (stat.S_ISLNK(info.external_attr >> 16), "not a regular file (symlink)"),
                              (bool(info.flag_bits & 0x1), "encrypted member"))
        if why is not None:
            return _member_record(part, name, None, why)
        try:
            with zf.open(info) as src:
                data = src.read(cfg.max_member_bytes + 1)  # never trust the declared size
        except Exception as exc:  # noqa: BLE001 - bad CRC, unsupported compression, corrupt stream
            return _member_record(part, name, None, f"unreadable member: {type(exc).__name__}: {exc}")
        if len(data) > cfg.max_member_bytes:
            return _member_record(part, name, None, f"member inflates past {cfg.max_member_bytes} bytes")
        return _member_record(part, name, data, None)


# Every input reader, by the ``Part.kind`` it reads.
READERS: dict[str, Reader] = {
    "images": ImagesReader(), "tar": TarReader(), "webdataset": WebDatasetReader(), "zip": ZipReader(),
    "parquet": sources_parquet.ParquetReader(), "embeddings": sources_parquet.EmbeddingsReader(),
    "unreadable": sources_parquet.UnreadableReader(),
}


def get_reader(name: str) -> Reader:
    try:
        return READERS[name]
    except KeyError:
        raise ValueError(f"unknown input format {name!r}; known: {sorted(READERS)}") from None

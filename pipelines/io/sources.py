"""Input readers for bulk captioning: an input URI -> deterministic *parts* -> *records*, one explicit registry
(``READERS``) of loose images, tar, webdataset, zip, Parquet (bytes or URLs) and embedding tables.

Hidden files and tool bookkeeping (``_meta/``, ``_SUCCESS``, ...) are skipped; other ``_`` names are input
(``_DSC0001.JPG``). A ``.tar`` beside an img2dataset sidecar is a webdataset shard. Every archive member and
loose file passes the safety checks (unsafe paths, links, devices, duplicates, size) before any byte is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import imaging, uris
from pipelines.io import schemas, storage, urlsafety

log = logging.getLogger(__name__)


Format = Literal["auto", "images", "tar", "zip", "webdataset", "parquet", "embeddings"]


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """How an input is listed, partitioned and read. ``CLI_FLAGS``: the fields that are not flags."""

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


def part_name(rel: str, suffix: str = "") -> str:
    """A file-name-safe, collision-free part id for a file path (readable tail + hash of the full path)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", rel).strip("._")[-80:] or "root"
    return f"{safe}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}{suffix}"


def unsafe_member(name: str) -> str | None:
    """Why an archive member name must not be used (absolute, drive letter, ``..``), or None."""
    if "\x00" in name:
        return "member name contains NUL"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "unsafe member path (absolute)"
    if ".." in re.split(r"[\\/]+", name):
        return "unsafe member path ('..')"
    return None


def member_problem(raw_name: str, name: str, size: int, seen: set[str], cfg: SourceConfig,
                    *kind_checks: tuple[bool, str]) -> str | None:
    """Why an archive member must not be read, or None: unsafe path, the format's own checks, duplicate,
    size. Records ``name`` in ``seen``."""
    why = unsafe_member(raw_name)
    for bad, reason in kind_checks:
        if why is None and bad:
            why = reason
    if why is None and name in seen:
        why = "duplicate member name"
    if why is None and size > cfg.max_member_bytes:
        why = f"member too large ({size} bytes > {cfg.max_member_bytes})"
    seen.add(name)
    return why


def tar_member_problem(m: tarfile.TarInfo, seen: set[str], cfg: SourceConfig) -> str | None:
    """Why tar member ``m`` must not be read (unsafe path, link or device, duplicate, too large), or None."""
    return member_problem(m.name, clean_name(m.name), m.size, seen, cfg,
                           (not m.isfile(), "not a regular file (link or device)"))


def clean_name(name: str) -> str:
    """``name`` without leading ``./`` (tar members are often stored so)."""
    return re.sub(r"^(\./)+", "", name)


def check_local_file(uri: str, rel: str) -> str:
    """The real path of a local loose file, refused unless a regular file inside the real input folder."""
    path = uris.filesystem(uri)[1]
    root = path[: len(path) - len(rel)] if path.endswith(rel) else os.path.dirname(path)
    real, real_root = os.path.realpath(path), os.path.realpath(root or ".")
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise PermissionError(f"symlink leads outside the input folder ({rel!r})")
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise PermissionError(f"not a regular file ({rel!r})")
    return real


def read_loose_file(fs: Any, f: InputFile, limit: int) -> bytes:
    """At most ``limit`` bytes of a loose file (more is an error: listed sizes can lie, e.g. devices)."""
    local = storage.protocol_prefix(fs) == ""
    # a bounded read, not cat_file: the object may be larger than the listing said
    path = check_local_file(f.uri, f.rel) if local else uris.filesystem(f.uri)[1]
    with open(path, "rb") if local else fs.open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"file larger than {limit} bytes")
    return data


def _open(file: InputFile) -> Any:
    fs, path = uris.filesystem(file.uri)
    return fs.open(path, "rb")


def image_column(schema: pa.Schema, cfg: SourceConfig) -> str | None:
    """The column holding encoded image bytes (binary, or a struct with a ``bytes`` field), if any."""
    names = [cfg.image_column] if cfg.image_column else list(schemas.IMAGE_BYTES_COLUMNS)
    for name in names:
        if name not in schema.names:
            continue
        t = schema.field(name).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return name
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return name
        if cfg.image_column:
            raise ValueError(f"image column {name!r} must be binary or a {{bytes, path}} struct, got {t}")
    if cfg.image_column:
        raise ValueError(f"image column {cfg.image_column!r} not found; columns: {schema.names}")
    return None


def plan_parquet(file: InputFile, cfg: SourceConfig) -> list[Part]:
    """Parts of whole row groups (``part_size`` rows) of a Parquet file: ``parquet`` or ``embeddings``."""
    try:
        with _open(file) as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception:  # noqa: BLE001 - a corrupt file is one error row, found again at read time
        return [Part(part_name(file.rel), "unreadable", (file,))]
    schema = meta.schema.to_arrow_schema()
    kind, dim, clip_model = "parquet", 0, ""
    if schemas.IMAGE_EMBEDDING in schema.names:
        kind = "embeddings"
        dim = schemas.validate_embedding_schema(schema, where=file.uri)
        clip_model = schemas.read_metadata(schema).get(schemas.META_CLIP_MODEL, "")
    elif cfg.format == "embeddings":
        raise ValueError(f"{file.uri}: not an embedding table (no {schemas.IMAGE_EMBEDDING!r} column)")
    elif image_column(schema, cfg) is None and cfg.url_column not in schema.names:
        raise ValueError(
            f"{file.uri}: no image column (one of {list(schemas.IMAGE_BYTES_COLUMNS)}), URL column "
            f"{cfg.url_column!r} or {schemas.IMAGE_EMBEDDING!r} column; has {schema.names}"
        )
    parts, group, offset, rows = [], [], 0, 0
    for rg in range(meta.num_row_groups):
        group.append(rg)
        rows += meta.row_group(rg).num_rows
        offset += meta.row_group(rg).num_rows
        if rows >= cfg.part_size or rg == meta.num_row_groups - 1:
            parts.append(Part(part_name(file.rel, f"-rg{group[0]:05d}"), kind, (file,), tuple(group),
                              offset - rows, dim, clip_model))
            group, rows = [], 0
    return parts


def read_parquet(part: Part, cfg: SourceConfig) -> Iterator[Record]:
    f = part.files[0]
    with _open(f) as fh:
        pf = pq.ParquetFile(fh)
        schema = pf.schema_arrow
        img_col = image_column(schema, cfg)
        cols = [c for c in (cfg.key_column, img_col, cfg.url_column) if c and c in schema.names]
        table = pf.read_row_groups(list(part.row_groups), columns=cols)
    keys = row_keys(table, part, cfg)
    images = _bytes_values(table.column(img_col)) if img_col else [None] * table.num_rows
    urls = table.column(cfg.url_column).to_pylist() if cfg.url_column in cols else [None] * table.num_rows
    seen: set[str] = set()
    pending: list[Record] = []
    for key, data, url in zip(keys, images, urls, strict=True):
        if key in seen:
            yield Record(key, f.uri, error="duplicate key")
        elif data:
            yield Record(key, f.uri, data=data)
        elif url:
            pending.append(Record(key, f.uri, url=str(url)))
        else:
            yield Record(key, f.uri, error="row has neither image bytes nor a URL")
        seen.add(key)
    yield from fetch_rounds(lambda r: _download(r, cfg), pending, cfg)


def row_keys(table: pa.Table, part: Part, cfg: SourceConfig) -> list[str]:
    rel = part.files[0].rel
    has = cfg.key_column in table.column_names
    raw = table.column(cfg.key_column).to_pylist() if has else [None] * table.num_rows
    return [f"{rel}/{k}" if k is not None and str(k) != "" else f"{rel}/#{part.row_offset + i}"
            for i, k in enumerate(raw)]


def _bytes_values(col: pa.ChunkedArray) -> list[bytes | None]:
    if pa.types.is_struct(col.type):
        col = pa.chunked_array([c.field("bytes") for c in col.chunks], type=col.type.field("bytes").type)
    return col.to_pylist()


def fetch_url(url: str, cfg: SourceConfig) -> bytes:
    """Download ``url`` within the ``urlsafety`` policy, at most ``max_member_bytes``, within the timeout."""
    scheme = urlsafety.check_fetch_url(url, cfg.allow_private_urls, cfg.allow_object_store_urls)
    if scheme not in cfg.url_schemes:
        raise ValueError(f"URL scheme {scheme or '(none)'!r} not allowed (allowed: {list(cfg.url_schemes)})")
    limit = cfg.max_member_bytes
    if scheme in urlsafety.HTTP_SCHEMES:
        return urlsafety.fetch_http(url, cfg.fetch_timeout_s, limit, cfg.allow_private_urls)
    with fsspec.open(url, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"download larger than {limit} bytes")
    return data


def fetch_rounds(fetch: Any, items: Sequence[Any], cfg: SourceConfig) -> Iterator[Record]:
    """``fetch`` of each item on ``fetch_threads`` threads, ``read_batch`` items per round, in order."""
    with ThreadPoolExecutor(cfg.fetch_threads) as pool:
        for i in range(0, len(items), cfg.read_batch):
            yield from pool.map(fetch, items[i: i + cfg.read_batch])


def _download(rec: Record, cfg: SourceConfig) -> Record:
    try:
        rec.data = fetch_url(rec.url or "", cfg)
    except Exception as exc:  # noqa: BLE001 - 404, timeout, refused, DNS: an error row
        rec.error, rec.stage = f"download failed: {type(exc).__name__}: {exc}", "fetch"
    return rec


def read_embeddings(part: Part, cfg: SourceConfig) -> Iterator[Record]:
    f = part.files[0]
    with _open(f) as fh:
        pf = pq.ParquetFile(fh)
        cols = [c for c in (cfg.key_column, schemas.IMAGE_EMBEDDING) if c in pf.schema_arrow.names]
        table = pf.read_row_groups(list(part.row_groups), columns=cols)
    keys = row_keys(table, part, cfg)
    col = table.column(schemas.IMAGE_EMBEDDING).combine_chunks()
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    # .values keeps the slots of null rows (unlike .flatten()), so rows stay aligned
    flat = col.values.slice(col.offset * part.dim, len(col) * part.dim).to_numpy(zero_copy_only=False)
    emb = np.asarray(flat, dtype=np.float32).reshape(len(col), part.dim)
    finite = np.isfinite(emb).all(axis=1)
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if key in seen:
            yield Record(key, f.uri, error="duplicate key")
        elif not valid[i]:
            yield Record(key, f.uri, error="null embedding")
        elif not finite[i]:
            yield Record(key, f.uri, error="non-finite embedding (NaN or inf)")
        else:
            yield Record(key, f.uri, embedding=emb[i])
        seen.add(key)


def read_unreadable(part: Part, cfg: SourceConfig) -> Iterator[Record]:
    """A Parquet file whose footer could not be read while planning: one error row with the reason."""
    f = part.files[0]
    try:
        with _open(f) as fh:
            pq.ParquetFile(fh)
        reason = "file changed since planning"
    except Exception as exc:  # noqa: BLE001
        reason = f"{type(exc).__name__}: {exc}"
    yield Record(f.rel, f.uri, error=f"unreadable Parquet file: {reason}", stage=UNIT_STAGE)


# --- listing and planning -------------------------------------------------------------------------------
# Names that are bookkeeping, not input: ours (caption / embed outputs, atomic writes) and Spark's / Parquet's.
BOOKKEEPING_NAMES = frozenset({"_meta", "_errors", "_run.json", "_summary.json", "_SUCCESS", "_metadata",
                               "_common_metadata"})
SHOW_SKIPPED = 10  # skipped paths named in the log line


class Listing(NamedTuple):
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
    """The parts of ``uri`` (sorted by id) and the hidden / bookkeeping paths skipped; raises job faults."""
    files, skipped = scan_input(uri, storage_options)
    if skipped:
        more = f" and {len(skipped) - SHOW_SKIPPED} more" if len(skipped) > SHOW_SKIPPED else ""
        log.info("skipped %d hidden / bookkeeping file(s) under %s: %s%s", len(skipped), uri,
                 ", ".join(skipped[:SHOW_SKIPPED]), more)
    groups = classify(files, cfg.format)
    if not any(groups.values()):
        hidden = f"; skipped {len(skipped)} hidden / bookkeeping" if skipped else ""
        raise ValueError(f"no input files under {uri!r} (format {cfg.format!r}{hidden})")
    parts: list[Part] = []
    images = groups.pop("images", [])
    for i in range(0, len(images), cfg.part_size):
        parts.append(Part(f"images-{i // cfg.part_size:05d}", "images", tuple(images[i: i + cfg.part_size])))
    for kind, members in sorted(groups.items()):
        for f in members:
            parts.extend(plan_parquet(f, cfg) if kind == "parquet" else [Part(part_name(f.rel), kind, (f,))])
    return sorted(parts, key=lambda p: p.part_id), skipped


def plan_digest(parts: list[Part]) -> str:
    """Fingerprint of a plan: part ids, kinds, member paths and sizes, row groups."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.to_json().encode())
    return h.hexdigest()[:16]


def read_part(part: Part, cfg: SourceConfig) -> Iterator[Record]:
    return get_reader(part.kind)(part, cfg)


# --- loose images ---------------------------------------------------------------------------------------
def read_images(part: Part, cfg: SourceConfig) -> Iterator[Record]:
    fs, _ = uris.filesystem(part.files[0].uri)

    def fetch(f: InputFile) -> Record:
        if f.size > cfg.max_member_bytes:
            return Record(f.rel, f.uri, error=f"file too large ({f.size} bytes > {cfg.max_member_bytes})")
        try:
            return Record(f.rel, f.uri, data=read_loose_file(fs, f, cfg.max_member_bytes))
        except Exception as exc:  # noqa: BLE001 - vanished file, permission, network: an error row
            return Record(f.rel, f.uri, error=f"cannot read file: {type(exc).__name__}: {exc}",
                          stage=UNIT_STAGE)

    yield from fetch_rounds(fetch, part.files, cfg)


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


def read_tar(part: Part, cfg: SourceConfig) -> Iterator[Record]:
    for name, data, error in _tar_members(part, cfg):
        yield _member_record(part, name, data, error)


def _sample_key(name: str) -> str:
    d, base = posixpath.split(name)
    return posixpath.join(d, base.split(".", 1)[0])


Members = list[tuple[str, bytes]]  # (member name, bytes) of one webdataset sample, in archive order


def _sample_groups(part: Part, cfg: SourceConfig) -> Iterator[tuple[str, Members, str | None]]:
    """(sample key, its consecutive members, None) in archive order; a refused member (its sample goes on) or
    an unreadable archive is (member name or "", [], error) where it occurs."""
    group: Members = []
    for name, data, error in _tar_members(part, cfg):
        if error is not None or data is None:
            yield name, [], error
            continue
        if group and _sample_key(group[0][0]) != _sample_key(name):
            yield _sample_key(group[0][0]), group, None
            group = []
        group.append((name, data))
    if group:
        yield _sample_key(group[0][0]), group, None


def read_webdataset(part: Part, cfg: SourceConfig) -> Iterator[Record]:
    """A webdataset shard: one row per sample key, from the sample's first image member in archive order."""
    done: set[str] = set()
    for key, group, error in _sample_groups(part, cfg):
        if error is not None:
            yield _member_record(part, key, None, error)
        else:
            yield from _webdataset_sample(part, key, group, done)


def _webdataset_sample(part: Part, key: str, group: Members, done: set[str]) -> Iterator[Record]:
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
        why = (f"second image of sample {key!r} (captioned from {images[0][0]}); a webdataset sample has one "
               "image: use format tar to caption every member")
        yield _member_record(part, n, None, why)


def webdataset_samples(uri: str, cfg: SourceConfig | None = None
                       ) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(sample key, {extension: bytes}, None) per sample of a webdataset shard, through the member checks;
    a refused member or an unreadable archive gives (member name or "", {}, error)."""
    part = Part(part_name(posixpath.basename(uri)), "webdataset", (InputFile(uri, posixpath.basename(uri), 0),))
    for key, group, error in _sample_groups(part, cfg or SourceConfig()):
        yield key, {posixpath.basename(n).split(".", 1)[-1].lower(): d for n, d in group}, error


# --- zip ------------------------------------------------------------------------------------------------
def read_zip(part: Part, cfg: SourceConfig) -> Iterator[Record]:
    f = part.files[0]
    seen: set[str] = set()
    try:
        fs, path = uris.filesystem(f.uri)
        with fs.open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
            for info in infos:
                if info.is_dir():
                    continue
                yield _zip_member(part, zf, info, seen, cfg)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        yield _member_record(part, "", None, f"unreadable archive: {type(exc).__name__}: {exc}")

def _zip_member(part: Part, zf: zipfile.ZipFile, info: zipfile.ZipInfo, seen: set[str],
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


# Every input reader, by the ``Part.kind`` it reads (Parquet files are planned by ``plan_parquet``, any other
# file is one part).
READERS: dict[str, Callable[[Part, SourceConfig], Iterator[Record]]] = {
    "images": read_images, "tar": read_tar, "webdataset": read_webdataset, "zip": read_zip,
    "parquet": read_parquet, "embeddings": read_embeddings, "unreadable": read_unreadable,
}


def get_reader(name: str) -> Callable[[Part, SourceConfig], Iterator[Record]]:
    try:
        return READERS[name]
    except KeyError:
        raise ValueError(f"unknown input format {name!r}; known: {sorted(READERS)}") from None

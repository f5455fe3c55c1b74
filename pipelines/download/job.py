"""Download stage: image-text URL lists -> webdataset shards with img2dataset, configured by ``DownloadConfig``.

img2dataset stores each URL as fetched (signed query strings included) in the shard's parquet and tar, so after a
download every shard whose URLs carry a query string, fragment or credentials is rewritten with redacted URLs.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import re
import tarfile
import tempfile
import urllib.parse
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import uris
from pipelines import console, exitcodes, runtime
from pipelines.io import schemas, storage
from pipelines.io.delimited import read_delimited
from pipelines.io.urlsafety import redact_url, url_list_problems

log = logging.getLogger(__name__)

INPUT_FORMATS = ("tsv", "csv", "parquet", "jsonl")
_URL_PREFIXES = ("http://", "https://", "file://", "s3://", "gs://")


@dataclass(frozen=True, kw_only=True)
class DownloadConfig:
    """Everything img2dataset needs; ``columns`` names the fields of a headerless tsv/csv (CC3M order). Each field
    is a ``clipcap download`` flag (``pipelines.commands.flags``); ``CLI_FLAGS`` names the renamed ones."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {
        "url_list": "--input", "processes_count": "--processes", "thread_count": "--threads",
        "number_sample_per_shard": "--shard-size", "incremental": "--overwrite",
    }
    CLI_COMMA: ClassVar[tuple[str, ...]] = ("columns",)
    url_list: str  # URL list: tsv / csv / parquet / jsonl file (or folder of them), any fsspec URI
    output: str  # shard folder URI (local, s3://, ...)
    input_format: Literal["auto", "tsv", "csv", "parquet", "jsonl"] = "auto"
    """URL list format (auto: from the file name)"""
    header: bool | None = None
    """tsv/csv has a header row (--no-header: it has none, CC3M; default: detected, a first row holding a URL is
    data)"""
    columns: tuple[str, ...] = (schemas.CAPTION, schemas.URL)
    """column names of a headerless file, comma-separated (default: caption,url)"""
    url_col: str = schemas.URL  # column with the image URLs (default: url)
    caption_col: str | None = schemas.CAPTION  # column with the captions (default: caption)
    image_size: int = 256  # side of the stored images in pixels
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    """img2dataset resize mode"""
    resize_only_if_bigger: bool = False  # never upscale small images
    encode_format: Literal["jpg", "png", "webp"] = "jpg"  # stored image format
    encode_quality: int | None = None
    """jpg/webp quality 0-100 or png compression 0-9 (default: 95 for jpg / webp, 9 for png)"""
    min_image_size: int = 0  # drop images smaller than this many pixels per side
    processes_count: int = 1  # img2dataset processes
    thread_count: int = 16  # download threads per process
    number_sample_per_shard: int = 10000  # samples per shard
    distributor: Literal["multiprocessing", "ray"] = "multiprocessing"
    """img2dataset distributor (ray: one task per shard on the cluster)"""
    timeout: int = 10  # seconds per URL before it counts as failed (retried on the next run)
    retries: int = 0  # img2dataset retries per URL within a run
    incremental: bool = True
    """finished shards are skipped (off, --overwrite: img2dataset's overwrite, the output folder is deleted
    first)"""
    allow_private_urls: bool = False
    """download from private / loopback / link-local hosts too (trusted internal lists only)"""

    def __post_init__(self) -> None:
        if self.number_sample_per_shard < 1 or self.processes_count < 1 or self.thread_count < 1:
            raise ValueError("number_sample_per_shard, processes_count and thread_count must be >= 1")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        q, top = self.encode_quality, (9 if self.encode_format == "png" else 100)
        if q is not None and not 0 <= q <= top:
            raise ValueError(f"encode_quality for {self.encode_format} must be in 0..{top}, got {q}")

    @property
    def quality(self) -> int:
        if self.encode_quality is not None:
            return self.encode_quality
        return 9 if self.encode_format == "png" else 95


@dataclass(frozen=True)
class DownloadSummary:
    output: str
    shards: int
    count: int
    successes: int
    failed_to_download: int
    failed_to_resize: int
    errors: dict[str, int]
    retry: tuple[str, ...] = ()  # shards with transient failures: not finished, the next run retries them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def exit_code(self) -> int:
        if self.successes == 0:
            return exitcodes.NOTHING
        return exitcodes.PARTIAL if self.retry else exitcodes.OK

    def describe(self) -> str:
        top = ", ".join(f"{n} x {e[:60]}" for e, n in sorted(self.errors.items(), key=lambda x: -x[1])[:3])
        text = (f"downloaded {self.successes}/{self.count} samples into {self.shards} shard(s) at {self.output} "
                f"(failed: {self.failed_to_download} download, {self.failed_to_resize} decode/resize)"
                + (f"; top errors: {top}" if top else ""))
        if self.retry:
            text += (f"; shard(s) {list(self.retry[:10])} had transient failures (outage, timeout, 5xx) and are "
                     "not finished: rerun to retry them")
        return text


_RETRYABLE_HTTP = (408, 429)
_TRANSIENT_WORDS = ("connection refused", "timed out", "timeout", "connection reset", "connection aborted",
                    "remote end closed", "temporary failure", "temporarily unavailable", "try again")


def is_transient(error: str | None) -> bool:
    """True for a download error that a later attempt may not get (outage, timeout, 5xx, throttling); False
    for a dead link (404, 403, ...), a bad image or an unknown host, which retrying would not fix."""
    if not error:
        return False
    m = re.search(r"HTTP Error (\d{3})", error)
    if m:
        code = int(m.group(1))
        return code >= 500 or code in _RETRYABLE_HTTP
    low = error.lower()
    return any(w in low for w in _TRANSIENT_WORDS)


def shards_to_retry(output: str) -> list[str]:
    """Shard ids whose ``_stats.json`` records transient failures (attempted and failed, not finished)."""
    out = []
    for uri in storage.list_files(output, "_stats.json"):
        status = storage.read_json(uri, default={}).get("status_dict") or {}
        if sum(int(n) for err, n in status.items() if is_transient(err)):
            out.append(posixpath.basename(uri).split("_")[0])
    return out


def reset_shards(output: str, shards: list[str]) -> None:
    """Delete the files of ``shards`` so img2dataset's incremental mode downloads them again (stats first: a
    shard left without stats is missing, downloaded again too)."""
    for shard in shards:
        for suffix in ("_stats.json", ".tar", ".parquet"):
            uri = storage.join(output, shard + suffix)
            if uris.exists(uri):
                storage.remove(uri)


def detect_format(url_list: str) -> str:
    name = posixpath.basename(url_list.rstrip("/")).lower().removesuffix(".gz")
    for fmt in INPUT_FORMATS:
        if name.endswith("." + fmt):
            return fmt
    if name.endswith(".json"):
        return "jsonl"
    raise ValueError(f"cannot tell the format of URL list {url_list!r} from its name; set input_format to one "
                     f"of {list(INPUT_FORMATS)}")


def _has_header(cfg: DownloadConfig, sep: str) -> bool:
    """Explicit ``header``, else: a first row with a URL in it is data (CC3M), any other first row a header."""
    if cfg.header is not None:
        return cfg.header
    # a bad byte here is named by read_delimited, with its line: this only looks for a URL
    with fsspec.open(cfg.url_list, "rt", encoding="utf-8", errors="replace", compression="infer") as f:
        fields = f.readline().rstrip("\r\n").split(sep)
    return not any(f.strip().strip('"').startswith(_URL_PREFIXES) for f in fields)


def read_url_list(cfg: DownloadConfig) -> pd.DataFrame:
    """The URL list as a DataFrame with columns ``url`` (+ ``caption``), all strings; checks the columns."""
    fmt = detect_format(cfg.url_list) if cfg.input_format == "auto" else cfg.input_format
    wanted = [cfg.url_col] + ([cfg.caption_col] if cfg.caption_col else [])
    try:
        if fmt in ("tsv", "csv"):
            sep = "\t" if fmt == "tsv" else ","
            df = read_delimited(cfg.url_list, sep, names=None if _has_header(cfg, sep) else cfg.columns,
                                what="URL list")
        elif fmt == "parquet":
            df = pd.read_parquet(cfg.url_list)
        else:
            df = pd.read_json(cfg.url_list, lines=True, dtype=False)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"URL list {cfg.url_list!r} not found") from exc
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise ValueError(f"URL list {cfg.url_list!r} has no column(s) {missing}; it has {list(df.columns)}. "
                         "Set url_col / caption_col (or columns + header=false for a headerless file).")
    out = pd.DataFrame({schemas.URL: df[cfg.url_col].astype("string")})
    if cfg.caption_col:
        out[schemas.CAPTION] = df[cfg.caption_col].astype("string")
    return out


def img2dataset_kwargs(cfg: DownloadConfig, url_parquet: str) -> dict[str, Any]:
    """Our config as img2dataset.download() keyword arguments (the list already normalised to Parquet)."""
    return dict(
        url_list=url_parquet, input_format="parquet", url_col=schemas.URL,
        caption_col=schemas.CAPTION if cfg.caption_col else None, output_folder=cfg.output, output_format="webdataset",
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format, encode_quality=cfg.quality, min_image_size=cfg.min_image_size,
        processes_count=cfg.processes_count, thread_count=cfg.thread_count,
        number_sample_per_shard=cfg.number_sample_per_shard, distributor=cfg.distributor, timeout=cfg.timeout,
        retries=cfg.retries, incremental_mode="incremental" if cfg.incremental else "overwrite",
        enable_wandb=False, save_additional_columns=None,
    )


def summarize(output: str) -> DownloadSummary:
    """Sum img2dataset's per-shard ``*_stats.json`` under ``output``."""
    stats = [storage.read_json(uri, default={}) for uri in storage.list_files(output, "_stats.json")]
    keys = ("count", "successes", "failed_to_download", "failed_to_resize")
    totals = {k: sum(int(s.get(k, 0)) for s in stats) for k in keys}
    errors: Counter[str] = Counter()
    for s in stats:
        errors.update({err: int(n) for err, n in (s.get("status_dict") or {}).items() if err != "success"})
    return DownloadSummary(output=output, shards=len(stats), errors=dict(errors), retry=tuple(shards_to_retry(output)),
                           **totals)


def missing_shards(cfg: DownloadConfig, rows: int) -> list[str]:
    """Shard ids (``00012``) of a ``rows``-row list that have no ``_stats.json`` (not finished) yet."""
    expected = math.ceil(rows / cfg.number_sample_per_shard)
    done = {posixpath.basename(u).split("_")[0] for u in storage.list_files(cfg.output, "_stats.json")}
    return [f"{i:05d}" for i in range(expected) if f"{i:05d}" not in done]


def prepare_download(cfg: DownloadConfig) -> pd.DataFrame:
    """Every check of the stage, no downloading: the URL list's columns and URLs, the output's writability."""
    df = read_url_list(cfg)
    check_urls(cfg, df)
    storage.check_writable(cfg.output)
    return df


def check_urls(cfg: DownloadConfig, df: pd.DataFrame) -> None:
    """Refuse a list with non-http(s) URLs (img2dataset would copy ``file://`` paths into the shards and read
    ``s3://`` with our credentials) or private literal hosts, before any download (``urlsafety``)."""
    problems = url_list_problems(df[schemas.URL].dropna().unique(), cfg.allow_private_urls)
    if problems:
        raise ValueError(f"URL list {cfg.url_list!r} has URLs we do not fetch: " + "; ".join(problems[:5]))


def run_download(cfg: DownloadConfig, ray_address: str | None = None, urls: pd.DataFrame | None = None
                 ) -> DownloadSummary:
    """Validate (unless ``urls`` comes from ``prepare_download``), download with img2dataset, sum the stats."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    df = prepare_download(cfg) if urls is None else urls
    retry = shards_to_retry(cfg.output) if cfg.incremental else []
    if retry:
        log.info("retrying shard(s) %s at %s: their last attempt had transient failures", retry, cfg.output)
        reset_shards(cfg.output, retry)
    if cfg.incremental and not missing_shards(cfg, len(df)):
        log.info("all shards at %s are finished; nothing to download", cfg.output)
    else:
        if cfg.distributor == "ray":
            runtime.ensure_ray(ray_address)
        _download(cfg, df)

    redact_shards(cfg.output)  # img2dataset stores URLs as fetched: no signed query strings at rest
    missing = missing_shards(cfg, len(df))
    if missing:
        raise RuntimeError(f"img2dataset finished without shard(s) {missing[:10]} at {cfg.output}; rerun to "
                           "download them (finished shards are skipped)")
    summary = summarize(cfg.output)
    log.info(summary.describe())
    return summary


def _download(cfg: DownloadConfig, df: pd.DataFrame) -> None:
    """img2dataset's download, its own output in the job log, our progress line from the shards' stats."""
    # lazy: img2dataset ~8.1 s to import (python -X importtime)
    from img2dataset import download

    with tempfile.TemporaryDirectory(prefix="clipcap-urls-") as tmp:
        url_parquet = os.path.join(tmp, "urls.parquet")
        df.to_parquet(url_parquet, index=False)
        log.info("downloading %d URLs from %s to %s (%s)", len(df), cfg.url_list, cfg.output, cfg.distributor)
        shards = math.ceil(len(df) / cfg.number_sample_per_shard)
        progress = console.Progress("download", shards, unit="shards", rows="images")
        with console.stdout_to_log(), console.watch(progress, ShardTally(cfg.output).read, interval_s=2.0):
            download(**img2dataset_kwargs(cfg, url_parquet))


class ShardTally:
    """Finished shards, images and failed samples from img2dataset's per-shard stats (each read once)."""

    def __init__(self, output: str):
        self.output = output
        self.seen: dict[str, tuple[int, int]] = {}  # stats file -> (successes, failures)

    def read(self) -> tuple[int, int, int, str]:
        for uri in storage.list_files(self.output, "_stats.json"):
            if uri not in self.seen:
                stats = storage.read_json(uri, default={}) or {}
                ok = int(stats.get("successes", 0))
                self.seen[uri] = (ok, int(stats.get("count", 0)) - ok)
        return (len(self.seen), sum(ok for ok, _ in self.seen.values()),
                sum(bad for _, bad in self.seen.values()), "")


def summary_json(summary: DownloadSummary) -> str:
    return json.dumps(summary.to_dict(), indent=2, sort_keys=True)


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
        pf = pq.ParquetFile(f)
        if schemas.URL not in pf.schema_arrow.names:
            return False
        if not any(_secret(u) for u in pf.read(columns=[schemas.URL]).column(schemas.URL).to_pylist()):
            return False
        table = pf.read()
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

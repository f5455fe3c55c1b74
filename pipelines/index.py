"""Nearest-neighbour indexes over embedding tables (``clipcap index`` / ``clipcap search``), built with faiss."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import uris
from clipcap_core.encoders import EncoderConfig
from clipcap_core.imaging import decode_image
from pipelines import runtime
from pipelines.io import schemas, storage, tables

log = logging.getLogger(__name__)
INDEX, ROWS, INFO = "index.faiss", "rows.parquet", "index.json"
HNSW_EF_SEARCH = 128  # candidates an HNSW query keeps: >= 0.95 top-10 agreement with exact search at 100k
READ_ROWS = 16_384  # vectors read and added per record batch: ~4 copies of a batch beside the index itself


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """The ``clipcap index`` config: each field is a flag (``pipelines.commands.flags``)."""

    input: str  # embedding table folder or file (local, s3://, ...)
    output: str  # index folder (any URI)
    column: str = schemas.IMAGE_EMBEDDING
    """vector column: image_embedding (default) or text_embedding (text tables, DeCap memories)"""
    kind: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    """auto: exact (flat) below exact_below vectors, IVF from it"""
    exact_below: int = 100_000  # auto's threshold
    nlist: int = 0  # IVF lists (0: ~4 sqrt(N))
    train_sample: int = 100_000  # IVF: vectors sampled (seeded) to train the centroids
    hnsw_m: int = 32  # HNSW links per node
    parallel: Literal["auto", "local", "ray"] = "auto"
    """auto: Ray tasks per table file on a multi-node cluster (IVF)"""
    seed: int = 0  # seed of the IVF training sample and k-means

    def __post_init__(self) -> None:
        if min(self.exact_below, self.train_sample, self.hnsw_m) < 1 or self.nlist < 0:
            raise ValueError("exact_below, train_sample and hnsw_m must be >= 1, nlist >= 0")

    def kind_for(self, n: int) -> str:
        return ("flat" if n < self.exact_below else "ivf") if self.kind == "auto" else self.kind

    def nlist_for(self, n: int) -> int:
        return min(self.nlist or max(1, int(4 * math.sqrt(n))), max(1, n // 39))  # faiss wants >= 39 per centroid


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: a sixteenth of them (at least 8): >= 0.95 top-10 agreement with exact search on
    clustered CLIP-like vectors at 100k (benchmarks/index.py)."""
    return min(nlist, max(8, nlist // 16))


# --- reading vectors ------------------------------------------------------------------------------------------
def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """(N, D) float32 unit vectors (a zero vector stays zero)."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def read_batches(files: Sequence[str], column: str) -> Iterator[tuple[str, int, pa.Table, np.ndarray]]:
    """(file, first row, key/caption table, unit vectors) per record batch; rows with non-finite vectors are
    left out (a NaN would poison every distance to it)."""
    for uri in files:
        fs, path = uris.filesystem(uri)
        offset = 0
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = [c for c in (schemas.KEY, schemas.CAPTION) if c in pf.schema_arrow.names]
            for rb in pf.iter_batches(batch_size=READ_ROWS, columns=[*names, column]):
                table = pa.Table.from_batches([rb])
                vectors = tables.embeddings_numpy(table, column)
                finite = np.isfinite(vectors).all(axis=1)
                rows = table.select(names).append_column("file", pa.array([uri] * table.num_rows))
                rows = rows.append_column("row", pa.array(np.arange(offset, offset + table.num_rows)))
                if not finite.all():
                    log.warning("index: %d row(s) of %s with non-finite vectors left out", int((~finite).sum()), uri)
                    rows, vectors = rows.filter(pa.array(finite)), vectors[finite]
                offset += table.num_rows
                yield uri, offset, rows, unit_rows(vectors)


def train_sample(files: Sequence[str], column: str, n: int, total: int, seed: int) -> np.ndarray:
    """A seeded sample of about ``n`` unit vectors of the tables (one pass, a fraction of each batch)."""
    rng, keep = np.random.default_rng(seed), min(1.0, n / max(total, 1))
    parts = [v[rng.random(len(v)) < keep] for *_, v in read_batches(files, column)]
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


# --- building ---------------------------------------------------------------------------------------------------
def empty_index(kind: str, dim: int, n: int, cfg: IndexConfig, files: Sequence[str]) -> Any:
    """An empty (trained, for ivf) inner-product index of ``kind`` for ``n`` vectors of ``dim``."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(80, 2 * cfg.hnsw_m)
        return index
    nlist = cfg.nlist_for(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = train_sample(files, cfg.column, max(cfg.train_sample, 39 * nlist), n, cfg.seed)
    index.cp.seed = cfg.seed
    index.train(sample)
    index.nprobe = default_nprobe(nlist)
    return index


def fill(index: Any, files: Sequence[str], column: str, first_id: int = 0) -> pa.Table:
    """Add every vector of ``files`` to ``index`` (ids from ``first_id``); returns their rows table."""
    rows, next_id = [], first_id
    for _uri, _end, batch_rows, vectors in read_batches(files, column):
        if isinstance(index, (faiss.IndexFlat, faiss.IndexHNSW)):
            index.add(vectors)  # ids are the insertion order
        else:
            index.add_with_ids(vectors, np.arange(next_id, next_id + len(vectors), dtype=np.int64))
        rows.append(batch_rows)
        next_id += len(vectors)
    return pa.concat_tables(rows) if rows else pa.table({})


def fill_ivf(index: Any, files: Sequence[str], column: str) -> pa.Table:
    """``fill`` for an IVF index with each inverted list allocated once at its final size (appending doubles a
    list's buffer, up to 2x its vectors): a first pass assigns every vector to its list, the second writes each
    list in place. The result is ``fill``'s index, byte for byte."""
    assigned, rows = [], []
    for _uri, _end, batch_rows, vectors in read_batches(files, column):
        assigned.append(index.quantizer.assign(vectors, 1)[:, 0] if len(vectors) else np.zeros(0, np.int64))
        rows.append(batch_rows)
    lists = np.concatenate(assigned) if assigned else np.zeros(0, np.int64)
    invlists = index.invlists
    for list_no, size in enumerate(np.bincount(lists, minlength=index.nlist)):
        if size:
            invlists.resize(list_no, int(size))
    filled = np.zeros(index.nlist, np.int64)
    start = 0
    for _uri, _end, _rows, vectors in read_batches(files, column):
        batch_lists = lists[start:start + len(vectors)]
        order = np.argsort(batch_lists, kind="stable")  # by list, in row order within each list
        cuts = np.flatnonzero(np.diff(batch_lists[order])) + 1
        for group in np.split(order, cuts) if len(order) else []:
            list_no = int(batch_lists[group[0]])
            ids = (group + start).astype(np.int64)
            codes = np.ascontiguousarray(vectors[group]).view(np.uint8)
            invlists.update_entries(list_no, int(filled[list_no]), len(group), faiss.swig_ptr(ids),
                                    faiss.swig_ptr(codes))
            filled[list_no] += len(group)
        start += len(vectors)
    index.ntotal = start
    return pa.concat_tables(rows) if rows else pa.table({})


def _fill_remote(index_bytes: bytes, files: list[str], column: str, first_id: int) -> tuple[bytes, pa.Table]:
    """Ray task: a trained empty IVF index + its files -> the filled index (serialised) and its rows."""
    index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
    rows = fill(index, files, column, first_id)
    return faiss.serialize_index(index).tobytes(), rows


def fill_on_ray(index: Any, files: Sequence[str], counts: Sequence[int], column: str) -> pa.Table:
    """One Ray task per file fills a copy of the trained IVF ``index``; merged here in file order, the result
    equals a local build."""
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray

    runtime.ensure_ray(None)
    task = ray.remote(num_cpus=1)(_fill_remote)
    blank = ray.put(faiss.serialize_index(index).tobytes())
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    futures = [task.remote(blank, [f], column, int(s)) for f, s in zip(files, starts, strict=True)]
    rows = []
    for future in futures:  # in order: merge_from appends each list's entries with their own ids
        data, part_rows = ray.get(future)
        index.merge_from(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), 0)
        rows.append(part_rows)
    return pa.concat_tables(rows)


def use_ray(cfg: IndexConfig, kind: str, files: Sequence[str]) -> bool:
    if kind != "ivf" or len(files) < 2 or cfg.parallel == "local":
        return False
    if cfg.parallel == "ray":
        return True
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray

    return ray.is_initialized() and len([n for n in ray.nodes() if n["Alive"]]) > 1


def build_index(cfg: IndexConfig) -> dict[str, Any]:
    """Build the index of ``cfg.input`` into ``cfg.output``; returns its ``index.json``."""
    files = tables.list_table_files(cfg.input)
    info = tables.inspect_tables(files, column=cfg.column)
    storage.check_writable(cfg.output)
    kind = cfg.kind_for(info.num_rows)
    t0 = time.perf_counter()
    index = empty_index(kind, info.dim, info.num_rows, cfg, files)
    t_train = time.perf_counter() - t0
    if use_ray(cfg, kind, files):
        rows = fill_on_ray(index, files, info.rows, cfg.column)
    elif kind == "ivf":
        rows = fill_ivf(index, files, cfg.column)
    else:
        rows = fill(index, files, cfg.column)
    meta = {"kind": kind, "count": int(index.ntotal), "dim": info.dim, "metric": "cosine", "column": cfg.column,
            "clip_model": info.clip_model, "clip_pretrained": info.clip_pretrained or None,
            "nlist": int(getattr(index, "nlist", 0)), "nprobe": int(getattr(index, "nprobe", 0)),
            "hnsw_m": cfg.hnsw_m if kind == "hnsw" else None, "ef_search": HNSW_EF_SEARCH if kind == "hnsw" else None,
            "tables": list(files),
            "train_seconds": round(t_train, 2), "build_seconds": round(time.perf_counter() - t0, 2)}
    with tempfile.TemporaryDirectory(prefix="clipcap-index-") as tmp:
        faiss.write_index(index, os.path.join(tmp, INDEX))
        pq.write_table(rows, os.path.join(tmp, ROWS))
        for name in (INDEX, ROWS):
            fs, path = uris.filesystem(storage.join(cfg.output, name))
            fs.put_file(os.path.join(tmp, name), path)
    storage.write_json(meta, storage.join(cfg.output, INFO))  # last: its presence means the index is complete
    log.info("index %s: %s over %d vectors (D=%d) in %.1f s", cfg.output, kind, meta["count"], info.dim,
             meta["build_seconds"])
    return meta


# --- searching --------------------------------------------------------------------------------------------------
@dataclass
class Searcher:
    """A loaded index: its faiss index, its rows (id -> key, caption, file, row) and ``index.json``."""

    index: Any
    rows: pa.Table
    info: dict[str, Any]
    encoder: Any = None  # the CLIP of the tables, loaded on the first text / image query

    @classmethod
    def open(cls, uri: str, nprobe: int | None = None) -> Searcher:
        info = storage.read_json(storage.join(uri, INFO))
        if info is None:
            raise FileNotFoundError(f"no index at {uri!r} ({INFO} missing: build it with `clipcap index`)")
        with tempfile.TemporaryDirectory(prefix="clipcap-index-") as tmp:
            for name in (INDEX, ROWS):
                fs, path = uris.filesystem(storage.join(uri, name))
                fs.get_file(path, os.path.join(tmp, name))
            index = faiss.read_index(os.path.join(tmp, INDEX))
            rows = pq.read_table(os.path.join(tmp, ROWS))
        if nprobe and hasattr(index, "nprobe"):
            index.nprobe = int(nprobe)
        if info.get("ef_search") and hasattr(index, "hnsw"):  # a search-time setting: not in the index file
            index.hnsw.efSearch = int(info["ef_search"])
        return cls(index, rows, info)

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> list[list[dict[str, Any]]]:
        """Top ``k`` rows per query vector (cosine, highest first): rank, score, key, caption, file, row."""
        q = unit_rows(np.atleast_2d(queries))
        if q.shape[1] != self.info["dim"]:
            raise ValueError(f"query vectors have D={q.shape[1]} but the index has D={self.info['dim']}")
        scores, ids = self.index.search(q, k)
        found = ids[ids >= 0]
        picked = iter(self.rows.take(pa.array(found)).to_pylist())  # only the hits' rows, in search order
        return [[{"rank": r, "score": float(s), **next(picked)}
                 for r, (s, i) in enumerate(zip(srow, irow, strict=True)) if i >= 0]
                for srow, irow in zip(scores, ids, strict=True)]

    def clip(self) -> Any:
        # lazy: torch ~6.7 s to import (python -X importtime)
        from clipcap_core.encoders import load_encoder

        if self.encoder is None:
            if not self.info.get("clip_model"):
                raise ValueError("the index's tables do not name their CLIP model: query by key or by vector")
            self.encoder = load_encoder(EncoderConfig(model_name=self.info["clip_model"],
                                                      pretrained=self.info.get("clip_pretrained")))
        return self.encoder

    def search_text(self, texts: Sequence[str], k: int = 10) -> list[list[dict[str, Any]]]:
        return self.search_vectors(self.clip().encode_text(list(texts)), k)

    def search_images(self, paths: Sequence[str], k: int = 10) -> list[list[dict[str, Any]]]:
        clip = self.clip()
        pixels = np.stack([clip.resize(decode_image(storage_read(p))) for p in paths])
        return self.search_vectors(clip.encode_pixels(pixels), k)

    def search_keys(self, keys: Sequence[str], k: int = 10) -> list[list[dict[str, Any]]]:
        """Neighbours of rows of the index by key (the row itself comes first, at cosine 1)."""
        where = {key: i for i, key in enumerate(self.rows.column(schemas.KEY).to_pylist())}
        missing = [key for key in keys if key not in where]
        if missing:
            raise KeyError(f"key(s) not in the index: {missing[:5]}")
        vectors = []
        for key in keys:
            i = where[key]
            file, row = self.rows.column("file")[i].as_py(), self.rows.column("row")[i].as_py()
            fs, path = uris.filesystem(file)
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=[self.info["column"]])
            vectors.append(tables.embeddings_numpy(table.slice(row, 1), self.info["column"])[0])
        return self.search_vectors(np.stack(vectors), k)


def storage_read(uri: str, limit: int = 64 << 20) -> bytes:
    """The bytes of a query image at any URI, at most ``limit`` (a query is one photo, not a stream)."""
    fs, path = uris.filesystem(uri)
    with fs.open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"query image {uri} is larger than {limit} bytes")
    return data


def format_hits(queries: Sequence[str], hits: list[list[dict[str, Any]]]) -> str:
    """A plain table per query: rank, cosine, key, caption."""
    lines = []
    for query, rows in zip(queries, hits, strict=True):
        lines.append(f"# {query}")
        lines += [f"{h['rank']:>3}  {h['score']:.4f}  {h[schemas.KEY]}\t{h.get(schemas.CAPTION) or ''}" for h in rows]
    return "\n".join(lines)


def hits_table(queries: Sequence[str], hits: list[list[dict[str, Any]]]) -> pa.Table:
    return pa.Table.from_pylist([{"query": q, **h} for q, rows in zip(queries, hits, strict=True) for h in rows])

"""DeCap (arXiv 2303.03032): caption images with a decoder trained on text only, projecting an image embedding
onto a memory M of caption text embeddings: w = softmax(v . M^T / tau), prefix = normalize(w . M). The softmax
runs in float32: with tau = 0.01 the logits reach +-100.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DEFAULT_TAU = 0.01
IVF_FROM = 200_000  # memory entries from which a top-k projection searches a faiss IVF index instead of all entries
TEXT_EMBEDDING = "text_embedding"  # the column of text-embedding tables (pipelines.io.schemas owns the name)
NO_MEMORY = "projection 'memory' on a model without a DeCap memory needs a memory table (--memory URI)"


class DecapMemory:
    """Unit caption embeddings and the projection temperature. ``top_k`` > 0: the softmax over each image's
    ``top_k`` nearest entries only (the rest weigh ~0 at tau 0.01), found by ``index`` (faiss) if given."""

    def __init__(self, memory: np.ndarray | torch.Tensor, tau: float = DEFAULT_TAU, top_k: int = 0,
                 index: Any = None):
        mem = memory if torch.is_tensor(memory) else torch.tensor(np.asarray(memory, dtype=np.float32))
        if mem.ndim != 2 or mem.shape[0] == 0:
            raise ValueError(f"DeCap memory must be a non-empty (M, D) array, got {tuple(mem.shape)}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.memory = F.normalize(mem.float(), dim=-1).to(mem.dtype if mem.is_floating_point() else torch.float32)
        self.tau = float(tau)
        self.top_k, self.index = int(top_k), index

    @property
    def dim(self) -> int:
        return int(self.memory.shape[1])

    def __len__(self) -> int:
        return int(self.memory.shape[0])

    @classmethod
    def from_texts(cls, encoder: Any, texts: Sequence[str], tau: float = DEFAULT_TAU,
                   batch_size: int = 256) -> DecapMemory:
        """Memory of the CLIP text embeddings of ``texts`` (``encoder``: a ``ClipEncoder``)."""
        chunks = [encoder.encode_text(list(texts[i: i + batch_size])) for i in range(0, len(texts), batch_size)]
        return cls(np.concatenate(chunks), tau=tau)

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> DecapMemory:
        """This memory on ``device`` in ``dtype`` (done once per actor / captioner, not per batch)."""
        return DecapMemory(self.memory.to(device=device, dtype=dtype), tau=self.tau, top_k=self.top_k, index=self.index)

    def check_dim(self, clip_dim: int, *, what: str = "the model") -> None:
        _check_dim("DeCap memory", self.dim, clip_dim, what)

    def _unit(self, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = embeddings if torch.is_tensor(embeddings) else torch.as_tensor(np.asarray(embeddings, np.float32))
        if x.ndim != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"embeddings have D={x.shape[-1]} but the DeCap memory has D={self.dim}")
        return F.normalize(x.to(self.memory.device, torch.float32), dim=-1).to(self.memory.dtype)  # (N, D)

    @torch.inference_mode()
    def weights(self, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Softmax weights (N, M) float32 of each embedding over the memory entries (rows sum to 1)."""
        return (self._unit(embeddings) @ self.memory.T).float().div_(self.tau).softmax(dim=-1)

    @torch.inference_mode()
    def project(self, embeddings: np.ndarray | torch.Tensor, chunk: int = 4096) -> Any:
        """Image embeddings (N, D) -> projected unit vectors (N, D): np.float32, or a tensor for a tensor."""
        v = self._unit(embeddings)
        out = []
        for start in range(0, v.shape[0], chunk):  # bounds the (n, M) weight matrix, whatever N is
            if 0 < self.top_k < len(self):
                out.append(self._project_top_k(v[start: start + chunk]))
                continue
            w = (v[start: start + chunk] @ self.memory.T).float().div_(self.tau).softmax(dim=-1)  # (n, M)
            out.append(F.normalize((w.to(self.memory.dtype) @ self.memory).float(), dim=-1))  # (n, D)
        res = torch.cat(out) if out else torch.zeros((0, self.dim))
        if torch.is_tensor(embeddings):
            return res.to(self.memory.dtype)
        return res.cpu().numpy().astype(np.float32)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "index": None}  # a faiss index does not pickle: each process builds its own

    def knn_index(self) -> Any:
        """A faiss IVF index over a memory of ``IVF_FROM`` entries or more (built once), else None."""
        if self.index is None and len(self) >= IVF_FROM:
            mem = self.memory.float().cpu().numpy()
            nlist = int(4 * np.sqrt(len(mem)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            index.train(mem[rng.choice(len(mem), size=min(len(mem), 100_000), replace=False)])
            index.add(mem)
            index.nprobe = max(8, nlist // 16)
            self.index = index
        return self.index

    def _project_top_k(self, v: torch.Tensor) -> torch.Tensor:
        """The projection of unit vectors ``v`` (n, D) over each one's ``top_k`` nearest entries (n, D)."""
        if self.knn_index() is not None:
            sims, ids = self.index.search(v.float().cpu().numpy(), self.top_k)
            sims = torch.as_tensor(sims, device=self.memory.device)
            ids = torch.as_tensor(ids, device=self.memory.device).clamp_(min=0)
        else:
            sims, ids = (v @ self.memory.T).float().topk(self.top_k, dim=-1)  # (n, k)
        w = sims.float().div_(self.tau).softmax(dim=-1)  # (n, k)
        picked = self.memory[ids]  # (n, k, D)
        return F.normalize(torch.einsum("nk,nkd->nd", w.to(self.memory.dtype), picked).float(), dim=-1)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) for a safetensors file."""
        return {"memory": self.memory.float().cpu().contiguous()}, {"tau": repr(self.tau)}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> DecapMemory:
        return cls(tensors["memory"].float().numpy(), tau=float(metadata["tau"]))


@dataclass(frozen=True, kw_only=True)
class ProjectionConfig:
    """Which memory a captioner projects onto; ``CLI_FLAGS``: flags named otherwise, fields that are none."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"mode": "--projection", "top_k": "--projection-top-k",
                                                  "seed": None}

    mode: Literal["auto", "none", "memory"] = "auto"
    """auto: a DeCap artifact projects onto its memory; none: decode the raw image embedding; memory: project onto
    the memory table (or the artifact's memory)"""
    memory: str | None = None  # text-embedding table (clipcap embed-text) to project onto
    tau: float | None = None  # projection temperature (default: the memory's, 0.01)
    memory_size: int = 0  # seeded sample of this many memory table rows (0: all)
    seed: int = 0
    top_k: int = 0  # softmax over each image's k nearest memory entries only (large memories; 0: all)

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.memory and self.mode != "memory":
            raise ValueError(f"a memory table ({self.memory}) needs projection mode 'memory', not {self.mode!r}")
        if self.tau is not None and not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {self.memory_size}")


def resolve_projection(cfg: ProjectionConfig, own: DecapMemory | None, clip_dim: int) -> DecapMemory | None:
    """The memory to project onto (on the CPU, float32), or None; a D mismatch or a missing memory fails."""
    if cfg.mode == "none":
        return None
    memory = own
    if cfg.memory:
        memory = load_memory_table(cfg.memory, tau=cfg.tau or DEFAULT_TAU, max_rows=cfg.memory_size or None,
                                   seed=cfg.seed)
    elif cfg.mode == "memory" and own is None:
        raise ValueError(NO_MEMORY)
    if memory is None:
        return None
    if cfg.tau is not None or cfg.top_k:
        memory = DecapMemory(memory.memory, tau=cfg.tau or memory.tau, top_k=cfg.top_k)
    memory.check_dim(clip_dim)
    return memory


def _table_files(uri: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(uri)
    names = [path] if path.endswith(".parquet") else sorted(
        p for p in fs.find(path) if p.endswith(".parquet") and "/_errors/" not in p
        and not posixpath.basename(p).startswith(("_", ".")))
    if not names:
        raise FileNotFoundError(f"no text-embedding tables (*.parquet) under {uri!r}")
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if proto in ("file", "local") else f"{proto}://"
    return [prefix + n for n in names]


def _embedding_field(f: Any, file: str) -> pa.Field:
    """The ``text_embedding`` field of the Parquet file open as ``f`` (a clear error for any other table)."""
    schema = pq.read_schema(f)
    if TEXT_EMBEDDING not in schema.names:
        raise ValueError(f"{file} is not a text-embedding table: no {TEXT_EMBEDDING!r} column "
                         f"(has {schema.names}); make one with `clipcap embed-text`")
    return schema.field(TEXT_EMBEDDING)


def load_memory_table(uri: str, *, tau: float = DEFAULT_TAU, max_rows: int | None = None,
                      seed: int = 0) -> DecapMemory:
    """A memory from the ``text_embedding`` column of a text-embedding table (a folder or one file); with
    ``max_rows``, a seeded sample of that many rows chosen by key."""
    parts = []
    for file in _table_files(uri):
        with fsspec.open(file, "rb") as f:
            _embedding_field(f, file)
            f.seek(0)
            parts.append(pq.read_table(f, columns=["key", TEXT_EMBEDDING]))
    table = pa.concat_tables(parts)
    table = table.filter(pc.is_valid(table.column(TEXT_EMBEDDING)))
    if max_rows is not None and table.num_rows > max_rows:
        table = table.take(sample_rows(table.column("key").to_pylist(), max_rows, seed))
    col = table.column(TEXT_EMBEDDING).combine_chunks()
    flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    vectors = flat.reshape(-1, col.type.list_size)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():  # a NaN entry would turn every projection that weighs it into NaN
        log.warning("DeCap memory %s: %d row(s) with non-finite vectors left out", uri, int((~finite).sum()))
        vectors = vectors[finite]
    return DecapMemory(vectors, tau=tau)


def sample_rows(keys: Sequence[str], n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` rows chosen by a seeded hash of their keys (same choice whatever the row order), sorted."""
    salt = f"decap-memory:{seed}".encode()
    h = np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, key=salt).digest(), "little")
                  for k in keys], dtype=np.uint64)
    return np.sort(np.argsort(h, kind="stable")[:n])


def memory_table_dim(uri: str) -> int:
    """D of a text-embedding table from its Parquet footers (job-level checks before any work)."""
    dims = set()
    for file in _table_files(uri):
        with fsspec.open(file, "rb") as f:
            col = _embedding_field(f, file).type
        if not pa.types.is_fixed_size_list(col):
            raise ValueError(f"{file}: column {TEXT_EMBEDDING!r} must be fixed_size_list<float>[D], got {col}")
        dims.add(int(col.list_size))
    if len(dims) > 1:
        raise ValueError(f"memory table {uri} mixes dimensions {sorted(dims)}")
    return dims.pop()


def check_projection(cfg: ProjectionConfig, clip_dim: int, has_own_memory: bool) -> None:
    """Job-level checks of a projection choice without loading any memory (clear errors before work)."""
    if cfg.memory:  # implies mode "memory"
        _check_dim(f"DeCap memory table {cfg.memory}", memory_table_dim(cfg.memory), clip_dim, "the model")
    elif cfg.mode == "memory" and not has_own_memory:
        raise ValueError(NO_MEMORY)


def _check_dim(memory: str, dim: int, clip_dim: int, what: str) -> None:
    if dim != int(clip_dim):
        raise ValueError(f"{memory} has D={dim} but {what} expects clip_dim={clip_dim}: the memory must hold "
                         "text embeddings of the CLIP model the decoder was trained on")

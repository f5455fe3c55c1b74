"""Text-only (DeCap) training on Ray Train: what ``clipcap train --decoder decap`` adds to the image path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.io import schemas, tables
from pipelines.train.setup import is_preset_name

DECODERS = ("clipcap", "decap")


@dataclass(frozen=True, kw_only=True)
class DecapOptions:
    """DeCap training options (used with ``decoder="decap"``)."""

    noise_std: float = 0.0  # Gaussian noise on the normalised text embedding in training (CapDec)
    memory_size: int = 10000
    """caption embeddings stored as the projection memory (0: all), sampled with memory_seed from the training
    split"""
    memory: str | None = None  # take the memory from this text table instead of the training tables
    memory_seed: int = 0  # seed of the memory sample
    tau: float = 0.01  # projection temperature stored with the memory

    def __post_init__(self) -> None:
        if self.noise_std < 0 or self.memory_size < 0 or not self.tau > 0:
            raise ValueError(f"decap: need noise_std >= 0, memory_size >= 0 and tau > 0, got {self}")


def embedding_column(decoder: str) -> str:
    return schemas.TEXT_EMBEDDING if decoder == "decap" else schemas.IMAGE_EMBEDDING


def model_overrides(decoder: str, model: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Preset overrides with DeCap's normalised prefix input (an explicit ``False`` is kept, then refused)."""
    if decoder != "decap" or not is_preset_name(model):
        return overrides
    return {"mapping.normalize_prefix": True, **overrides}


def check_plan(decoder: str, options: DecapOptions, info: tables.TableInfo, model_cfg: Any) -> None:
    """Job-level DeCap checks on the driver, before any worker starts: unit-vector inputs, a usable memory."""
    if decoder != "decap":
        return
    if not model_cfg.mapping.normalize_prefix:
        raise ValueError("decoder 'decap' trains on unit vectors: the model needs mapping.normalize_prefix=true "
                         "(presets get it; this artifact was trained without it)")
    if options.memory:
        mem = tables.inspect_tables(tables.list_table_files(options.memory), column=schemas.TEXT_EMBEDDING)
        if mem.dim != info.dim:
            raise ValueError(f"DeCap memory table {options.memory} has D={mem.dim} but the training tables have "
                             f"D={info.dim}")
        if mem.clip_model != info.clip_model:
            raise ValueError(f"DeCap memory table {options.memory} was made with CLIP {mem.clip_model!r} but the "
                             f"training tables with {info.clip_model!r}")


def add_noise(embeds: Any, std: float) -> Any:
    """Normalised embeddings (B, D) plus N(0, std^2) noise per component (CapDec's noise injection)."""
    # lazy: torch ~6.7 s to import (python -X importtime)
    import torch
    import torch.nn.functional as F

    unit = F.normalize(embeds.float(), dim=-1)
    return unit + std * torch.randn_like(unit) if std > 0 else unit


def build_memory(options: DecapOptions, files: list[str], split: tables.Split,
                 repeats: tables.Repeats | None = None) -> Any:
    """The artifact's memory: a seeded sample of ``split`` of the training ``files`` or of ``options.memory``."""
    # lazy: torch ~6.7 s to import (python -X importtime)
    from clipcap_core.decap import DecapMemory, load_memory_table, sample_rows

    size = options.memory_size or None
    if options.memory:
        return load_memory_table(options.memory, tau=options.tau, max_rows=size, seed=options.memory_seed)
    table = tables.read_split(files, split, column=schemas.TEXT_EMBEDDING, repeats=repeats)
    if size is not None and table.num_rows > size:
        table = table.take(sample_rows(table.column(schemas.KEY).to_pylist(), size, options.memory_seed))
    return DecapMemory(tables.embeddings_numpy(table, schemas.TEXT_EMBEDDING), tau=options.tau)

"""Model set-up for ClipCap training, on the driver and in the workers: the model config (a preset + dotted
overrides, or a saved artifact's, checked against the tables), the model and tokenizer, token batches, held-out
metrics, and what text-only (DeCap) training adds (``clipcap train --decoder decap``).

The Ray Data tasks that tokenise import this module (``BatchTokenizer``), so the model, artifact and DeCap modules
are imported in the functions that use them: GPT-2's model code costs each task process ~2.5 s (torch._dynamo).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from clipcap_core.configs import from_dict, to_dict
from clipcap_core.encoders import EncoderConfig
from clipcap_core.metrics import scorer_for
from clipcap_core.tokenizer import WORD, WORD_TOKENIZER_OF_CLIP, load_tokenizer, start_token_id
from pipelines.io import schemas, storage, tables


# --- the model config and the model -------------------------------------------------------------------------
def is_preset_name(model: str) -> bool:
    from clipcap_core.presets import PRESETS

    return model in PRESETS


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(d.get(p), dict):
            raise ValueError(f"model override {key!r}: {p!r} is not a config section")
        d = d[p]
    if last not in d:
        raise ValueError(f"model override {key!r}: unknown key {last!r} (known: {', '.join(sorted(d))})")
    d[last] = value


def resolve_model_config(model: str, overrides: dict[str, Any], info: tables.TableInfo) -> Any:
    """The ModelConfig to train: a preset (+ dotted overrides) or a saved artifact's, checked against the tables."""
    from clipcap_core.model import ModelConfig
    from clipcap_core.presets import preset_config

    if is_preset_name(model):
        data = to_dict(preset_config(model))
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        if "clip_dim" in overrides:
            tables.check_model_dim(info, int(overrides["clip_dim"]), what="model config (clip_dim override)")
        data["clip_dim"] = info.dim
        if data.get("tokenizer") == WORD and "tokenizer" not in overrides:
            data["tokenizer"] = WORD_TOKENIZER_OF_CLIP.get(info.clip_model or "", WORD)
        if info.clip_model:
            data["encoder"] = to_dict(EncoderConfig(model_name=info.clip_model,
                                                    pretrained=info.clip_pretrained or None))
        return from_dict(ModelConfig, data)
    if overrides:
        raise ValueError(f"model overrides {sorted(overrides)} apply to presets only; {model!r} is an artifact "
                         "(warm start keeps its architecture)")
    from clipcap_core.artifacts import read_config

    cfg = read_config(model)
    tables.check_model_dim(info, cfg.clip_dim, what=f"model artifact {model}")
    if info.clip_model and cfg.encoder.model_name and info.clip_model != cfg.encoder.model_name:
        raise ValueError(f"CLIP mismatch: the embedding tables were made with {info.clip_model!r} but model artifact "
                         f"{model} was trained on {cfg.encoder.model_name!r} embeddings (same D, different space)")
    return cfg


def recipe_for(model: str) -> Any:
    """The recipe a run starts from: the preset's, or a warm-started artifact's own (nightly keeps its settings)."""
    from clipcap_core.artifacts import read_metadata
    from clipcap_core.presets import preset_recipe
    from clipcap_core.training import PAPER_RECIPE, RECIPE_FIELDS

    if is_preset_name(model):
        return preset_recipe(model)
    trained = (read_metadata(model).get("training") or {}).get("train") or {}
    return dataclasses.replace(PAPER_RECIPE, **{k: trained[k] for k in RECIPE_FIELDS if trained.get(k) is not None})


def build_or_load_model(model: str, model_cfg: Any, *, seed: int, device: str | Any = "cpu") -> tuple[Any, Any]:
    """(ClipCapModel, tokenizer): a seeded new model for a preset, the saved one for an artifact (warm start)."""
    if is_preset_name(model):
        from clipcap_core.model import build_model as core_build

        tokenizer = load_tokenizer(model_cfg.tokenizer_source)
        torch.manual_seed(seed)
        return core_build(model_cfg, tokenizer).to(device), tokenizer
    from clipcap_core.artifacts import load_model

    loaded = load_model(model, device=str(device))
    return loaded.model, loaded.tokenizer


def load_tokenizer_for(model: str, model_cfg: Any) -> Any:
    if is_preset_name(model):
        return load_tokenizer(model_cfg.tokenizer_source)
    from clipcap_core.artifacts import read_metadata

    return load_tokenizer(storage.join(model, read_metadata(model)["weights"]["tokenizer"]))


# --- batches ------------------------------------------------------------------------------------------------
class BatchTokenizer:
    """captions -> (tokens (B,T) int64, mask (B,T) float32), exactly as ``training.collate`` builds them, with
    one batched call per block into the Rust tokenizer."""

    def __init__(self, tokenizer: Any, max_tokens: int):
        self.max_tokens = max_tokens
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        start = start_token_id(tokenizer)
        self.head = [] if start is None else [start]
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend if backend is not None and hasattr(backend, "encode_batch_fast") else None
        self.tokenizer = None if self.backend is not None else tokenizer  # slow tokenizers: the HF call

    def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.backend is not None:  # no offsets, no BatchEncoding: ~2x the HF call
            ids = [e.ids for e in self.backend.encode_batch_fast(list(captions), add_special_tokens=False)]
        else:
            ids = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        if self.head:
            ids = [self.head + row for row in ids]
        T = min(self.max_tokens, max((len(x) for x in ids), default=0) + 1)
        tokens = np.full((len(ids), T), self.pad, dtype=np.int64)
        mask = np.zeros((len(ids), T), dtype=np.float32)
        for i, row in enumerate(ids):
            n = min(len(row), self.max_tokens - 1)
            tokens[i, :n] = row[:n]
            tokens[i, n] = self.eos  # every caption ends with end-of-text, a target too (generation learns to stop)
            mask[i, : n + 1] = 1.0
        return tokens, mask


def to_core_batch(batch: dict[str, Any]) -> Any:
    """A Ray Data batch (padded to max tokens) -> ``training.Batch`` trimmed to its longest caption."""
    from clipcap_core.training import Batch

    mask = batch["mask"]
    T = int(mask.sum(1).max())  # per-batch padding: drop columns that are padding in every row
    return Batch(batch["embedding"], batch["tokens"][:, :T], mask[:, :T])


def evaluate_model(model: Any, tokenizer: Any, heldout: pa.Table, *, max_tokens: int = 40,
                   batch_size: int = 64) -> dict[str, float]:
    """Held-out loss + greedy-caption metrics (exact match, BLEU-4, CIDEr, CLIPScore) of ``model`` on ``heldout``."""
    from clipcap_core.training import collate, evaluate_captions, evaluate_loss

    captions = heldout.column("caption").to_pylist()
    emb = tables.embeddings_numpy(heldout)
    batches = (collate(tokenizer, captions[s: s + batch_size], emb[s: s + batch_size], max_tokens)
               for s in range(0, len(captions), batch_size))
    metrics = {"val_loss": evaluate_loss(model, batches)}
    scores = evaluate_captions(model, tokenizer, emb, captions, max_length=max_tokens, batch_size=batch_size,
                               clip_scorer=scorer_for(model.config.encoder, emb.shape[1]))
    metrics.update({k: float(v) for k, v in scores.items() if k != "n"})
    return metrics


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
    unit = F.normalize(embeds.float(), dim=-1)
    return unit + std * torch.randn_like(unit) if std > 0 else unit


def build_memory(options: DecapOptions, files: list[str], split: tables.Split,
                 repeats: tables.Repeats | None = None) -> Any:
    """The artifact's memory: a seeded sample of ``split`` of the training ``files`` or of ``options.memory``."""
    from clipcap_core.decap import DecapMemory, load_memory_table, sample_rows

    size = options.memory_size or None
    if options.memory:
        return load_memory_table(options.memory, tau=options.tau, max_rows=size, seed=options.memory_seed)
    table = tables.read_split(files, split, column=schemas.TEXT_EMBEDDING, repeats=repeats)
    if size is not None and table.num_rows > size:
        table = table.take(sample_rows(table.column(schemas.KEY).to_pylist(), size, options.memory_seed))
    return DecapMemory(tables.embeddings_numpy(table, schemas.TEXT_EMBEDDING), tau=options.tau)

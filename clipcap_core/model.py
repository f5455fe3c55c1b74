"""The ClipCap model: a mapping network (CLIP embedding (B, D) -> k prefix vectors (B, k, E)) + a GPT-2-family LM,
fine-tuned or frozen (no gradients, eval mode). ``mlp`` / ``transformer`` compute what the released ClipCap
checkpoints do; ``linear`` is DeCap's projection. The loss covers caption tokens only; captions are
right-padded, so under the causal mask only a loss mask is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from clipcap_core.encoders import EncoderConfig
from clipcap_core.uris import local_copy


@dataclass(frozen=True, kw_only=True)
class MappingConfig:
    kind: Literal["mlp", "linear", "transformer"] = "mlp"
    prefix_length: int = 10  # k: number of prefix vectors fed to the LM
    clip_length: int = 10  # transformer only: tokens made from the CLIP embedding
    num_layers: int = 8  # transformer only
    num_heads: int = 8  # transformer only
    mlp_ratio: float = 2.0  # transformer only: hidden width of each block's MLP / E
    normalize_prefix: bool = False  # L2-normalise the CLIP embedding before mapping

    def __post_init__(self) -> None:
        for name in ("prefix_length", "clip_length", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"mapping.{name} must be >= 1, got {getattr(self, name)}")


class MLPMapping(nn.Module):
    def __init__(self, cfg: MappingConfig, clip_dim: int, lm_dim: int):
        super().__init__()
        self.k, self.lm_dim = cfg.prefix_length, lm_dim
        hidden = cfg.prefix_length * lm_dim // 2
        self.net = nn.Sequential(nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, cfg.prefix_length * lm_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, k, E)
        return self.net(x).view(x.shape[0], self.k, self.lm_dim)


class LinearMapping(nn.Module):
    def __init__(self, cfg: MappingConfig, clip_dim: int, lm_dim: int):
        super().__init__()
        self.k, self.lm_dim = cfg.prefix_length, lm_dim
        self.linear = nn.Linear(clip_dim, cfg.prefix_length * lm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, k, E)
        return self.linear(x).view(x.shape[0], self.k, self.lm_dim)


class Attention(nn.Module):
    """Multi-head self-attention; q and kv projections carry no bias (as in the released checkpoints)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"LM width {dim} is not divisible by mapping.num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, E)
        B, N, E = x.shape
        H = self.num_heads
        q = self.q(x).view(B, N, H, E // H).transpose(1, 2)  # (B, H, N, E/H)
        k, v = self.kv(x).view(B, N, 2, H, E // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, E/H)
        att = (q @ k.transpose(-2, -1)) * (E // H) ** -0.5  # (B, H, N, N), no mask: every token sees all
        out = att.softmax(dim=-1) @ v  # (B, H, N, E/H)
        return self.proj(out.transpose(1, 2).reshape(B, N, E))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln_1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerMapping(nn.Module):
    def __init__(self, cfg: MappingConfig, clip_dim: int, lm_dim: int):
        super().__init__()
        self.clip_length, self.lm_dim = cfg.clip_length, lm_dim
        self.linear = nn.Linear(clip_dim, cfg.clip_length * lm_dim)
        self.prefix_const = nn.Parameter(torch.randn(cfg.prefix_length, lm_dim))
        self.blocks = nn.ModuleList(Block(lm_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, k, E)
        clip_tokens = self.linear(x).view(x.shape[0], self.clip_length, self.lm_dim)  # (B, L, E)
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, k, E)
        h = torch.cat((clip_tokens, const), dim=1)  # (B, L + k, E)
        for block in self.blocks:
            h = block(h)
        return h[:, self.clip_length:]


MAPPINGS: dict[str, type[nn.Module]] = {"mlp": MLPMapping, "linear": LinearMapping,
                                         "transformer": TransformerMapping}


class Mapping(nn.Module):
    """The configured mapping network plus optional L2 normalisation of its input."""

    def __init__(self, cfg: MappingConfig, clip_dim: int, lm_dim: int):
        super().__init__()
        if cfg.kind not in MAPPINGS:
            raise ValueError(f"unknown mapping kind {cfg.kind!r} (known: {sorted(MAPPINGS)})")
        self.cfg, self.clip_dim = cfg, clip_dim
        self.net = MAPPINGS[cfg.kind](cfg, clip_dim, lm_dim)

    def forward(self, clip_embeds: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, k, E)
        if clip_embeds.ndim != 2 or clip_embeds.shape[1] != self.clip_dim:
            raise ValueError(f"expected CLIP embeddings of shape (B, {self.clip_dim}), got {tuple(clip_embeds.shape)}")
        if self.cfg.normalize_prefix:
            clip_embeds = F.normalize(clip_embeds, dim=-1)
        return self.net(clip_embeds)


@dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Which LM: with ``config``, a seeded random GPT-2 of that shape (``GPT2Config`` kwargs); else
    ``name_or_path``, a hub id, local directory or fsspec URI of a ``from_pretrained`` directory."""

    name_or_path: str = "gpt2"
    config: dict[str, Any] | None = None
    seed: int = 0
    freeze: bool = False


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    clip_dim: int = 512  # D of the CLIP embeddings the model consumes
    mapping: MappingConfig = field(default_factory=MappingConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    tokenizer: str | None = None  # "word", hub name, dir or URI; None: the LM's own tokenizer
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the CLIP that made the embeddings

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer or self.lm.name_or_path

    def __post_init__(self) -> None:
        if self.clip_dim < 1:
            raise ValueError(f"clip_dim must be >= 1, got {self.clip_dim}")


@dataclass
class ClipCapOutput:
    loss: torch.Tensor | None  # scalar mean cross-entropy over caption tokens (None without tokens)
    logits: torch.Tensor  # (B, T, V): logits[:, i] predicts tokens[:, i]


def build_lm(cfg: LMConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """Create (``cfg.config``, seeded; vocabulary from ``tokenizer``) or load (``cfg.name_or_path``) the LM."""
    if cfg.config is not None:
        kwargs = dict(cfg.config)
        if tokenizer is not None:
            kwargs.setdefault("vocab_size", len(tokenizer))
            kwargs.setdefault("bos_token_id", tokenizer.eos_token_id)
            kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return GPT2LMHeadModel(GPT2Config(**kwargs))
    return load_pretrained_lm(cfg.name_or_path)


def load_pretrained_lm(name_or_path: str) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` for a hub id, local dir or fsspec URI (copied locally first)."""
    try:
        with local_copy(name_or_path) as local:  # a hub id or local path is used as it is
            return AutoModelForCausalLM.from_pretrained(str(local))
    except OSError as exc:
        raise OSError(f"cannot load language model {name_or_path!r} (hub name, local dir or URI): {exc}") from exc


class ClipCapModel(nn.Module):
    def __init__(self, cfg: ModelConfig, lm: PreTrainedModel):
        super().__init__()
        self.config = cfg
        self.lm = lm
        self.mapping = Mapping(cfg.mapping, cfg.clip_dim, self.lm_dim)
        if cfg.lm.freeze:
            self.lm.requires_grad_(False)
            self.lm.eval()

    @property
    def lm_dim(self) -> int:
        return int(self.lm.get_input_embeddings().weight.shape[1])

    @property
    def prefix_length(self) -> int:
        return self.config.mapping.prefix_length

    @property
    def device(self) -> torch.device:
        return next(self.mapping.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    def train(self, mode: bool = True) -> ClipCapModel:
        super().train(mode)
        if self.config.lm.freeze:
            self.lm.eval()  # a frozen LM never uses dropout
        return self

    def prefix(self, clip_embeds: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, k, E)
        return self.mapping(clip_embeds.to(self.device, next(self.mapping.parameters()).dtype)).to(self.dtype)

    def forward(self, clip_embeds: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                label_smoothing: float = 0.0) -> ClipCapOutput:
        """clip_embeds (B, D), tokens (B, T) long, mask (B, T) 1 = real token -> loss + logits (B, T, V)."""
        k = self.prefix_length
        prefix = self.prefix(clip_embeds)  # (B, k, E)
        embeds = torch.cat((prefix, self.lm.get_input_embeddings()(tokens)), dim=1)  # (B, k + T, E)
        hidden = self.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        # Only positions k-1 .. k+T-2 predict caption tokens: skip the LM head on the rest.
        logits = self.lm.get_output_embeddings()(hidden[:, k - 1: -1])  # (B, T, V)
        loss = caption_loss(logits, tokens, mask, label_smoothing)
        return ClipCapOutput(loss=loss, logits=logits)


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean (label-smoothed) cross-entropy over the tokens where ``mask`` is 1 (all when mask is None)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none",
                          label_smoothing=label_smoothing)  # (B*T,)
    if mask is None:
        return nll.mean()
    m = mask.flatten().to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp_min(1.0)


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                lm: PreTrainedModel | None = None) -> ClipCapModel:
    """A new ClipCap model: mapping initialised from the global torch seed, LM from ``cfg.lm`` (or ``lm``)."""
    if lm is None:
        lm = build_lm(cfg.lm, tokenizer)
    if tokenizer is not None and len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LM's vocabulary is only "
                         f"{lm.get_input_embeddings().weight.shape[0]}")
    return ClipCapModel(cfg, lm)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---- prefix interpretation (ClipCap paper, Fig. 6): the vocabulary tokens nearest to each prefix vector ----
@torch.inference_mode()
def nearest_tokens(model: ClipCapModel, clip_embeds: np.ndarray | torch.Tensor, top_k: int = 1,
                   metric: Literal["cosine", "l2"] = "cosine") -> torch.Tensor:
    """Token ids (N, k, top_k) nearest to each of the k prefix vectors of each embedding."""
    prefix = model.prefix(torch.as_tensor(np.asarray(clip_embeds, dtype=np.float32))).float()  # (N, k, E)
    vocab = model.lm.get_input_embeddings().weight.float()  # (V, E)
    if metric == "cosine":
        sim = F.normalize(prefix, dim=-1) @ F.normalize(vocab, dim=-1).T  # (N, k, V)
    elif metric == "l2":
        sim = -torch.cdist(prefix, vocab.unsqueeze(0).expand(prefix.shape[0], -1, -1))  # (N, k, V)
    else:
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    return sim.topk(top_k, dim=-1).indices


def interpret_prefix(model: ClipCapModel, tokenizer: PreTrainedTokenizerBase, clip_embeds: np.ndarray,
                     top_k: int = 1, metric: Literal["cosine", "l2"] = "cosine") -> list[list[list[str]]]:
    """For each embedding, for each prefix vector, its ``top_k`` nearest tokens as strings."""
    ids = nearest_tokens(model, clip_embeds, top_k, metric).tolist()
    return [[[tokenizer.decode([t]).strip() for t in pos] for pos in image] for image in ids]

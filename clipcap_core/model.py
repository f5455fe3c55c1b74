"""The ClipCap model: mapping network prefix + GPT-2-family LM, with the LM fine-tuned or truly frozen.

The LM sees [p_1..p_k, t_1..t_T]; the loss covers caption tokens only. Captions are right-padded, so under the
causal mask no real position attends to padding: only a loss mask is needed. A frozen LM has no weight gradients
and stays in eval mode, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
from clipcap_core.mapping import Mapping, MappingConfig
from clipcap_core.uris import is_remote, local_copy


@dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Which language model. ``config`` set: a randomly initialised GPT-2 of that shape (``GPT2Config``
    keyword arguments; ``vocab_size`` defaults to the tokenizer's), seeded by ``seed`` (the tiny preset).
    Otherwise ``name_or_path``: hub id, local directory or fsspec URI of a ``from_pretrained`` directory."""

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
        if is_remote(name_or_path):
            with local_copy(name_or_path) as local:
                return AutoModelForCausalLM.from_pretrained(str(local))
        return AutoModelForCausalLM.from_pretrained(name_or_path)
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
    """Mean cross-entropy over the tokens where ``mask`` is 1 (all tokens when mask is None); with
    ``label_smoothing`` eps each target is (1 - eps) one-hot + eps uniform, as torch's ``cross_entropy``."""
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

"""Mapping networks: a CLIP embedding (B, D) -> k prefix vectors (B, k, E) in the LM's embedding space.

``mlp`` and ``transformer`` compute exactly what the released ClipCap checkpoints do (``reference.py`` maps
their keys); ``linear`` is the DeCap authors' projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


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
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
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

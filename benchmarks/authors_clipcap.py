"""The authors' ClipCap (rmokady/CLIP_prefix_caption) re-written from their code: the ``ClipCaptionModel`` module
layout, their ``generate2`` / ``generate_beam`` decoding, and our weights exported in their layout. No user path
runs it: it is the baseline the speed benchmarks time and the oracle the tests compare our decoding against.
"""

from __future__ import annotations

import torch
from torch import nn

from clipcap_core.model import ClipCapModel, MappingConfig
from clipcap_core.reference import translate_key


class _AuthorsAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.to_queries(x).reshape(b, n, h, c // h)
        kv = self.to_keys_values(x).reshape(b, n, 2, h, c // h)
        att = torch.einsum("bnhd,bmhd->bnmh", q, kv[:, :, 0]) * (c // h) ** -0.5
        out = torch.einsum("bnmh,bmhd->bnhd", att.softmax(dim=2), kv[:, :, 1]).reshape(b, n, c)
        return self.project(out)


class _AuthorsMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class _AuthorsLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = _AuthorsAttention(dim, heads), _AuthorsMlp(dim, dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _AuthorsTransformerMapper(nn.Module):
    def __init__(self, clip_dim: int, dim: int, prefix_length: int, clip_length: int, num_layers: int):
        super().__init__()
        self.clip_length = clip_length
        self.linear = nn.Linear(clip_dim, clip_length * dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim))
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(_AuthorsLayer(dim, 8) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x).view(x.shape[0], self.clip_length, -1)
        h = torch.cat((h, self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)), dim=1)
        for layer in self.transformer.layers:
            h = layer(h)
        return h[:, self.clip_length:]


class _AuthorsMLP(nn.Module):
    def __init__(self, clip_dim: int, dim: int, prefix_length: int):
        super().__init__()
        k_e = dim * prefix_length
        self.model = nn.Sequential(nn.Linear(clip_dim, k_e // 2), nn.Tanh(), nn.Linear(k_e // 2, k_e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class AuthorsClipCap(nn.Module):
    """Their ``ClipCaptionModel`` layout around a given GPT-2 (``gpt``): ``clip_project(x)`` -> prefix."""

    def __init__(self, gpt: nn.Module, mapping: MappingConfig, clip_dim: int):
        super().__init__()
        self.gpt, self.prefix_length = gpt, mapping.prefix_length
        dim = gpt.get_input_embeddings().weight.shape[1]
        if mapping.kind == "mlp":
            self.clip_project: nn.Module = _AuthorsMLP(clip_dim, dim, mapping.prefix_length)
        else:
            self.clip_project = _AuthorsTransformerMapper(clip_dim, dim, mapping.prefix_length,
                                                          mapping.clip_length, mapping.num_layers)

    def prefix(self, clip_embeds: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, k, E)
        return self.clip_project(clip_embeds).reshape(clip_embeds.shape[0], self.prefix_length, -1)

    def forward(self, tokens: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:  # -> logits (B, k + T, V)
        embeds = torch.cat((self.prefix(prefix), self.gpt.transformer.wte(tokens)), dim=1)
        return self.gpt(inputs_embeds=embeds).logits


# ---- their decoding --------------------------------------------------------------------------------------------
def _gpt(model: nn.Module) -> nn.Module:
    return model.gpt if hasattr(model, "gpt") else model.lm


@torch.no_grad()
def generate2(model: nn.Module, tokenizer, embed: torch.Tensor, entry_length: int = 67, top_p: float = 0.8,
              temperature: float = 1.0, stop_token: str = ".") -> str:
    """Their greedy decoding for one prefix ``embed`` (1, k, E): nucleus filter then argmax, no KV cache."""
    gpt = _gpt(model).eval()
    stop = tokenizer.encode(stop_token)[0]
    generated, tokens = embed, None
    for _ in range(entry_length):
        logits = gpt(inputs_embeds=generated).logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        remove = torch.cumsum(sorted_logits.softmax(-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[:, sorted_idx[remove]] = -float("inf")
        nxt = torch.argmax(logits, -1).unsqueeze(0)  # (1, 1)
        tokens = nxt if tokens is None else torch.cat((tokens, nxt), dim=1)
        generated = torch.cat((generated, gpt.transformer.wte(nxt)), dim=1)
        if stop == nxt.item():
            break
    return tokenizer.decode(tokens.squeeze(0).tolist())


@torch.no_grad()
def generate_beam(model: nn.Module, tokenizer, embed: torch.Tensor, beam_size: int = 5, entry_length: int = 67,
                  temperature: float = 1.0, stop_token: str = ".") -> list[str]:
    """Their beam search for one prefix ``embed`` (1, k, E); captions best first."""
    gpt = _gpt(model).eval()
    stop = tokenizer.encode(stop_token)[0]
    tokens = scores = None
    lengths = torch.ones(beam_size, device=embed.device)
    stopped = torch.zeros(beam_size, device=embed.device, dtype=torch.bool)
    generated = embed
    for _ in range(entry_length):
        logits = gpt(inputs_embeds=generated).logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
        logits = logits.softmax(-1).log()
        if scores is None:
            scores, nxt = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            nxt, scores = nxt.permute(1, 0), scores.squeeze(0)
            tokens = nxt
        else:
            logits[stopped] = -float("inf")
            logits[stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            lengths[~stopped] += 1
            avg, nxt = (scores_sum / lengths[:, None]).view(-1).topk(beam_size, -1)
            src = nxt // scores_sum.shape[1]
            lengths, nxt = lengths[src], (nxt % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[src], nxt), dim=1)
            generated, scores, stopped = generated[src], avg * lengths, stopped[src]
        generated = torch.cat((generated, gpt.transformer.wte(nxt.squeeze(1)).view(beam_size, 1, -1)), dim=1)
        stopped = stopped + nxt.eq(stop).squeeze(1)
        if stopped.all():
            break
    order = (scores / lengths).argsort(descending=True)
    texts = [tokenizer.decode(row[: int(n)]) for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True)]
    return [texts[i] for i in order.tolist()]


def export_reference_state_dict(model: ClipCapModel, legacy_buffers: bool = False) -> dict[str, torch.Tensor]:
    """Our model's weights in the authors' layout (``clip_project.*``, ``gpt.*``)."""
    kind = model.config.mapping.kind
    state = {f"clip_project.{translate_key(k, kind, to_ours=False)}": v.clone()
             for k, v in model.mapping.state_dict().items()}
    state.update({f"gpt.{k}": v.clone() for k, v in model.lm.state_dict().items()})
    if legacy_buffers:  # what GPT-2 state dicts saved by transformers < 4.31 carry
        n_pos = model.lm.config.n_positions
        for i in range(model.lm.config.n_layer):
            state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
            state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state

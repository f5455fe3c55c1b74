"""The authors' ClipCap (rmokady/CLIP_prefix_caption): model layout, decoding (the tests' oracle and the
benchmark baseline) and checkpoint import; and the import of the DeCap authors' decoder (dhg-wei/DeCap).
Checkpoints load with ``weights_only=True``: no pickled code runs.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass

import fsspec
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from clipcap_core.artifacts import fit_problems, load_weights_into, save_model
from clipcap_core.decap import DEFAULT_TAU, load_memory_table
from clipcap_core.encoders import EncoderConfig
from clipcap_core.model import ClipCapModel, LMConfig, MappingConfig, ModelConfig, load_pretrained_lm
from clipcap_core.tokenizer import CLIP_BPE, load_tokenizer
from clipcap_core.uris import local_copy

# what GPT-2 state dicts saved by transformers < 4.31 carry: in both authors' checkpoints, never loaded
LEGACY_BUFFERS = re.compile(r"^(gpt|decoder)\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


# ---- their module layout -------------------------------------------------------------------------------------
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


# ---- key layout: theirs <-> ours --------------------------------------------------------------------------------
# (their key under clip_project., our key under mapping.); {i}: layer index, {p}: weight | bias
_KEY_PAIRS = {
    "mlp": [("model.0.{p}", "net.net.0.{p}"), ("model.2.{p}", "net.net.2.{p}")],
    "transformer": [
        ("linear.{p}", "net.linear.{p}"),
        ("prefix_const", "net.prefix_const"),
        ("transformer.layers.{i}.norm1.{p}", "net.blocks.{i}.ln_1.{p}"),
        ("transformer.layers.{i}.norm2.{p}", "net.blocks.{i}.ln_2.{p}"),
        ("transformer.layers.{i}.attn.to_queries.weight", "net.blocks.{i}.attn.q.weight"),
        ("transformer.layers.{i}.attn.to_keys_values.weight", "net.blocks.{i}.attn.kv.weight"),
        ("transformer.layers.{i}.attn.project.{p}", "net.blocks.{i}.attn.proj.{p}"),
        ("transformer.layers.{i}.mlp.fc1.{p}", "net.blocks.{i}.mlp.0.{p}"),
        ("transformer.layers.{i}.mlp.fc2.{p}", "net.blocks.{i}.mlp.2.{p}"),
    ],
}


def _regex(template: str) -> str:
    return re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")


def translate_key(key: str, kind: str, to_ours: bool = True) -> str | None:
    """Map a mapping-network key between the authors' layout and ours (None if it has no counterpart)."""
    src, dst = (0, 1) if to_ours else (1, 0)
    for pair in _KEY_PAIRS[kind]:
        if m := re.fullmatch(_regex(pair[src]), key):
            return pair[dst].format(**m.groupdict())
    return None


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


# ---- import ------------------------------------------------------------------------------------------------------
DEFAULT_ENCODERS = {512: ("ViT-B-32", "openai"), 640: ("RN50x4", "openai"), 768: ("ViT-L-14", "openai")}


@dataclass
class ImportResult:
    config: ModelConfig
    lm_saved: bool  # True: the checkpoint's LM differs from the base LM (or the base has no weights): saved


def import_reference_checkpoint(ckpt: str, out: str, mapping: MappingConfig, clip_dim: int, lm: str = "gpt2",
                                tokenizer: str | None = None, encoder: EncoderConfig | None = None) -> ImportResult:
    """Convert a state dict in the authors' layout at ``ckpt`` (any fsspec URI) into our artifact at ``out``."""
    if mapping.kind == "transformer" and mapping.num_heads != 8:
        raise ValueError("the authors' transformer mapper always has 8 heads: use num_heads=8")
    state = read_state_dict(ckpt)
    unknown = sorted(k for k in state if not k.startswith(("clip_project.", "gpt.")))
    if unknown:
        raise ValueError(f"{ckpt}: unexpected keys (not clip_project.* / gpt.*): {unknown[:5]}")
    mapping_state = _their_mapping_state(state, mapping.kind, ckpt)
    gpt_state = {k[4:]: v for k, v in state.items() if k.startswith("gpt.") and not LEGACY_BUFFERS.match(k)}
    lm_model, lm_saved = _lm_for_import(lm, gpt_state, ckpt)
    cfg = ModelConfig(clip_dim=clip_dim, mapping=mapping, lm=LMConfig(name_or_path=lm, freeze=not lm_saved),
                      tokenizer=tokenizer, encoder=encoder or _default_encoder(clip_dim))
    model = ClipCapModel(cfg, lm_model)
    load_weights_into(model.mapping, mapping_state, f"{ckpt} with {_flags(mapping, clip_dim)}",
                      show=lambda k: f"clip_project.{translate_key(k, mapping.kind, to_ours=False)}")
    save_model(model, load_tokenizer(cfg.tokenizer_source), out, extra={"imported_from": str(ckpt)})
    return ImportResult(config=cfg, lm_saved=lm_saved)


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a flat state dict at any fsspec URI."""
    try:
        with fsspec.open(uri, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{uri} cannot be read as a weights-only state dict (nothing was executed): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{uri} is not a flat state dict of tensors")
    return state


def _flags(mapping: MappingConfig, clip_dim: int) -> str:
    extra = (f" --clip-length {mapping.clip_length} --num-layers {mapping.num_layers}"
             if mapping.kind == "transformer" else "")
    return f"--mapping {mapping.kind} --prefix-length {mapping.prefix_length}{extra} --clip-dim {clip_dim}"


def _their_mapping_state(state: dict[str, torch.Tensor], kind: str, ckpt: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith("clip_project."):
            continue
        ours = translate_key(key[len("clip_project."):], kind)
        if ours is None:
            raise ValueError(f"{ckpt}: unexpected key {key} for --mapping {kind} (wrong mapping type?)")
        out[ours] = value
    if not out:
        raise ValueError(f"{ckpt}: no clip_project.* keys: not a ClipCap checkpoint")
    return out


def _lm_for_import(source: str, gpt_state: dict[str, torch.Tensor], ckpt: str) -> tuple[nn.Module, bool]:
    """(LM holding the checkpoint's weights or the base weights, whether it must be saved in the artifact)."""
    if not gpt_state:
        return load_pretrained_lm(source), False
    try:
        base = load_pretrained_lm(source)
    except OSError:
        base = None  # e.g. a directory holding only config.json
    lm = base if base is not None else _lm_from_config(source)
    expected = lm.state_dict()
    tied = getattr(lm.config, "tie_word_embeddings", False)
    needed = {k: tuple(v.shape) for k, v in expected.items() if k in gpt_state or not (tied and k == "lm_head.weight")}
    problems = fit_problems(needed, {k: tuple(v.shape) for k, v in gpt_state.items()}, show=lambda k: f"gpt.{k}")
    if problems:
        raise ValueError(f"{ckpt}: LM weights do not fit {source!r}: {'; '.join(problems)}")
    same = base is not None and all(torch.equal(expected[k], v) for k, v in gpt_state.items())
    if not same:
        lm.load_state_dict(gpt_state, strict=False, assign=base is None)  # assign: a skeleton on "meta"
        if tied:
            lm.tie_weights()
        if any(t.is_meta for t in [*lm.parameters(), *lm.buffers()]):
            raise ValueError(f"{ckpt}: the checkpoint's LM weights leave parts of {source!r} uninitialised")
    return lm, not same


def _lm_from_config(source: str) -> nn.Module:
    try:
        with local_copy(source) as local:
            config = AutoConfig.from_pretrained(str(local))
    except OSError as exc:
        raise OSError(f"--lm {source!r}: need a hub name or a directory with the LM config: {exc}") from exc
    with torch.device("meta"):  # a skeleton: every weight comes from the checkpoint (no random init)
        return AutoModelForCausalLM.from_config(config)


# ---- the DeCap authors' decoder -----------------------------------------------------------------------------
DECAP_HEADS = 4  # n_head of their decoder_config.pkl
_PROJECT = ("clip_project.model.0.weight", "clip_project.model.0.bias")


def import_decap_checkpoint(ckpt: str, out: str, *, encoder: EncoderConfig | None = None, memory: str | None = None,
                            tau: float = DEFAULT_TAU, n_head: int = DECAP_HEADS) -> ImportResult:
    """Convert their ``DeCap`` state dict at ``ckpt`` into our artifact at ``out`` (keeping ``memory``)."""
    state = read_state_dict(ckpt)
    unknown = sorted(k for k in state if not (k in _PROJECT or k.startswith("decoder.")))
    if unknown or not all(k in state for k in _PROJECT):
        raise ValueError(f"{ckpt}: not a DeCap checkpoint (need {list(_PROJECT)} and decoder.*; "
                         f"unexpected {unknown[:5]})")
    clip_dim = int(state[_PROJECT[0]].shape[1])
    tokenizer = load_tokenizer(CLIP_BPE)
    lm_config = decoder_config(state, len(tokenizer), n_head, ckpt)
    cfg = ModelConfig(clip_dim=clip_dim, mapping=MappingConfig(kind="linear", prefix_length=1, normalize_prefix=True),
                      lm=LMConfig(name_or_path="decap-decoder", config=lm_config, freeze=False),
                      tokenizer=CLIP_BPE, encoder=encoder or _default_encoder(clip_dim))
    model = ClipCapModel(cfg, _decoder(state, lm_config, tokenizer.eos_token_id, ckpt))
    load_weights_into(model.mapping, {"net.linear.weight": state[_PROJECT[0]], "net.linear.bias": state[_PROJECT[1]]},
                      f"{ckpt} (DeCap clip_project)")
    decap = None
    if memory is not None:
        decap = load_memory_table(memory, tau=tau)
        decap.check_dim(clip_dim, what="the DeCap checkpoint")
    save_model(model, tokenizer, out, extra={"imported_from": str(ckpt), "reference": "decap"}, decap=decap)
    return ImportResult(config=cfg, lm_saved=True)


def decoder_config(state: dict[str, torch.Tensor], vocab_size: int, n_head: int, ckpt: str) -> dict[str, int]:
    """``GPT2Config`` sizes of their decoder read from the state dict (vocabulary cut to ``vocab_size``)."""
    wte = state.get("decoder.transformer.wte.weight")
    wpe = state.get("decoder.transformer.wpe.weight")
    if wte is None or wpe is None:
        raise ValueError(f"{ckpt}: no decoder.transformer.wte / wpe weights: not a DeCap checkpoint")
    if wte.shape[0] < vocab_size:
        raise ValueError(f"{ckpt}: decoder vocabulary {wte.shape[0]} is smaller than CLIP's BPE ({vocab_size})")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.transformer\.h\.(\d+)\.", k))}
    n_embd = int(wte.shape[1])
    if n_embd % n_head:
        raise ValueError(f"{ckpt}: decoder width {n_embd} is not divisible by {n_head} heads")
    inner = state.get("decoder.transformer.h.0.mlp.c_fc.weight")
    return {"vocab_size": vocab_size, "n_positions": int(wpe.shape[0]), "n_embd": n_embd, "n_layer": len(layers),
            "n_head": n_head, "n_inner": int(inner.shape[1]) if inner is not None else 4 * n_embd}


def _decoder(state: dict[str, torch.Tensor], lm_config: dict[str, int], eos: int, ckpt: str) -> torch.nn.Module:
    """Their GPT-2 decoder holding the checkpoint's weights (strictly: every key, every shape)."""
    V = lm_config["vocab_size"]
    weights = {k[len("decoder."):]: v for k, v in state.items()
               if k.startswith("decoder.") and not LEGACY_BUFFERS.match(k)}
    head = weights.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, weights["transformer.wte.weight"]):
        raise ValueError(f"{ckpt}: decoder.lm_head is not tied to decoder.transformer.wte (their decoder ties them)")
    weights["transformer.wte.weight"] = weights["transformer.wte.weight"][:V]
    weights["lm_head.weight"] = weights["transformer.wte.weight"]
    lm = GPT2LMHeadModel(GPT2Config(**lm_config, bos_token_id=eos, eos_token_id=eos))
    load_weights_into(lm, weights, f"{ckpt} (DeCap decoder)", show=lambda k: f"decoder.{k}")
    return lm


def _default_encoder(clip_dim: int) -> EncoderConfig:
    name, tag = DEFAULT_ENCODERS.get(clip_dim, (None, None))
    if name is None:
        raise ValueError(f"no default CLIP encoder for D={clip_dim}: pass encoder= (--clip)")
    return EncoderConfig(model_name=name, pretrained=tag)

"""Checkpoint import from the authors' ClipCap (rmokady/CLIP_prefix_caption: their ``clip_project`` / ``gpt``
key layout) and from the DeCap authors' decoder (dhg-wei/DeCap) into our artifact.
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

"""Import the DeCap authors' released decoder (dhg-wei/DeCap) into our model artifact."""

from __future__ import annotations

import re

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap_core.decap import DEFAULT_TAU, DecapMemory, load_memory_table
from clipcap_core.encoders import EncoderConfig
from clipcap_core.mapping import MappingConfig
from clipcap_core.model import ClipCapModel, LMConfig, ModelConfig
from clipcap_core.reference import DEFAULT_ENCODERS, ImportResult, read_state_dict
from clipcap_core.tokenizer import CLIP_BPE, load_tokenizer

DECAP_HEADS = 4  # n_head of their decoder_config.pkl
_LEGACY = re.compile(r"^decoder\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
_PROJECT = ("clip_project.model.0.weight", "clip_project.model.0.bias")


def import_decap_checkpoint(ckpt: str, out: str, *, encoder: EncoderConfig | None = None, memory: str | None = None,
                            tau: float = DEFAULT_TAU, n_head: int = DECAP_HEADS) -> ImportResult:
    """Convert their ``DeCap`` state dict at ``ckpt`` (any fsspec URI) into our artifact at ``out``;
    ``memory``: a text-embedding table whose rows the artifact keeps as its DeCap memory."""
    # lazy: safetensors.torch + torch ~6.7 s to import (python -X importtime)
    from clipcap_core.artifacts import load_weights_into, save_model

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
    decap = _memory(memory, tau, clip_dim)
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
    # lazy: safetensors.torch + torch ~6.7 s to import (python -X importtime)
    from clipcap_core.artifacts import load_weights_into

    V = lm_config["vocab_size"]
    weights = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.") and not _LEGACY.match(k)}
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


def _memory(uri: str | None, tau: float, clip_dim: int) -> DecapMemory | None:
    if uri is None:
        return None
    memory = load_memory_table(uri, tau=tau)
    memory.check_dim(clip_dim, what="the DeCap checkpoint")
    return memory

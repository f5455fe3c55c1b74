"""Named model configurations (a declarative registry, apart from logic)."""

from __future__ import annotations

from clipcap_core.encoders import EncoderConfig
from clipcap_core.model import LMConfig, MappingConfig, ModelConfig
from clipcap_core.training import PAPER_RECIPE, Recipe

TINY_LM = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64, "n_inner": 256,
           "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
           # wide init: at the usual 0.02 a frozen random LM averages its inputs; no mapper learns through it
           "initializer_range": 0.2}
TINY_CLIP_DIM = 128  # embed_dim of clipcap_core/resources/tiny.json
# The DeCap authors' decoder_config.pkl (GPT-2 defaults otherwise); vocabulary: the 49,408 CLIP BPE rows
DECAP_LM = {"n_layer": 4, "n_head": 4, "n_embd": 768}

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        clip_dim=TINY_CLIP_DIM,
        mapping=MappingConfig(kind="mlp", prefix_length=4),
        lm=LMConfig(name_or_path="tiny", config=TINY_LM, seed=0, freeze=False),
        tokenizer="word",
        encoder=EncoderConfig(model_name="tiny"),
    ),
    "tiny-transformer": ModelConfig(
        clip_dim=TINY_CLIP_DIM,
        mapping=MappingConfig(kind="transformer", prefix_length=4, clip_length=4, num_layers=2, num_heads=4),
        lm=LMConfig(name_or_path="tiny", config=TINY_LM, seed=0, freeze=True),
        tokenizer="word",
        encoder=EncoderConfig(model_name="tiny"),
    ),
    "clipcap-mlp": ModelConfig(
        clip_dim=512,
        mapping=MappingConfig(kind="mlp", prefix_length=10),
        lm=LMConfig(name_or_path="gpt2", freeze=False),
        encoder=EncoderConfig(model_name="ViT-B-32", pretrained="openai"),
    ),
    "clipcap-transformer": ModelConfig(
        clip_dim=640,
        mapping=MappingConfig(kind="transformer", prefix_length=40, clip_length=40, num_layers=8, num_heads=8,
                              normalize_prefix=True),
        lm=LMConfig(name_or_path="gpt2", freeze=True),
        encoder=EncoderConfig(model_name="RN50x4", pretrained="openai"),
    ),
    "decap-reference": ModelConfig(
        clip_dim=512,
        mapping=MappingConfig(kind="linear", prefix_length=1, normalize_prefix=True),
        lm=LMConfig(name_or_path="decap-decoder", config=DECAP_LM, seed=0, freeze=False),
        tokenizer="clip-bpe",
        encoder=EncoderConfig(model_name="ViT-B-32", pretrained="openai"),
    ),
}


# 30 epochs at batch 16 and lr 3e-3: ~1,500 steps on the demo's 820 training rows, ~5,000 on 3,000 caption rows.
TINY_RECIPE = Recipe(lr=3e-3, warmup_steps=20, batch_size=16, epochs=30, max_caption_tokens=24)

# The DeCap authors' train.py (batch 64 per GPU; 20 CLIP tokens with start and end-of-text)
DECAP_RECIPE = Recipe(lr=1e-5, warmup_steps=1000, batch_size=64, epochs=10, max_caption_tokens=20,
                      weight_decay=0.0, label_smoothing=0.1)

RECIPES: dict[str, Recipe] = {
    "tiny": TINY_RECIPE,
    "tiny-transformer": TINY_RECIPE,
    "clipcap-mlp": PAPER_RECIPE,
    "clipcap-transformer": PAPER_RECIPE,
    "decap-reference": DECAP_RECIPE,
}


def preset_recipe(name: str) -> Recipe:
    """The training recipe of preset ``name`` (the paper's for a name without one of its own)."""
    return RECIPES.get(name, PAPER_RECIPE)


def preset_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r} (known: {', '.join(sorted(PRESETS))})") from None

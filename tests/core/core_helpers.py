"""Shared builders for the clipcap_core tests (not a test module).

- ``synthetic_embeddings``: "CLIP embeddings" of synthetic captioned images without rendering them: a fixed
  random projection of the one-hot attribute vector (count, size, colour, shape, position) plus noise. The
  caption is a deterministic function of the attributes, so a model that learns gets held-out captions right.
- ``sharp_model``: an untrained tiny model whose LM has a wide init, so its next-token distributions are
  peaked and varied, with end-of-text and '.' made likelier (captions of different lengths): decoding tests then
  exercise stopping, finished beams and compaction, not just 30 repeats of one token.
- ``trained_tiny``: the tiny MLP preset trained on synthetic embeddings (cached per session).
- ``one_thread``: fixture; import it and use ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch

from clipcap_core import synthetic as syn
from clipcap_core.configs import replace
from clipcap_core.model import ClipCapModel, build_model
from clipcap_core.presets import TINY_LM, preset_config
from clipcap_core.tokenizer import build_word_tokenizer

D = 128
_N_ATTR = len(syn.COUNTS) + len(syn.SIZES) + len(syn.COLORS) + len(syn.SHAPES) + len(syn.POSITIONS)


def _one_hot(a: syn.Attributes) -> np.ndarray:
    v = np.zeros(_N_ATTR, np.float32)
    offsets = np.cumsum([0, len(syn.COUNTS), len(syn.SIZES), len(syn.COLORS), len(syn.SHAPES)])
    v[offsets[0] + a.count - 1] = 1
    v[offsets[1] + syn.SIZES.index(a.size)] = 1
    v[offsets[2] + list(syn.COLORS).index(a.color)] = 1
    v[offsets[3] + syn.SHAPES.index(a.shape)] = 1
    v[offsets[4] + syn.POSITIONS.index(a.position)] = 1
    return v


def synthetic_embeddings(n: int, start: int = 0, noise: float = 0.05, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(captions, embeddings (n, D)) for samples start..start+n of the synthetic set."""
    proj = np.random.default_rng(1234).normal(size=(_N_ATTR, D)).astype(np.float32)
    attrs = [syn.sample_attributes(random.Random(f"{seed}:{i}")) for i in range(start, start + n)]
    x = np.stack([_one_hot(a) for a in attrs]) @ proj
    x += noise * np.random.default_rng(start + 7).normal(size=x.shape).astype(np.float32)
    return [syn.caption_for(a) for a in attrs], x


def sharp_model(kind: str = "mlp", freeze: bool = False, seed: int = 0) -> tuple[ClipCapModel, object]:
    cfg = preset_config("tiny" if kind == "mlp" else "tiny-transformer")
    cfg = replace(cfg, lm={**cfg.lm.__dict__, "freeze": freeze, "config": {**TINY_LM, "initializer_range": 0.3}})
    tok = build_word_tokenizer()
    torch.manual_seed(seed)
    model = build_model(cfg, tok).eval()
    with torch.no_grad():  # make end-of-text and '.' likelier (tied head: a longer row, larger logits)
        for word in (tok.eos_token, "."):
            model.lm.get_input_embeddings().weight[tok.convert_tokens_to_ids(word)] *= 2.0
    return model, tok


@functools.cache
def trained_tiny() -> tuple[ClipCapModel, object]:
    """The tiny MLP preset trained on 1000 synthetic embeddings (~1 CPU-second per epoch)."""
    from clipcap_core.training import TrainConfig, iterate_batches, train_loop

    captions, x = synthetic_embeddings(1000)
    tok = build_word_tokenizer(captions)
    torch.manual_seed(0)
    model = build_model(preset_config("tiny"), tok)
    cfg = TrainConfig(lr=3e-3, warmup_steps=10, batch_size=50, epochs=6, max_caption_tokens=12)
    train_loop(model, lambda e: iterate_batches(tok, captions, x, cfg, epoch=e), cfg, total_steps=6 * 20)
    return model.eval(), tok


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP barriers make them crawl."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

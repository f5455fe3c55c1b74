"""A small *trained* ClipCap model for pipeline tests (not a test module).

``train_tiny_artifact(out)``: the ``tiny`` preset trained for a few seconds on the ``tiny`` CLIP's embeddings
of synthetic images (made the way the pipelines make them: ``resize`` to uint8, then ``encode_pixels``) and
saved as a model artifact. Unlike the untrained preset, whose captions are all alike (often empty), its
captions follow the image (colour, shape, count...), so a test can see a caption that landed on the wrong key.
"""

from __future__ import annotations

import numpy as np
import torch

from clipcap_core import synthetic
from clipcap_core.artifacts import save_model
from clipcap_core.encoders import EncoderConfig, load_encoder
from clipcap_core.model import build_model
from clipcap_core.presets import preset_config
from clipcap_core.tokenizer import build_word_tokenizer
from clipcap_core.training import TrainConfig, iterate_batches, train_loop

SAMPLES, SEED, SIZE = 192, 7, 48


def embed_like_the_pipeline(images: list, encoder=None) -> np.ndarray:
    encoder = encoder or load_encoder(EncoderConfig())
    return encoder.encode_pixels(np.stack([encoder.resize(im) for im in images]))  # (N, D)


def train_tiny_artifact(out: str, epochs: int = 20) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads on a shared CPU
    try:
        samples = list(synthetic.generate(SAMPLES, seed=SEED, size=SIZE))
        captions = [s.caption for s in samples]
        x = embed_like_the_pipeline([s.image for s in samples])
        tok = build_word_tokenizer(captions)
        torch.manual_seed(0)
        model = build_model(preset_config("tiny"), tok)
        cfg = TrainConfig(lr=3e-3, warmup_steps=10, batch_size=32, epochs=epochs, max_caption_tokens=14)
        steps = epochs * -(-SAMPLES // cfg.batch_size)
        train_loop(model, lambda e: iterate_batches(tok, captions, x, cfg, epoch=e), cfg, total_steps=steps)
        save_model(model.eval(), tok, out, metrics={"note": "test fixture"})
    finally:
        torch.set_num_threads(threads)
    return out

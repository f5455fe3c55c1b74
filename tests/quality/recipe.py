"""The quality recipe: a short, seeded train-and-caption run on the ``scenes`` world whose held-out CIDEr tells a
working captioner from a broken one (``test_quality_floor.py`` holds it above a floor; ``benchmarks/mutations.py``
plants defects in a copy of the code and shows each one drops it below).

1. render ``n_train`` training scenes and ``n_heldout`` unseen test scenes (64 px), embed them with the shipped
   ``tiny-scenes`` CLIP in this process (no Ray: the recipe must fit in about a minute on 2 cores);
2. ClipCap: the ``tiny`` preset (MLP mapping, k = 4, 2-layer GPT-2, fine-tuned) with the ``word-scenes``
   tokenizer and a normalised prefix, trained on (image embedding, canonical caption) pairs;
3. DeCap: the same model shape trained on the CLIP *text* embeddings of the training captions only, decoding the
   held-out images through the memory projection (``DecapMemory``) onto those captions;
4. both caption the held-out images greedily; CIDEr against the six references of each image (``simple``
   tokenisation: no JVM start).

    python -m tests.quality.recipe [--seed 0]   # prints the figures as JSON
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

N_TRAIN = 2048
N_HELDOUT = 128
EPOCHS = 10
BATCH = 32
MAX_TOKENS = 24  # the longest scenes caption is 16 words + end-of-text


@dataclass(frozen=True)
class Data:
    train_captions: list[str]
    train_image: np.ndarray  # (N, D) unnormalised image embeddings
    train_text: np.ndarray  # (N, D) unnormalised text embeddings of train_captions
    heldout_image: np.ndarray  # (H, D)
    heldout_refs: list[list[str]]  # six references per held-out image


def _embed_images(encoder: Any, samples: list[Any], batch: int = 256) -> np.ndarray:
    return np.concatenate([encoder.encode_pixels(np.stack([encoder.resize(s.image) for s in samples[i: i + batch]]))
                           for i in range(0, len(samples), batch)])


def scenes_data(n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT, seed: int = 0) -> Data:
    """Seeded training and held-out scenes, embedded by the shipped ``tiny-scenes`` CLIP."""
    from clipcap_core import scenes
    from clipcap_core.encoders import EncoderConfig, load_encoder

    encoder = load_encoder(EncoderConfig(model_name="tiny-scenes"))
    train = list(scenes.generate(n_train, seed=seed, split="train"))
    held = list(scenes.generate(n_heldout, seed=seed, split="test"))
    captions = [s.caption for s in train]
    text = np.concatenate([encoder.encode_text(captions[i: i + 256]) for i in range(0, len(captions), 256)])
    return Data(captions, _embed_images(encoder, train), text, _embed_images(encoder, held),
                [list(s.references) for s in held])


def train_captioner(inputs: np.ndarray, captions: list[str], seed: int, epochs: int = EPOCHS) -> tuple[Any, Any]:
    """The ``tiny`` preset with the scenes vocabulary and a normalised prefix, trained in this process."""
    import torch

    from clipcap_core.configs import replace
    from clipcap_core.encoders import EncoderConfig
    from clipcap_core.model import build_model
    from clipcap_core.presets import preset_config
    from clipcap_core.tokenizer import load_tokenizer
    from clipcap_core.training import TrainConfig, iterate_batches, train_loop

    base = preset_config("tiny")
    cfg = replace(base, clip_dim=inputs.shape[1], tokenizer="word-scenes",
                  encoder=EncoderConfig(model_name="tiny-scenes"),
                  mapping={**base.mapping.__dict__, "normalize_prefix": True})
    tok = load_tokenizer("word-scenes")
    torch.manual_seed(seed)
    model = build_model(cfg, tok)
    tc = TrainConfig(lr=3e-3, warmup_steps=20, batch_size=BATCH, epochs=epochs, max_caption_tokens=MAX_TOKENS,
                     seed=seed)
    steps = epochs * math.ceil(len(captions) / BATCH)
    train_loop(model, lambda e: iterate_batches(tok, captions, inputs, tc, epoch=e), tc, total_steps=steps)
    return model.eval(), tok


def cider(model: Any, tok: Any, inputs: np.ndarray, refs: list[list[str]]) -> tuple[float, list[str]]:
    """Greedy captions of ``inputs`` and their corpus CIDEr (x100, as papers print it) against ``refs``."""
    from clipcap_core.decoding import generate
    from clipcap_core.metrics import caption_metrics

    texts = generate(model, inputs, tok, "greedy", max_length=MAX_TOKENS).texts
    return 100 * caption_metrics(texts, refs, metrics=("cider",), tokenize="simple")["cider"], texts


def run(seed: int = 0, data: Data | None = None) -> dict[str, Any]:
    """The whole recipe: held-out CIDEr of the image-trained ClipCap and of the text-only DeCap model, on one
    torch thread (the figures then do not depend on the machine's core count, and a busy 2-core box does not
    lose half its time to two threads waiting on each other)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(seed, data)
    finally:
        torch.set_num_threads(threads)


def _run(seed: int, data: Data | None) -> dict[str, Any]:
    import torch

    from clipcap_core.decap import DecapMemory

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    data = data or scenes_data(seed=seed)
    t_data = time.perf_counter() - t0
    model, tok = train_captioner(data.train_image, data.train_captions, seed)
    clipcap, texts = cider(model, tok, data.heldout_image, data.heldout_refs)
    t_clipcap = time.perf_counter() - t0 - t_data
    decap_model, tok = train_captioner(data.train_text, data.train_captions, seed)
    projected = DecapMemory(data.train_text).project(data.heldout_image)
    decap, decap_texts = cider(decap_model, tok, projected, data.heldout_refs)
    import clipcap_core

    return {"cider": clipcap, "decap_cider": decap, "code": str(Path(clipcap_core.__file__).parent), "examples": list(zip(texts[:3], decap_texts[:3], strict=True)),
            "seconds": {"data": t_data, "clipcap": t_clipcap, "total": time.perf_counter() - t0}}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    print(json.dumps(run(ap.parse_args().seed), indent=1))

"""The DeCap step of ``clipcap demo --decap``: a captioner trained on a caption corpus alone, no image.

1. a text-only caption corpus from the world's generator; 2. ``embed-text`` on it; 3. ``train --decoder decap``;
4. bulk captioning of the held-out images with that artifact (memory projection) and with ``projection none``.
The corpus, not the demo's own training captions: at tau 0.01 the projection nearly writes the nearest memory
caption, so the memory must cover the captions the images need.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clipcap_core import uris
from pipelines.clip.tiny import zero_shot_captions
from pipelines.embed.job import EmbedResources
from pipelines.io import storage
from pipelines.train.decap import DecapOptions
from pipelines.train.state import RunOptions


def write_corpus(root: str, n: int, seed: int, world: str = "synthetic") -> str:
    """``n`` generator captions, one per line (no image is rendered), at ``<root>/decap-corpus/captions.txt``."""
    from pipelines.demo.worlds import world as get_world

    uri = storage.join(root, "decap-corpus", "captions.txt")
    lines = get_world(world).corpus(n, seed)
    fs, path = uris.filesystem(uri)
    storage.ensure_dir(fs, posixpath.dirname(path))  # never s3fs makedirs: it would create a missing bucket
    with fs.open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return uri


def embed_captions(corpus_uri: str, root: str, encoder: Any, dataset: str = "synthetic-captions",
                   input_format: str = "auto") -> str:
    """Text-embedding table of the captions in ``corpus_uri`` (resumable); returns its URI."""
    # lazy: pandas ~0.55 s to import (python -X importtime)
    from pipelines.embed.text import EmbedTextConfig, run_embed_text

    cfg = EmbedTextConfig(input=corpus_uri, output_root=root, dataset=dataset, input_format=input_format,
                          encoder=encoder, resources=EmbedResources(batch_size=256))
    return run_embed_text(cfg).table_uri


def train_decap(table_uri: str, root: str, *, seed: int = 0, epochs: int = 30, noise_std: float = 0.0,
                memory_size: int = 0, name: str | None = None, max_caption_tokens: int = 16) -> Any:
    """``train --decoder decap`` on a text table (tiny preset, 1 Ray Train worker); returns the TrainJobResult."""
    # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from clipcap_core.training import TrainConfig
    from pipelines.train.job import TrainJobConfig, run_training

    job = TrainJobConfig(
        tables=(table_uri,), output=storage.join(root, "runs"), name=name or f"decap-s{seed}", model="tiny",
        decoder="decap", heldout_fraction=0.1, decap=DecapOptions(noise_std=noise_std, memory_size=memory_size),
        train=TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_steps=20, max_caption_tokens=max_caption_tokens,
                          seed=seed),
        run=RunOptions(checkpoint_every=10**6, log_every=100, eval_max_samples=256, eval_every=10))
    return run_training(job)


def zero_shot_top1(clip: Any, image_emb: np.ndarray, samples: Sequence[Any], world: str) -> float:
    """The CLIP's image -> caption retrieval top-1 (exact caption): synthetic over all 432 captions, scenes over
    the canonical captions of ``samples`` (the caption space is too large to rank)."""

    truth = [s.caption for s in samples]
    if world == "synthetic":
        return zero_shot_captions(clip, image_emb, truth)["top1_exact"]
    from clipcap_core.clip_eval import l2n
    from pipelines.clip.evaluate import encode_texts

    classes = sorted(set(truth))
    best = (l2n(image_emb) @ l2n(encode_texts(clip, classes)).T).argmax(1)
    return float(np.mean([classes[i] == t for i, t in zip(best, truth, strict=True)]))


def demo_decap(root: str, samples: Sequence[Any], *, encoder: Any, seed: int = 0, corpus_size: int = 3000,
               epochs: int = 15, image_model_exact: float | None = None, world: str = "synthetic",
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Steps 1-4 of the module docstring; prints the text-only model's exact match on the held-out images (memory projection and
    raw embedding) next to the CLIP's zero-shot top-1 and the image-trained model's. On ``scenes`` exact match
    is the world's (any wording of the same scene) and the per-attribute accuracy is printed too."""
    # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from clipcap_core.decap import ProjectionConfig
    from clipcap_core.encoders import load_encoder
    from pipelines.demo.caption import caption_heldout
    from pipelines.demo.worlds import world as get_world

    w = get_world(world)
    accuracy = w.accuracy if world != "synthetic" else None  # synthetic: one wording, exact string match
    t0 = time.perf_counter()
    table = embed_captions(write_corpus(root, corpus_size, seed, world), root, encoder, dataset=f"{world}-captions")
    trained = train_decap(table, root, seed=seed, epochs=epochs, max_caption_tokens=w.max_caption_tokens)
    echo(f"decap: text-only model (tiny preset) trained on {corpus_size} {world} captions, no image, in "
         f"{time.perf_counter() - t0:.0f} s -> {trained.artifact}; held-out caption texts reconstructed: "
         f"{100 * trained.metrics.get('exact_match', 0.0):.0f}%")
    projected = caption_heldout(root, trained.artifact, samples, name="heldout-decap", echo=echo, accuracy=accuracy)
    raw = caption_heldout(root, trained.artifact, samples, name="heldout-decap-raw", show=0, echo=lambda _: None,
                          projection=ProjectionConfig(mode="none"), accuracy=accuracy)
    clip = load_encoder(encoder)
    pixels = np.stack([clip.resize(s.image) for s in samples])
    zero = zero_shot_top1(clip, clip.encode_pixels(pixels), samples, world)
    from clipcap_core.synthetic import all_captions

    candidates = len(all_captions()) if world == "synthetic" else len({s.caption for s in samples})  # what it ranks
    side = f"; image-trained model: {100 * image_model_exact:.0f}%" if image_model_exact is not None else ""
    echo(f"decap on {len(samples)} held-out images: {100 * projected['exact_match']:.0f}% exact with the memory "
         f"projection, {100 * raw['exact_match']:.0f}% decoding the raw image embedding; CLIP {encoder.model_name} "
         f"zero-shot top-1 {100 * zero:.0f}% among {candidates} captions{side} (meaningful only with aligned image "
         "and text towers)")
    return {"artifact": trained.artifact, "text_table": table, "train_metrics": trained.metrics,
            "exact_match": projected["exact_match"], "exact_match_raw": raw["exact_match"],
            "zero_shot_top1": zero, "captions": projected["output"],
            "accuracy": projected.get("accuracy"), "accuracy_raw": raw.get("accuracy")}

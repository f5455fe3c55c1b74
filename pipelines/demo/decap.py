"""The DeCap step of ``clipcap demo --decap``: a captioner trained on a caption corpus alone, no image.

    report = demo_decap(root, heldout_samples, encoder=EncoderConfig())

1. a caption corpus: ``corpus_size`` captions written by the synthetic generator (text only, seeded apart from
   the demo's images: no image is ever rendered for them) -> ``<root>/decap-corpus/captions.txt``;
2. ``embed-text`` on it -> text-embedding table;
3. ``train --decoder decap`` on that table (Ray Train, 1 worker; the memory is the training captions' embeddings);
4. bulk captioning (``pipelines.caption.job``) of the held-out images with that artifact, which projects every image
   embedding onto its memory, and once more with ``projection none`` (the raw image embedding), for comparison,
   next to the CLIP's own zero-shot retrieval top-1 over all 432 synthetic captions on the same images.
Why a corpus and not the captions of the demo's own shards (the step before): DeCap's projection writes, at tau
0.01, nearly the caption of the nearest memory entry, so the memory must cover the captions the images will need.
The ~900 training captions of the demo's shards missed ~12% of the 432 synthetic captions, and the projection
scored 78% against 97% for the raw embedding; a corpus of 3,000 captions misses ~0.2% of them. That is DeCap's
premise anyway: text of the target domain is cheap, paired images are not.
Without aligned CLIP towers (the image and text embeddings of a random CLIP share no space) the text-only
model cannot caption images: the demo says which CLIP it ran.
"""

from __future__ import annotations

import posixpath
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clipcap_core import synthetic as syn
from clipcap_core import uris
from pipelines.clip.tiny import zero_shot_captions
from pipelines.embed.job import EmbedResources
from pipelines.io import storage
from pipelines.train.decap import DecapOptions
from pipelines.train.state import RunOptions


def write_corpus(root: str, n: int, seed: int) -> str:
    """``n`` generator captions, one per line (no image is rendered), at ``<root>/decap-corpus/captions.txt``."""
    uri = storage.join(root, "decap-corpus", "captions.txt")
    lines = [syn.caption_for(syn.sample_attributes(random.Random(f"corpus:{seed}:{i}"))) for i in range(n)]
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
                memory_size: int = 0, name: str | None = None) -> Any:
    """``train --decoder decap`` on a text table (tiny preset, 1 Ray Train worker); returns the TrainJobResult."""
    # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from clipcap_core.training import TrainConfig
    from pipelines.train.job import TrainJobConfig, run_training

    job = TrainJobConfig(
        tables=(table_uri,), output=storage.join(root, "runs"), name=name or f"decap-s{seed}", model="tiny",
        decoder="decap", heldout_fraction=0.1, decap=DecapOptions(noise_std=noise_std, memory_size=memory_size),
        train=TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_steps=20, max_caption_tokens=16, seed=seed),
        run=RunOptions(checkpoint_every=10**6, log_every=100, eval_max_samples=256, eval_every=10))
    return run_training(job)


def demo_decap(root: str, samples: Sequence[Any], *, encoder: Any, seed: int = 0, corpus_size: int = 3000,
               epochs: int = 15, image_model_exact: float | None = None,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Steps 1-4 above; prints the text-only model's exact match on the held-out images (memory projection and
    raw embedding) next to the CLIP's zero-shot top-1 and the image-trained model's."""
    # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from clipcap_core.decap import ProjectionConfig
    from clipcap_core.encoder_model import load_encoder
    from pipelines.demo.caption import caption_heldout

    t0 = time.perf_counter()
    table = embed_captions(write_corpus(root, corpus_size, seed), root, encoder)
    trained = train_decap(table, root, seed=seed, epochs=epochs)
    echo(f"decap: text-only model (tiny preset) trained on {corpus_size} synthetic captions, no image, in "
         f"{time.perf_counter() - t0:.0f} s -> {trained.artifact}; held-out caption texts reconstructed: "
         f"{100 * trained.metrics.get('exact_match', 0.0):.0f}%")
    projected = caption_heldout(root, trained.artifact, samples, name="heldout-decap", echo=echo)
    raw = caption_heldout(root, trained.artifact, samples, name="heldout-decap-raw", show=0, echo=lambda _: None,
                          projection=ProjectionConfig(mode="none"))
    clip = load_encoder(encoder)
    pixels = np.stack([clip.resize(s.image) for s in samples])
    zero = zero_shot_captions(clip, clip.encode_pixels(pixels), [s.caption for s in samples])["top1_exact"]
    side = f"; image-trained model: {100 * image_model_exact:.0f}%" if image_model_exact is not None else ""
    echo(f"decap on {len(samples)} held-out images: {100 * projected['exact_match']:.0f}% exact with the memory "
         f"projection, {100 * raw['exact_match']:.0f}% decoding the raw image embedding; CLIP {encoder.model_name} "
         f"zero-shot top-1 {100 * zero:.0f}%{side} (meaningful only with aligned image and text towers)")
    return {"artifact": trained.artifact, "text_table": table, "train_metrics": trained.metrics,
            "exact_match": projected["exact_match"], "exact_match_raw": raw["exact_match"],
            "zero_shot_top1": zero, "captions": projected["output"]}

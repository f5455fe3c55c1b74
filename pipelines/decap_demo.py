"""The DeCap step of ``clipcap demo --decap``: a captioner trained on the synthetic *captions* alone.

    report = demo_decap(raw_uri, root, heldout_samples)     # raw_uri: the demo's img2dataset shards

1. ``embed-text`` on the captions of the demo's img2dataset shards (no image is read) -> text-embedding table;
2. ``train --decoder decap`` on it (Ray Train, 1 worker; the memory is the training captions' embeddings);
3. bulk captioning (``pipelines.caption``) of the held-out images with that artifact, which projects every image
   embedding onto its memory, and once more with ``projection none`` (the raw image embedding), for comparison.
Without aligned CLIP towers (the image and text embeddings of a random CLIP share no space) the text-only
model cannot caption images: the demo says which CLIP it ran.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

from clipcap_core import synthetic as syn
from pipelines import storage


def all_captions() -> list[str]:
    """Every caption the synthetic generator can write (3 counts x 2 sizes x 6 colours x 3 shapes x 4 positions)."""
    return [syn.caption_for(syn.Attributes(count=c, size=s, color=col, shape=sh, position=p))
            for c, s, col, sh, p in itertools.product((1, 2, 3), syn.SIZES, syn.COLORS, syn.SHAPES, syn.POSITIONS)]


def embed_captions(raw_uri: str, root: str, encoder: Any, dataset: str = "synthetic-captions") -> str:
    """Text-embedding table of the captions in ``raw_uri``'s shards (resumable); returns its URI."""
    from pipelines.embed import EmbedResources
    from pipelines.embed_text import EmbedTextConfig, run_embed_text

    cfg = EmbedTextConfig(input=raw_uri, output_root=root, dataset=dataset, input_format="img2dataset",
                          encoder=encoder, resources=EmbedResources(batch_size=256, cpus_per_actor=1.0))
    return run_embed_text(cfg).table_uri


def train_decap(table_uri: str, root: str, *, seed: int = 0, epochs: int = 30, noise_std: float = 0.0,
                memory_size: int = 0, name: str | None = None) -> Any:
    """``train --decoder decap`` on a text table (tiny preset, 1 Ray Train worker); returns the TrainJobResult."""
    from clipcap_core.training import TrainConfig
    from pipelines.decap_train import DecapOptions
    from pipelines.train import RunOptions, TrainJobConfig, run_training

    job = TrainJobConfig(
        tables=(table_uri,), output=storage.join(root, "runs"), name=name or f"decap-s{seed}", model="tiny",
        decoder="decap", heldout_fraction=0.1, decap=DecapOptions(noise_std=noise_std, memory_size=memory_size),
        train=TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_steps=20, max_caption_tokens=16, seed=seed),
        run=RunOptions(checkpoint_every=10**6, log_every=100, eval_max_samples=256, eval_every=10))
    return run_training(job)


def demo_decap(raw_uri: str, root: str, samples: Sequence[Any], *, encoder: Any, seed: int = 0,
               image_model_exact: float | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Steps 1-3 above; prints the text-only model's held-out exact match next to the image-trained model's."""
    from clipcap_core.decap import ProjectionConfig
    from pipelines.caption_demo import caption_heldout

    t0 = time.perf_counter()
    table = embed_captions(raw_uri, root, encoder)
    trained = train_decap(table, root, seed=seed)
    echo(f"decap: text-only model (tiny preset) trained on the captions of {raw_uri} alone in "
         f"{time.perf_counter() - t0:.0f} s -> {trained.artifact}; held-out caption texts reconstructed: "
         f"{100 * trained.metrics.get('exact_match', 0.0):.0f}%")
    projected = caption_heldout(root, trained.artifact, samples, name="heldout-decap", echo=echo)
    raw = caption_heldout(root, trained.artifact, samples, name="heldout-decap-raw", show=0, echo=lambda _: None,
                          projection=ProjectionConfig(mode="none"))
    side = f"; image-trained model: {100 * image_model_exact:.0f}%" if image_model_exact is not None else ""
    echo(f"decap on held-out images: {100 * projected['exact_match']:.0f}% exact with the memory projection, "
         f"{100 * raw['exact_match']:.0f}% decoding the raw image embedding{side} (CLIP {encoder.model_name}: "
         "meaningful only with aligned image and text towers)")
    return {"artifact": trained.artifact, "text_table": table, "train_metrics": trained.metrics,
            "exact_match": projected["exact_match"], "exact_match_raw": raw["exact_match"],
            "captions": projected["output"]}

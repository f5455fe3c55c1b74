"""The training step of ``clipcap demo`` (not part of the training stage): the ``tiny`` preset trained with
Ray Train on the demo's embedding table, then the key-hash held-out rows captioned with the saved artifact and
scored per attribute of the synthetic captions, beside the zero-shot figures of the CLIP that made the table.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pyarrow as pa

from clipcap_core import synthetic as syn
from clipcap_core.decoding import generate
from clipcap_core.encoders import EncoderConfig, load_encoder
from clipcap_core.synthetic import parse_caption as synthetic_caption
from clipcap_core.training import TrainConfig
from pipelines.clip.tiny import zero_shot_captions
from pipelines.demo.worlds import world as get_world
from pipelines.io import storage, tables
from pipelines.train.job import TrainJobConfig, run_training
from pipelines.train.state import RunOptions


def clip_zero_shot(info: tables.TableInfo, held: pa.Table) -> dict[str, float]:
    """Zero-shot figures of the CLIP that made ``held``'s embeddings on those rows (synthetic captions only)."""
    caps = held.column("caption").to_pylist()
    if not info.clip_model or not caps:
        return {}
    try:
        enc = load_encoder(EncoderConfig(model_name=info.clip_model, pretrained=info.clip_pretrained or None))
    except ValueError:  # tables made by a CLIP this process cannot load: no zero-shot line
        return {}
    if enc.dim != info.dim or any(synthetic_caption(c) is None for c in caps):
        return {}
    return zero_shot_captions(enc, tables.embeddings_numpy(held), caps)



def attribute_accuracy(predictions: list[str], references: list[str]) -> dict[str, dict[str, float]]:
    """Synthetic captions: exact match and per-attribute accuracy (count, size, colour, shape, position), with
    the chance level of each (a caption that does not parse scores 0 on every attribute)."""
    pred = [syn.parse_caption(p) for p in predictions]
    ref = [syn.parse_caption(r) for r in references]
    values = {"count": (1, 2, 3), "size": syn.SIZES, "color": tuple(syn.COLORS), "shape": syn.SHAPES,
              "position": syn.POSITIONS}
    n = max(len(ref), 1)
    acc = {k: sum(p is not None and getattr(p, k) == getattr(r, k) for p, r in zip(pred, ref, strict=True)) / n
           for k in values}
    exact = sum(p is not None and p == r for p, r in zip(pred, ref, strict=True)) / n
    chance = {k: 1.0 / len(v) for k, v in values.items()}
    chance_exact = math.prod(chance.values())
    return {"accuracy": {"exact": exact, **acc}, "chance": {"exact": chance_exact, **chance}}


def demo_train(embeddings_uri: str, root: str, *, seed: int = 0, epochs: int = 30,
               world: str = "synthetic") -> dict[str, Any]:
    """Train the ``tiny`` preset on the demo's embedding table with Ray Train (1 worker), then caption the
    key-hash held-out rows with the saved artifact and report exact-match and per-attribute accuracy."""
    # lazy: safetensors.torch + torch ~6.7 s to import (python -X importtime)
    from clipcap_core.artifacts import load_model

    w = get_world(world)
    files = tables.list_table_files(embeddings_uri)
    info = tables.inspect_tables(files)
    job = TrainJobConfig(
        tables=(embeddings_uri,), output=storage.join(root, "runs"), name=f"demo-{info.clip_model}-{info.num_rows}-s{seed}",
        model="tiny", model_overrides={"mapping.normalize_prefix": True, "tokenizer": w.tokenizer}, heldout_fraction=0.2,
        train=TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_steps=20, max_caption_tokens=w.max_caption_tokens,
                          seed=seed),
        run=RunOptions(checkpoint_every=10**6, log_every=100, eval_max_samples=256, eval_every=10))
    t0 = time.perf_counter()
    result = run_training(job)
    seconds = time.perf_counter() - t0
    held = tables.read_split(files, job.split("heldout"))
    loaded = load_model(result.artifact)
    texts = generate(loaded.model, tables.embeddings_numpy(held), loaded.tokenizer, "greedy",
                     max_length=w.max_caption_tokens).texts
    scores = w.accuracy(texts, held.column("caption").to_pylist())
    acc, chance = scores["accuracy"], scores["chance"]
    per_attr = ", ".join(f"{k} {100 * acc[k]:.0f}% ({100 * chance[k]:.2g}%)" for k in acc if k != "exact")
    n_train = info.num_rows - held.num_rows
    zs = clip_zero_shot(info, held)
    lines = [
        f"train: tiny preset (MLP mapping, k=4), 1 Ray Train worker, {epochs} epochs on {n_train} rows in "
        f"{seconds:.0f} s -> {result.artifact}",
        f"held-out accuracy ({held.num_rows} rows held out by key hash; chance in brackets): exact caption "
        f"{100 * acc['exact']:.1f}% ({100 * chance['exact']:.2f}%); {per_attr}",
    ]
    if zs:
        scores["clip_zero_shot"] = zs
        lines.append(
            f"  the CLIP itself ({info.clip_model}), zero-shot on the same held-out images (most similar of all 432 "
            f"synthetic captions): exact {100 * zs['top1_exact']:.1f}%; " + ", ".join(
                f"{k[5:]} {100 * v:.0f}%" for k, v in zs.items() if k.startswith("attr_")))
    return {"artifact": result.artifact, "run_dir": result.run_dir, "heldout_rows": held.num_rows,
            "train_rows": n_train, "seconds": seconds, **scores, "examples": list(zip(texts[:3],
            held.column("caption").to_pylist()[:3], strict=True)), "lines": lines}

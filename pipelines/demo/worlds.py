"""The synthetic worlds ``clipcap demo --world`` runs on: what differs between them, in one place per world."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipcap_core import scenes, synthetic

WORLDS = ("synthetic", "scenes")


@dataclass(frozen=True)
class World:
    name: str
    clip_model: str  # the shipped CLIP that embeds it
    tokenizer: str  # the tiny preset's word-level tokenizer source
    max_caption_tokens: int
    write_url_list: Callable[..., Path]  # (folder, n, base_url, seed=, size=) -> TSV
    heldout: Callable[[int, int, int], list[Any]]  # (n, seed, start) -> samples with .key .caption .image
    references: Callable[[Any], Sequence[str]]  # sample -> its reference captions
    accuracy: Callable[[list[str], list[str]], dict[str, dict[str, float]]]  # predictions, canonical truth
    corpus: Callable[[int, int], list[str]]  # (n, seed) -> training-split captions, text only (no image rendered)


def _synthetic_heldout(n: int, seed: int, start: int) -> list[Any]:
    return list(synthetic.generate(n, seed=seed, size=64, start=start))


def synthetic_accuracy(predictions: list[str], references: list[str]) -> dict[str, dict[str, float]]:
    """Exact match and per-attribute accuracy with the chance level of each; an unparsed caption scores 0."""
    pred = [synthetic.parse_caption(p) for p in predictions]
    ref = [synthetic.parse_caption(r) for r in references]
    values = {"count": (1, 2, 3), "size": synthetic.SIZES, "color": tuple(synthetic.COLORS),
              "shape": synthetic.SHAPES, "position": synthetic.POSITIONS}
    n = max(len(ref), 1)
    acc = {k: sum(p is not None and getattr(p, k) == getattr(r, k) for p, r in zip(pred, ref, strict=True)) / n
           for k in values}
    exact = sum(p is not None and p == r for p, r in zip(pred, ref, strict=True)) / n
    chance = {k: 1.0 / len(v) for k, v in values.items()}
    return {"accuracy": {"exact": exact, **acc}, "chance": {"exact": math.prod(chance.values()), **chance}}


def _synthetic_corpus(n: int, seed: int) -> list[str]:
    return [synthetic.caption_for(synthetic.sample_attributes(random.Random(f"corpus:{seed}:{i}"))) for i in range(n)]


def scenes_corpus(n: int, seed: int) -> list[str]:
    """``n`` training-split scenes (never a held-out colour-shape combination), each in one of its six wordings."""
    holdout = scenes.heldout_combos()
    out = []
    for i in range(n):
        rng = random.Random(f"decap-corpus:{seed}:{i}")
        out.append(rng.choice(scenes.references(scenes.sample_scene(rng, "train", holdout))))
    return out


def _scenes_heldout(n: int, seed: int, start: int) -> list[Any]:
    """First half unseen scenes of seen combinations (``test``), second half held-out combinations (``novel``)."""
    half = n // 2
    return [*scenes.generate(n - half, seed=seed, start=start, split="test"),
            *scenes.generate(half, seed=seed, start=start, split="novel")]


def scenes_accuracy(predictions: list[str], references: list[str]) -> dict[str, dict[str, float]]:
    """Exact (same scene, any wording), relation and per-attribute accuracy over both groups, with chance levels;
    an unparsed caption scores 0."""
    pred = [scenes.parse_caption(p) for p in predictions]
    truth = [scenes.parse_caption(r) for r in references]
    pairs = [(p.normalized() if p else None, t.normalized()) for p, t in zip(pred, truth, strict=True) if t]
    n = max(len(pairs), 1)
    values = {"count": (1, 2, 3), "size": scenes.SIZES, "color": tuple(scenes.COLORS), "shape": scenes.SHAPES}
    acc = {k: sum(p is not None and getattr(p.first, k) == getattr(t.first, k) and
                  getattr(p.second, k) == getattr(t.second, k) for p, t in pairs) / n for k in values}
    acc["relation"] = sum(p is not None and p.relation == t.relation for p, t in pairs) / n
    chance = {k: 1.0 / len(v) ** 2 for k, v in values.items()} | {"relation": 0.5}
    return {"accuracy": {"exact": sum(p == t for p, t in pairs) / n, **acc},
            "chance": {"exact": math.prod(chance.values()), **chance}}


REGISTRY: dict[str, World] = {
    "synthetic": World("synthetic", "tiny", "word", 16, synthetic.write_url_list, _synthetic_heldout,
                       lambda s: [s.caption], synthetic_accuracy, _synthetic_corpus),
    "scenes": World("scenes", "tiny-scenes", "word-scenes", 24, scenes.write_url_list, _scenes_heldout,
                    lambda s: s.references, scenes_accuracy, scenes_corpus),
}


def world(name: str) -> World:
    if name not in REGISTRY:
        raise ValueError(f"unknown world {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]

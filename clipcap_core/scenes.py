"""Seeded ``scenes`` world: two groups of shapes in a spatial relation, several captions per image."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from clipcap_core import synthetic

COUNTS = ("a", "two", "three")
SIZES = ("small", "large")
COLORS = {
    "red": (215, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 220, 30),
    "purple": (135, 45, 175),
    "orange": (245, 140, 25),
    "pink": (250, 130, 195),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
RELATIONS = ("left", "right", "above", "below")
FLIP = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Several ways to say each relation; the first is the canonical one.
PHRASES = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
Split = Literal["train", "test", "novel"]
SPLITS: tuple[str, ...] = ("train", "test", "novel")
HOLDOUT_SEED = 0
_RADIUS = {"small": 4.5, "large": 8.5}  # at 64 px; scaled with the image size

VOCABULARY: tuple[str, ...] = tuple(sorted(
    set(COUNTS) | set(SIZES) | set(COLORS) | set(SHAPES) | set(PLURALS.values())
    | {w for phrases in PHRASES.values() for p in phrases for w in p.split()} | {"."}
))


@dataclass(frozen=True)
class Group:
    count: int  # 1..3
    size: str
    color: str
    shape: str

    def phrase(self) -> str:
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        return f"{COUNTS[self.count - 1]} {self.size} {self.color} {noun}"


@dataclass(frozen=True)
class Scene:
    """``first`` is ``relation`` of ``second`` ("first left of second")."""

    first: Group
    relation: str
    second: Group

    def flipped(self) -> Scene:
        return Scene(self.second, FLIP[self.relation], self.first)

    def normalized(self) -> Scene:
        """The same scene said with ``left`` / ``above``: two captions of one scene normalise equal."""
        return self.flipped() if self.relation in ("right", "below") else self


@dataclass(frozen=True)
class SceneSample:
    key: str
    caption: str  # canonical: references[0]
    references: tuple[str, ...]
    image: Image.Image
    scene: Scene


def caption_for(s: Scene, phrase: int = 0) -> str:
    return f"{s.first.phrase()} {PHRASES[s.relation][phrase]} {s.second.phrase()}"


def references(s: Scene) -> tuple[str, ...]:
    """Six captions of the scene: each relation phrase, said from either group; the canonical one first."""
    return tuple(caption_for(v, p) for p in range(3) for v in (s, s.flipped()))


def _parse_group(words: list[str]) -> Group | None:
    if len(words) != 4 or words[0] not in COUNTS or words[1] not in SIZES or words[2] not in COLORS:
        return None
    count = COUNTS.index(words[0]) + 1
    shape = next((s for s in SHAPES if words[3] == (s if count == 1 else PLURALS[s])), None)
    return None if shape is None else Group(count, words[1], words[2], shape)


def parse_caption(caption: str) -> Scene | None:
    """Inverse of ``caption_for`` for every phrasing (case and a trailing '.' tolerated); None if invalid."""
    words = caption.lower().replace(".", " ").split()
    for relation, phrases in PHRASES.items():
        for p in phrases:
            n = len(p.split())
            if len(words) == 8 + n and " ".join(words[4: 4 + n]) == p:
                a, b = _parse_group(words[:4]), _parse_group(words[4 + n:])
                if a is not None and b is not None:
                    return Scene(a, relation, b)
    return None


def heldout_combos(seed: int = HOLDOUT_SEED) -> frozenset[tuple[str, str]]:
    """One (colour, shape) combination per colour, never in training; every colour and shape is still seen."""
    rng = random.Random(f"scenes-holdout:{seed}")
    colors, offset = list(COLORS), rng.randrange(len(SHAPES))
    rng.shuffle(colors)
    return frozenset((c, SHAPES[(i + offset) % len(SHAPES)]) for i, c in enumerate(colors))


def _group(rng: random.Random, holdout: frozenset[tuple[str, str]], novel: bool) -> Group:
    while True:
        color, shape = (rng.choice(sorted(holdout)) if novel else (rng.choice(list(COLORS)), rng.choice(SHAPES)))
        if novel or (color, shape) not in holdout:
            return Group(rng.randint(1, 3), rng.choice(SIZES), color, shape)


def sample_scene(rng: random.Random, split: str = "train", holdout: frozenset[tuple[str, str]] | None = None) -> Scene:
    """A random scene; ``novel``: one group (either) has a held-out colour-shape combination."""
    holdout = heldout_combos() if holdout is None else holdout
    novel_side = rng.randrange(2) if split == "novel" else -1
    a, b = _group(rng, holdout, novel_side == 0), _group(rng, holdout, novel_side == 1)
    return Scene(a, rng.choice(RELATIONS), b)


def _edits(g: Group, kind: str) -> list[Group]:
    values = {"count": (1, 2, 3), "size": SIZES, "color": tuple(COLORS), "shape": SHAPES}[kind]
    return [replace(g, **{kind: v}) for v in values if v != getattr(g, kind)]


def hard_negatives(s: Scene) -> dict[str, list[Scene]]:
    """Scenes one minimal edit away from ``s``, by kind: one attribute of one group, the relation, or the two
    groups' colours swapped (attribute binding; empty when both groups share a colour)."""
    out = {kind: [replace(s, first=g) for g in _edits(s.first, kind)] + [replace(s, second=g) for g in _edits(s.second, kind)]
           for kind in ("count", "size", "color", "shape")}
    out["relation"] = [replace(s, relation=r) for r in RELATIONS if r != s.relation]
    swap = replace(s, first=replace(s.first, color=s.second.color), second=replace(s.second, color=s.first.color))
    out["binding"] = [swap] if s.first.color != s.second.color else []
    return out


# Kinds of edit a training twin makes, weighted: shape and relation are what a CLIP trained on random batches
# skips (colours alone tell two random scenes apart), so they come up most.
TWIN_KINDS = ("shape", "shape", "relation", "relation", "count", "size", "color", "binding")


def twin(s: Scene, rng: random.Random, holdout: frozenset[tuple[str, str]]) -> Scene:
    """A hard negative of ``s`` to train beside it: one minimal edit (``TWIN_KINDS``) avoiding ``holdout``."""
    negs = hard_negatives(s)
    while True:
        options = [e for e in negs[rng.choice(TWIN_KINDS)]
                   if all((g.color, g.shape) not in holdout for g in (e.first, e.second))]
        if options:
            return rng.choice(options)


def _background(size: int, rng: random.Random) -> np.ndarray:
    """A low-saturation two-colour gradient with pixel noise, (size, size, 3) uint8."""
    def tone() -> np.ndarray:
        grey = rng.uniform(50, 225)
        return np.array([grey + rng.uniform(-18, 18) for _ in range(3)], np.float32)

    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    t = ((np.cos(angle) * xx + np.sin(angle) * yy) - min(0, np.cos(angle)) - min(0, np.sin(angle)))
    t = (t / max(1e-6, float(t.max())))[..., None]
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (size, size, 3)).astype(np.float32)
    return np.clip(tone() * (1 - t) + tone() * t + noise, 0, 255).astype(np.uint8)


def _regions(relation: str, size: int, rng: random.Random) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Boxes (x0, y0, x1, y1) of the first and second group; the first is ``relation`` of the second."""
    m, gap = size * 0.03, size * 0.04
    cut = size / 2 + rng.uniform(-0.08, 0.08) * size
    low, high = (m, cut - gap / 2), (cut + gap / 2, size - m)
    spans = (low, high) if relation in ("left", "above") else (high, low)
    if relation in ("left", "right"):
        return tuple((s[0], m, s[1], size - m) for s in spans)  # type: ignore[return-value]
    return tuple((m, s[0], size - m, s[1]) for s in spans)  # type: ignore[return-value]


def _centres(box: tuple[float, ...], count: int, r: float, rng: random.Random) -> list[tuple[float, float]]:
    """``count`` non-overlapping centres inside ``box`` (random; a grid along the long side if that fails)."""
    x0, y0, x1, y1 = box
    for _ in range(30):
        pts = [(rng.uniform(x0 + r, x1 - r), rng.uniform(y0 + r, y1 - r)) for _ in range(count)]
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 > (2.2 * r) ** 2 for i, p in enumerate(pts) for q in pts[:i]):
            return pts
    wide = (x1 - x0) >= (y1 - y0)
    step = ((x1 - x0) if wide else (y1 - y0)) / count
    return [((x0 + step * (i + 0.5), (y0 + y1) / 2) if wide else ((x0 + x1) / 2, y0 + step * (i + 0.5)))
            for i in range(count)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        w = r * 0.38
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """Draw ``scene``: each group inside its side of a jittered cut, sizes and colours jittered per object."""
    img = Image.fromarray(_background(size, rng))
    draw = ImageDraw.Draw(img)
    for group, box in zip((scene.first, scene.second), _regions(scene.relation, size, rng), strict=True):
        radius = _RADIUS[group.size] * size / 64 * rng.uniform(0.88, 1.12)
        radius = min(radius, min(box[2] - box[0], box[3] - box[1]) / 2 * 0.98)
        for cx, cy in _centres(box, group.count, radius, rng):
            fill = tuple(max(0, min(255, c + rng.randint(-14, 14))) for c in COLORS[group.color])
            _draw(draw, group.shape, cx, cy, radius * rng.uniform(0.94, 1.06), fill)
    return img


def sample_key(split: str, i: int) -> str:
    return f"scn{split[:2]}{i:08d}"


def generate(n: int, seed: int = 0, size: int = 64, start: int = 0, split: Split = "train",
             holdout_seed: int = HOLDOUT_SEED, twins: bool = False) -> Iterator[SceneSample]:
    """``n`` samples of ``split``, sample ``i`` depending only on (seed, split, i, holdout_seed, twins);
    ``twins``: each odd sample is a ``twin`` of the one before it (``train`` / ``test`` only)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if twins and split == "novel":
        raise ValueError("twins: an edit may drop the novel combination; use split train or test")
    holdout = heldout_combos(holdout_seed)
    for i in range(start, start + n):
        rng = random.Random(f"scenes:{seed}:{split}:{i}")
        if twins and i % 2:
            base = sample_scene(random.Random(f"scenes:{seed}:{split}:{i - 1}"), split, holdout)
            scene = twin(base, rng, holdout)
        else:
            scene = sample_scene(rng, split, holdout)
        refs = references(scene)
        yield SceneSample(key=sample_key(split, i), caption=refs[0], references=refs, image=render(scene, size, rng),
                          scene=scene)


def training_caption(sample: SceneSample, seed: int = 0) -> str:
    """One of the sample's references, chosen by (seed, key): varied wording for contrastive training."""
    return random.Random(f"{seed}:{sample.key}").choice(sample.references)


def write_url_list(out_dir: str | Path, n: int, base_url: str, seed: int = 0, size: int = 64,
                   image_format: str = "png", split: Split = "train") -> Path:
    """``synthetic.write_url_list`` for scenes, and ``references.jsonl`` (``{"key", "caption"}`` rows)."""
    refs: list[str] = []

    def noting_references(samples: Iterator[SceneSample]) -> Iterator[SceneSample]:
        for s in samples:
            refs.extend(json.dumps({"key": s.key, "caption": c}) for c in s.references)
            yield s

    tsv = synthetic.write_images(out_dir, noting_references(generate(n, seed=seed, size=size, split=split)),
                                 base_url, image_format)
    (Path(out_dir) / "references.jsonl").write_text("\n".join(refs) + "\n")
    return tsv


def write_webdataset(out_dir: str | Path, n: int, *, seed: int = 0, size: int = 64, shard_size: int = 1024,
                     start: int = 0, split: Split = "train", caption: Literal["canonical", "random"] = "canonical",
                     twins: bool = False) -> list[Path]:
    """Webdataset shards in img2dataset's layout: ``.txt`` the canonical caption or (``random``) a reference,
    ``.json`` every reference. ``twins``: as ``generate`` (an even ``shard_size`` keeps pairs together)."""
    def members(first: int, count: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        for s in generate(count, seed=seed, size=size, start=first, split=split, twins=twins):
            text = s.caption if caption == "canonical" else training_caption(s, seed)
            meta = {"key": s.key, "caption": text, "references": list(s.references), "status": "success"}
            yield s.key, {"png": synthetic.png_bytes(s.image), "txt": text.encode(), "json": json.dumps(meta).encode()}

    return synthetic.write_shards(out_dir, n, members, shard_size=shard_size, start=start)


def caption_space() -> dict[str, int]:
    """Sizes: groups, canonical captions (ordered group pairs x relations), scenes, captions with every phrasing."""
    groups = len(COUNTS) * len(SIZES) * len(COLORS) * len(SHAPES)
    canonical = groups * groups * len(RELATIONS)
    return {"groups": groups, "canonical_captions": canonical, "scenes": canonical // 2,
            "captions": canonical * 3}

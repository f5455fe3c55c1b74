"""Seeded synthetic captioned images: the embedded default data set (no internet needed)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COUNTS = ("a", "two", "three")
SIZES = ("small", "large")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top", "bottom", "left", "right")
_POSITION_PHRASE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}

# Every word a synthetic caption can contain (the tiny preset's tokenizer is built from this).
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(COUNTS) | set(SIZES) | set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES}
        | {"at", "the", "on", "top", "bottom", "left", "right", "."}
    )
)


@dataclass(frozen=True)
class Attributes:
    count: int  # 1..3
    size: str
    color: str
    shape: str
    position: str


@dataclass(frozen=True)
class SyntheticSample:
    key: str
    caption: str
    image: Image.Image
    attributes: Attributes


def caption_for(a: Attributes) -> str:
    noun = a.shape if a.count == 1 else a.shape + "s"
    return f"{COUNTS[a.count - 1]} {a.size} {a.color} {noun} {_POSITION_PHRASE[a.position]}"


def parse_caption(caption: str) -> Attributes | None:
    """Inverse of ``caption_for`` (tolerates a trailing '.' and case); None if it is not a valid caption."""
    words = caption.lower().replace(".", " ").split()
    if len(words) != 7:
        return None
    count_w, size, color, noun, *pos = words
    if count_w not in COUNTS or size not in SIZES or color not in COLORS:
        return None
    count = COUNTS.index(count_w) + 1
    shape = noun if count == 1 else noun[:-1]
    if shape not in SHAPES or (count > 1 and not noun.endswith("s")):
        return None
    phrase = " ".join(pos)
    position = next((p for p, ph in _POSITION_PHRASE.items() if ph == phrase), None)
    if position is None:
        return None
    return Attributes(count=count, size=size, color=color, shape=shape, position=position)


def sample_attributes(rng: random.Random) -> Attributes:
    return Attributes(count=rng.randint(1, 3), size=rng.choice(SIZES), color=rng.choice(list(COLORS)),
                      shape=rng.choice(SHAPES), position=rng.choice(POSITIONS))


def _region(position: str, size: int) -> tuple[int, int, int, int]:
    h = size // 2
    return {"top": (0, 0, size, h), "bottom": (0, h, size, size), "left": (0, 0, h, size), "right": (h, 0, size, size)}[position]


def render(a: Attributes, size: int, rng: random.Random) -> Image.Image:
    """Draw ``a`` on a lightly varied background; shapes sit side by side inside their half of the image."""
    img = Image.new("RGB", (size, size), tuple(235 + rng.randint(-15, 15) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = _region(a.position, size)
    horizontal = (x1 - x0) >= (y1 - y0)
    cell = ((x1 - x0) if horizontal else (y1 - y0)) // a.count
    other = (y1 - y0) if horizontal else (x1 - x0)
    radius = max(2, int(min(cell, other) * (0.42 if a.size == "large" else 0.2)))
    color = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in COLORS[a.color])
    for i in range(a.count):
        jitter = max(1, min(cell, other) // 2 - radius)
        c_main = (x0 if horizontal else y0) + cell * i + cell // 2 + rng.randint(-jitter // 2, jitter // 2)
        c_other = (y0 if horizontal else x0) + other // 2 + rng.randint(-jitter // 2, jitter // 2)
        cx, cy = (c_main, c_other) if horizontal else (c_other, c_main)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if a.shape == "circle":
            draw.ellipse(box, fill=color)
        elif a.shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=color)
    return img


def generate(n: int, seed: int = 0, size: int = 64, start: int = 0) -> Iterator[SyntheticSample]:
    """``n`` samples; sample ``i`` depends only on (seed, i), so ranges can be generated independently."""
    for i in range(start, start + n):
        rng = random.Random(f"{seed}:{i}")
        attrs = sample_attributes(rng)
        yield SyntheticSample(key=f"syn{i:08d}", caption=caption_for(attrs), image=render(attrs, size, rng),
                              attributes=attrs)


def write_images(out_dir: str | Path, samples: Iterable[Any], base_url: str, image_format: str = "png") -> Path:
    """Each sample's ``image`` under ``out_dir/images`` and a ``caption<TAB>url`` TSV (CC3M layout)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in samples:
        name = f"{s.key}.{image_format}"
        s.image.save(out / "images" / name)
        lines.append(f"{s.caption}\t{base_url.rstrip('/')}/images/{name}")
    tsv = out / "captions.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return tsv


def write_url_list(out_dir: str | Path, n: int, base_url: str, seed: int = 0, size: int = 64,
                   image_format: str = "png") -> Path:
    return write_images(out_dir, generate(n, seed=seed, size=size), base_url, image_format)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


Members = Callable[[int, int], Iterable[tuple[str, dict[str, bytes]]]]  # (first, count) -> (key, {ext: bytes})


def write_shards(out_dir: str | Path, n: int, members: Members, *, shard_size: int = 1024, start: int = 0
                 ) -> list[Path]:
    """Samples ``start .. start + n`` (files from ``members``) as img2dataset-layout shards."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, first in enumerate(range(start, start + n, shard_size)):
        path = out / f"{shard:05d}.tar"
        tmp = path.with_name(f".{path.name}.tmp")
        with tarfile.open(tmp, "w") as tf:
            for key, files in members(first, min(shard_size, start + n - first)):
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        tmp.replace(path)
        paths.append(path)
    return paths


def write_webdataset(out_dir: str | Path, n: int, *, seed: int = 0, size: int = 64, shard_size: int = 1024,
                     start: int = 0) -> list[Path]:
    """``n`` samples (``generate``'s) as webdataset shards: CLIP training without a download step."""
    def members(first: int, count: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        for s in generate(count, seed=seed, size=size, start=first):
            meta = {"key": s.key, "caption": s.caption, "status": "success"}
            yield s.key, {"png": png_bytes(s.image), "txt": s.caption.encode(), "json": json.dumps(meta).encode()}

    return write_shards(out_dir, n, members, shard_size=shard_size, start=start)


def all_captions() -> list[str]:
    """Every caption the generator can produce (432), sorted: the class list for zero-shot evaluation."""
    return sorted(caption_for(Attributes(count=c, size=s, color=col, shape=sh, position=p))
                  for c in (1, 2, 3) for s in SIZES for col in COLORS for sh in SHAPES for p in POSITIONS)

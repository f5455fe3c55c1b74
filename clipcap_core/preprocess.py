"""CLIP inference preprocessing that decode tasks run: ``PreprocessSpec`` and ``ImageResizer`` (PIL -> uint8).

Pixel-equal to open_clip's eval transform (tests check it), so decode tasks import no torch, torchvision or
open_clip; modes other than the default square ``shortest`` use open_clip's own transform.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class PreprocessSpec:
    """Picklable inference preprocessing of a model (open_clip's ``PreprocessCfg`` fields)."""

    size: int | tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def describe(self) -> str:
        """Stable one-line description recorded in table metadata."""
        return (f"resize={self.resize_mode}:{self.interpolation} size={self.size} mean={list(self.mean)} "
                f"std={list(self.std)}")


def spec_from_dict(d: dict[str, Any]) -> PreprocessSpec:
    size = d["size"] if isinstance(d["size"], int) else tuple(d["size"])
    if isinstance(size, tuple) and len(set(size)) == 1:
        size = int(size[0])  # (64, 64) -> 64: one spelling, so specs compare equal
    return PreprocessSpec(size=size, mean=tuple(d["mean"]), std=tuple(d["std"]),
                          interpolation=d.get("interpolation", "bicubic"),
                          resize_mode=d.get("resize_mode", "shortest"), fill_color=d.get("fill_color", 0))


class ImageResizer:
    """The geometric part of open_clip's eval transform: PIL image -> uint8 array (H, W, 3). Picklable."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        self._steps: list[Any] | None = None
        if not (spec.resize_mode == "shortest" and isinstance(spec.size, int)):
            # lazy: open_clip + torch ~12.6 s to import (python -X importtime)
            from open_clip.transform import PreprocessCfg, image_transform_v2

            full = image_transform_v2(PreprocessCfg(**asdict(spec)), is_train=False)
            steps = list(full.transforms)
            cut = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
            self._steps = steps[:cut]  # resize / crop / convert-to-RGB, all PIL -> PIL
        # open_clip: bilinear when asked, bicubic for anything else
        self._resample = Image.Resampling.BILINEAR if spec.interpolation == "bilinear" else Image.Resampling.BICUBIC

    def __call__(self, image: Image.Image) -> np.ndarray:
        if self._steps is None:
            image = self._shortest_square(image)
        else:
            for step in self._steps:
                image = step(image)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    def _shortest_square(self, image: Image.Image) -> Image.Image:
        size = int(self.spec.size)
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)  # torchvision's _compute_resized_output_size
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), self._resample)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))  # torchvision center_crop
        return image.crop((left, top, left + size, top + size))

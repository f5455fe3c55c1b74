"""``ImageResizer`` (torch-free for open_clip's default eval geometry) equals open_clip's own transform."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from clipcap_core.imaging import ImageResizer, PreprocessSpec

SHAPES = [(1, 1), (7, 300), (300, 7), (223, 224), (224, 224), (225, 224), (640, 480), (479, 641), (33, 1000),
          (1000, 999), (64, 64), (65, 63), (150, 225)]


def open_clip_geometry(spec: PreprocessSpec, image: Image.Image) -> np.ndarray:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    steps = list(image_transform_v2(PreprocessCfg(**asdict(spec)), is_train=False).transforms)
    for step in steps[:next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)]:
        image = step(image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def noise_image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.mark.parametrize("size,interpolation", [(224, "bicubic"), (64, "bicubic"), (224, "bilinear")])
def test_shortest_square_equals_open_clip_pixel_for_pixel(size, interpolation):
    spec = PreprocessSpec(size=size, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation=interpolation)
    resizer = ImageResizer(spec)
    assert resizer._steps is None  # the torch-free path is the one under test
    for i, (w, h) in enumerate(SHAPES):
        for mode in ("RGB", "RGBA", "L", "P"):
            image = noise_image(w, h, mode, seed=i)
            ours = resizer(image)
            assert ours.shape == (size, size, 3)
            np.testing.assert_array_equal(ours, open_clip_geometry(spec, image), err_msg=f"{w}x{h} {mode}")


@pytest.mark.parametrize("mode,size", [("longest", 64), ("squash", 64), ("shortest", (48, 64))])
def test_other_modes_use_open_clip(mode, size):
    spec = PreprocessSpec(size=size, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode=mode, fill_color=7)
    image = noise_image(90, 40, "RGB", seed=3)
    out = ImageResizer(spec)(image)
    np.testing.assert_array_equal(out, open_clip_geometry(spec, image))
    assert out.shape[:2] == ((size, size) if isinstance(size, int) else size)

"""Images without torch: safe decoding of untrusted bytes (pixel count checked from the header before
decoding, Pillow's process-wide settings left alone), and the CLIP inference resize that decode tasks run,
pixel-equal to open_clip's eval transform.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 64 megapixels: more than any photo a captioner needs, far below what exhausts RAM (256 MB decoded as RGBA)
DEFAULT_MAX_PIXELS = 64_000_000

# File extensions treated as images when grouping webdataset samples (elsewhere the decoder decides)
IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "jp2", "jfif"}
)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why (it becomes the ``error`` of an error row)."""


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (the last one, case-insensitive)."""
    ext = posixpath.basename(name).rsplit(".", 1)[-1].lower() if "." in posixpath.basename(name) else ""
    return ext in IMAGE_EXTENSIONS


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Untrusted image bytes -> an upright 8-bit RGB image (an animation: its first frame)."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow warns above its own limit; we apply ours explicitly below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageDecodeError(f"not an image (unknown format, {len(data)} bytes)") from None
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"decompression bomb: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is a per-sample error
            raise ImageDecodeError(f"corrupt image header: {type(exc).__name__}: {exc}") from None
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"decompression bomb: {width}x{height} = {width * height} pixels > limit {max_pixels}"
            )
        if draft_size is not None and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
            img.draft(img.mode, draft_size)
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001
            raise ImageDecodeError(f"truncated or corrupt image data: {type(exc).__name__}: {exc}") from None
    with contextlib.suppress(Exception):  # a malformed EXIF block is not a reason to drop the image
        img = ImageOps.exif_transpose(img)
    try:
        return to_rgb(img)
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(f"cannot convert mode {img.mode!r} to RGB: {type(exc).__name__}: {exc}") from None


_ROWS_PER_BLOCK = 256


def sixteen_to_eight(arr: np.ndarray) -> np.ndarray:
    """16-bit (or int32 "I") grey levels to 8 bits, round(x / 257) clipped to 0..255, in integer arithmetic a
    block of rows at a time (a float copy of a 64 MP image would need 512 MB)."""
    out = np.empty(arr.shape, dtype=np.uint8)
    for r in range(0, arr.shape[0], _ROWS_PER_BLOCK):
        block = np.clip(arr[r: r + _ROWS_PER_BLOCK], 0, 65535).astype(np.uint32)
        block += 128
        block //= 257  # exact round(x / 257): x / 257 is never a tie for integer x
        out[r: r + _ROWS_PER_BLOCK] = block
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB view of any Pillow mode (alpha composited on white, 16-bit scaled, not clipped)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(sixteen_to_eight(np.asarray(img)), mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        if arr.size and arr.max() <= 1.0:
            arr *= 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


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

"""Safe image decoding: untrusted bytes in, an RGB ``PIL.Image`` out, or an ``ImageDecodeError`` saying why.

The caller writes an error row for bad data; the pixel count is checked from the header
before any pixel is decoded; 16-bit images are scaled to 8 bits, not clipped; EXIF orientation is applied;
animations give their first frame. Pillow's process-wide settings are left alone.
"""

from __future__ import annotations

import io
import posixpath
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 64 megapixels (e.g. 8000 x 8000): larger than any photo a captioner needs, far below what exhausts RAM
# (an RGBA 64 MP image is 256 MB decoded).
DEFAULT_MAX_PIXELS = 64_000_000

# File extensions we treat as images when grouping webdataset samples (directories and plain archives do
# not look at extensions: every file is a member, and the decoder decides).
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
    """Decode untrusted image bytes to an upright 8-bit RGB image."""
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
    img = _exif_upright(img)
    try:
        return to_rgb(img)
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(f"cannot convert mode {img.mode!r} to RGB: {type(exc).__name__}: {exc}") from None


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is not a reason to drop the image
        return img
    return out if out is not None else img


_ROWS_PER_BLOCK = 256


def sixteen_to_eight(arr: np.ndarray) -> np.ndarray:
    """16-bit (or int32 "I") grey levels to 8 bits, round(x / 257) clipped to 0..255, in integer arithmetic
    a block of rows at a time: a float64 copy of a 64 MP image was 512 MB (1.6 GB peak for an 8000x8000 PNG
    of 124 KB); this needs the uint8 output plus one block."""
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
    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")

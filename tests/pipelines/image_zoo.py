"""Good and bad image files for the decoding, source-reader and bulk-captioning tests (built in memory).

``good_images()`` are decodable in every awkward mode we promise to handle; ``bad_images()`` must each
become an error row. Both return ``{file name: bytes}``.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunks(width: int, height: int, bit_depth: int, color_type: int, raw: bytes | None = None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor lie about its size)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(raw if raw is not None else b"\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png16_rgb(width: int = 16, height: int = 12) -> bytes:
    """48-bit RGB PNG: red = 65535 everywhere, green = 0, blue = 32896 (-> 128 after scaling)."""
    px = np.zeros((height, width, 3), dtype=">u2")
    px[..., 0], px[..., 2] = 65535, 32896
    rows = b"".join(b"\x00" + px[y].tobytes() for y in range(height))
    return png_chunks(width, height, 16, 2, rows)


def png16_gray(width: int = 16, height: int = 12, value: int = 51400) -> bytes:
    img = Image.fromarray(np.full((height, width), value, dtype=np.uint16))  # mode I;16
    return _encode(img, "PNG")


def exif_rotated_jpeg() -> bytes:
    """A 40x20 JPEG, left half red, with EXIF orientation 6 (display rotated 90 deg clockwise: 20x40)."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)


def good_images() -> dict[str, bytes]:
    rgb = Image.new("RGB", (32, 24), (200, 30, 30))
    gray = Image.new("L", (24, 24), 90)
    rgba = Image.new("RGBA", (24, 24), (0, 0, 255, 0))  # fully transparent -> white
    la = Image.new("LA", (24, 24), (10, 255))
    pal = Image.new("P", (24, 24), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    cmyk = Image.new("CMYK", (24, 24), (0, 255, 255, 0))  # red in CMYK
    return {
        "rgb.jpg": _encode(rgb, "JPEG"),
        "gray.png": _encode(gray, "PNG"),
        "rgba.png": _encode(rgba, "PNG"),
        "la.png": _encode(la, "PNG"),
        "palette.png": _encode(pal, "PNG", transparency=0),
        "cmyk.jpg": _encode(cmyk, "JPEG"),
        "gray16.png": png16_gray(),
        "rgb16.png": png16_rgb(),
        "rotated.jpg": exif_rotated_jpeg(),
        "photo.webp": _encode(rgb, "WEBP"),
        "anim.gif": _encode(rgb.convert("P"), "GIF", save_all=True, append_images=[gray.convert("P")]),
    }


def bad_images() -> dict[str, bytes]:
    jpeg = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    png = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    return {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "notes.txt": b"this is not an image\n",
        "bomb.png": png_chunks(60_000, 60_000, 1, 0),  # 3.6 G pixels declared, a few bytes on disk
        "bomb-small.png": png_chunks(9_000, 9_000, 1, 0),  # above our 64 MP limit, below Pillow's own
        "garbage.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
    }

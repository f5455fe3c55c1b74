"""Good and bad image files for the decoding, source-reader and bulk-captioning tests (built in memory).

``good_images()`` are decodable in every awkward mode we promise to handle; ``bad_images()`` must each
become an error row. Both return ``{file name: bytes}``.
"""

from __future__ import annotations

import io
import struct
import zipfile
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


# --- a mixed input of every kind, with bad members -----------------------------------------------------
def _tar_bytes(entries: list[tuple[str, bytes | None, bytes]], gz: bool = False) -> bytes:
    """entries: (name, data or None for a directory, tar type)."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE or kind == tarfile.LNKTYPE:
                info.linkname = data.decode() if data else "/etc/passwd"
                tf.addfile(info)
            elif kind == tarfile.DIRTYPE:
                tf.addfile(info)
            else:
                info.size = len(data or b"")
                tf.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def _zip_bytes(entries: list[tuple[str, bytes]], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
        zf.writestr(zipfile.ZipInfo("subdir/"), b"")  # a directory entry: not a member
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, b"/etc/passwd")
    return buf.getvalue()


def write_mixed_input(root, *, base_url: str | None, dim: int, clip_model: str) -> dict[str, bool]:
    """Write an input directory holding every input kind, each mixed with bad members, under local ``root``.

    Returns {expected key: True if it must be captioned, False if it must be an error row}.
    ``base_url`` serves ``root`` over HTTP (URL table rows point at ``root/http/``); None leaves URLs out.
    """
    import tarfile
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipcap_core import synthetic

    root = Path(root)
    good, bad = good_images(), bad_images()
    syn = list(synthetic.generate(12, seed=7, size=48))
    png = {s.key: _encode(s.image, "PNG") for s in syn}
    keys = list(png)
    expect: dict[str, bool] = {}

    def put(rel: str, data: bytes) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    # loose images, nested, with bad files; hidden and bookkeeping paths are skipped (a camera's _DSC name is read)
    for i, (name, data) in enumerate(sorted(good.items())):
        rel = f"images/{'ab'[i % 2]}/{name}"
        put(rel, data)
        expect[rel] = True
    for name in ("empty.jpg", "truncated.jpg", "notes.txt", "bomb.png"):
        put(f"images/bad/{name}", bad[name])
        expect[f"images/bad/{name}"] = False
    put("images/.hidden.jpg", good["rgb.jpg"])
    put("images/_meta/x.jpg", good["rgb.jpg"])
    put("images/_DSC0001.JPG", good["rgb.jpg"])
    expect["images/_DSC0001.JPG"] = True

    # plain tar: good, bad, unsafe paths, links, duplicates, a directory entry
    reg = tarfile.REGTYPE
    tar_entries = [("./photos/", None, tarfile.DIRTYPE), ("./photos/s0.png", png[keys[0]], reg),
                   ("photos/cmyk.jpg", good["cmyk.jpg"], reg), ("photos/trunc.png", bad["truncated.png"], reg),
                   ("../escape.png", png[keys[1]], reg), ("/abs/evil.png", png[keys[1]], reg),
                   ("photos/link.png", b"/etc/passwd", tarfile.SYMTYPE),
                   ("photos/hard.png", b"photos/s0.png", tarfile.LNKTYPE),
                   ("photos/s0.png", png[keys[2]], reg)]  # duplicate name
    put("archives/plain.tar", _tar_bytes(tar_entries))
    expect.update({"archives/plain.tar/photos/s0.png": True, "archives/plain.tar/photos/cmyk.jpg": True,
                   "archives/plain.tar/photos/trunc.png": False})
    expect.update({f"archives/plain.tar/{n}": False for n in ("../escape.png", "/abs/evil.png", "photos/link.png",
                                                                "photos/hard.png")})
    # (the duplicate photos/s0.png is a second error row with the same key: see dup_keys)

    put("archives/pack.tar.gz", _tar_bytes([("a.png", png[keys[3]], reg), ("b.jpg", bad["empty.jpg"], reg)],
                                           gz=True))
    expect.update({"archives/pack.tar.gz/a.png": True, "archives/pack.tar.gz/b.jpg": False})

    # a tar cut in the middle of its third member: two members, then one error row for the archive
    full = _tar_bytes([(f"m{i}.png", png[keys[4 + i]], reg) for i in range(3)])
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        cut = tf.getmembers()[2].offset_data + 10
    put("archives/cut.tar", full[:cut])
    expect.update({"archives/cut.tar/m0.png": True, "archives/cut.tar/m1.png": True, "archives/cut.tar": False})

    put("archives/pics.zip", _zip_bytes([("z/good.png", png[keys[7]]), ("z/gray16.png", good["gray16.png"]),
                                         ("z/notes.txt", bad["notes.txt"]), ("../zipslip.png", png[keys[7]])],
                                        symlink="z/link.png"))
    expect.update({"archives/pics.zip/z/good.png": True, "archives/pics.zip/z/gray16.png": True,
                   "archives/pics.zip/z/notes.txt": False, "archives/pics.zip/../zipslip.png": False,
                   "archives/pics.zip/z/link.png": False})
    put("archives/broken.zip", b"PK\x03\x04 this is not really a zip")
    expect["archives/broken.zip"] = False

    # webdataset shard in img2dataset layout (its .parquet and _stats.json are metadata, not inputs)
    wds = [("000000000.jpg", _encode(syn[8].image, "JPEG"), reg), ("000000000.txt", syn[8].caption.encode(), reg),
           ("000000000.json", b"{}", reg), ("000000001.txt", b"no image here", reg),
           ("000000002.png", bad["truncated.png"], reg), ("000000002.txt", b"bad image", reg),
           ("000000003.webp", _encode(syn[9].image, "WEBP"), reg)]
    put("wds/00000.tar", _tar_bytes(wds))
    pq.write_table(pa.table({"key": ["000000000"], "url": ["http://example.invalid/x.jpg"]}), root / "wds/00000.parquet")
    put("wds/00000_stats.json", b"{}")
    expect.update({"wds/00000.tar/000000000": True, "wds/00000.tar/000000001": False,
                   "wds/00000.tar/000000002": False, "wds/00000.tar/000000003": True})

    # Parquet with image bytes (HF-style struct column), two row groups
    rows = [("p0", png[keys[10]]), ("p1", bad["notes.txt"]), ("p2", None), ("p3", good["la.png"])]
    struct = pa.array([{"bytes": b, "path": None} for _, b in rows],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    (root / "tables").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": [k for k, _ in rows], "image": struct}), root / "tables/bytes.parquet",
                   row_group_size=2)
    expect.update({"tables/bytes.parquet/p0": True, "tables/bytes.parquet/p1": False,
                   "tables/bytes.parquet/p2": False, "tables/bytes.parquet/p3": True})

    if base_url is not None:
        put("http/u0.png", png[keys[11]])
        urls = [f"{base_url}/http/u0.png", f"{base_url}/http/missing.png", "file:///etc/passwd", None]
        pq.write_table(pa.table({"url": urls}), root / "tables/urls.parquet")  # no key column: #row keys
        expect["http/u0.png"] = True  # also a loose image of the input
        expect.update({"tables/urls.parquet/#0": True, "tables/urls.parquet/#1": False,
                       "tables/urls.parquet/#2": False, "tables/urls.parquet/#3": False})

    # an embedding table (CLIP skipped), with a NaN row
    emb = np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32)
    emb[1, 0] = np.nan
    from pipelines.io import schemas

    meta = schemas.embedding_metadata(clip_model=clip_model, clip_pretrained=None, dim=dim, dtype="float32",
                                      preprocess="test")
    table = pa.table({"key": ["e0", "e1", "e2"], "caption": [None] * 3, "url": [None] * 3,
                      "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim)},
                     schema=schemas.with_metadata(schemas.embedding_schema(dim), meta))
    pq.write_table(table, root / "tables/emb.parquet")
    expect.update({"tables/emb.parquet/e0": True, "tables/emb.parquet/e1": False, "tables/emb.parquet/e2": True})
    put("tables/broken.parquet", b"PAR1 not really parquet PAR1")
    expect["tables/broken.parquet"] = False
    return expect


# keys that appear twice in the errors table of write_mixed_input (duplicate archive members)
DUP_ERROR_KEYS = ("archives/plain.tar/photos/s0.png",)

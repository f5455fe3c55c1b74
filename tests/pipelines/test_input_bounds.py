"""Bounded inputs: loose files must be regular files inside the real input
folder, reads are capped, 16-bit decoding stays in integers, ``--overwrite`` removes only our files."""

from __future__ import annotations

import io
import os
import tracemalloc

import numpy as np
from PIL import Image

from clipcap_core import imaging
from pipelines.caption import output as caption_output
from pipelines.io.sources import SourceConfig, plan_parts, read_part


def _png(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def _records(root, **kw) -> dict[str, object]:
    cfg = SourceConfig(format="images", **kw)
    return {r.key: r for p in plan_parts(str(root), cfg) for r in read_part(p, cfg)}


def test_symlinks_out_of_the_input_folder_and_devices_are_error_rows(tmp_path):
    inp, outside = tmp_path / "in", tmp_path / "outside"
    inp.mkdir()
    outside.mkdir()
    (inp / "ok.png").write_bytes(_png())
    (outside / "secret.png").write_bytes(_png((1, 2, 3)))
    (inp / "inside-link.png").symlink_to(inp / "ok.png")    # stays inside: fine
    (inp / "escape.png").symlink_to(outside / "secret.png")  # a file outside the input: never read
    (inp / "zero.png").symlink_to("/dev/zero")               # a device: reading it would never end
    recs = _records(inp)
    assert recs["ok.png"].data == _png() and recs["inside-link.png"].data == _png()
    assert "outside the input folder" in recs["escape.png"].error and recs["escape.png"].data is None
    assert recs["zero.png"].error is not None and recs["zero.png"].data is None


def test_reads_are_capped_even_when_the_listing_says_small(tmp_path, monkeypatch):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "big.png").write_bytes(b"x" * 5000)
    from pipelines.io import sources

    # A listing that lies about the size (as a device or a growing object does): the read itself is bounded.
    real = sources.scan_input
    monkeypatch.setattr(sources, "scan_input", lambda uri, opts=None: sources.Listing(
        [sources.InputFile(f.uri, f.rel, 10) for f in real(uri, opts).files], []))
    rec = _records(inp, max_member_bytes=1000)["big.png"]
    assert "larger than 1000 bytes" in rec.error


def test_sixteen_bit_conversion_is_exact_and_integer():
    rng = np.random.default_rng(0)
    arr = np.concatenate([rng.integers(0, 65536, size=(700, 33)), [[0] * 33, [65535] * 33, [128] * 33,
                                                                   [385] * 33]]).astype(np.uint16)
    expect = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(imaging.sixteen_to_eight(arr), expect)
    wide = np.array([[-5, 70000, 257 * 3]], dtype=np.int32)  # mode "I" may exceed 16 bits
    np.testing.assert_array_equal(imaging.sixteen_to_eight(wide), [[0, 255, 3]])


def test_sixteen_bit_png_decodes_without_a_float64_copy():
    """4000x4000 16-bit (16 MP): a float64 copy alone is 128 MB; our numpy peak must stay near the uint16
    view + the uint8 result (~48 MB). Pillow's own buffers are not traced by tracemalloc."""
    img = Image.new("I;16", (4000, 4000), 40000)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    data = buf.getvalue()
    tracemalloc.start()
    try:
        out = imaging.decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (156, 156, 156)  # round(40000 / 257)
    assert peak < 80 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_overwrite_removes_only_our_part_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.io import schemas

    def write(path, part_id=None):
        meta = {schemas.META_PART: part_id} if part_id else None
        pq.write_table(pa.table({"key": ["k"]}).replace_schema_metadata(meta), path)

    out = tmp_path / "out"
    table, errors = out / "captions", out / "_meta" / "errors"
    table.mkdir(parents=True)
    errors.mkdir(parents=True)
    ours = [table / "part-images-00000.parquet", errors / "part-images-00000.parquet"]
    for p in ours:
        write(p, "images-00000")
    theirs = [table / "users.parquet", table / "part-00000.parquet", errors / "notes.parquet"]
    for p in theirs:
        write(p)
    write(table / "part-x.parquet", "y")  # our key, another name: not provably ours
    theirs.append(table / "part-x.parquet")
    caption_output._clear_output(str(out), previous=None)  # no run record of ours: not ours to clear
    assert all(p.exists() for p in ours + theirs)
    caption_output._clear_output(str(out), previous={"model": "m"})
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert os.listdir(errors) == ["notes.parquet"]

"""clipcap_core.synthetic: seeded, exact captions, CC3M-style URL list."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from clipcap_core import synthetic


def test_deterministic_and_range_independent():
    a = list(synthetic.generate(6, seed=5))
    b = list(synthetic.generate(6, seed=5))
    tail = list(synthetic.generate(3, seed=5, start=3))
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))
    assert [s.key for s in a[3:]] == [s.key for s in tail]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a[3:], tail, strict=True))
    assert [s.caption for s in synthetic.generate(6, seed=6)] != [s.caption for s in a]


def test_captions_describe_attributes_exactly():
    for s in synthetic.generate(200, seed=1):
        assert synthetic.parse_caption(s.caption) == s.attributes
        assert synthetic.parse_caption(s.caption.capitalize() + ".") == s.attributes
        assert set(s.caption.split()) <= set(synthetic.VOCABULARY)
    assert synthetic.parse_caption("two red circles at the top") is None  # size missing
    assert synthetic.parse_caption("a small red circles on the left") is None  # plural with one


def test_every_attribute_value_occurs():
    attrs = [s.attributes for s in synthetic.generate(300, seed=2)]
    assert {a.count for a in attrs} == {1, 2, 3}
    assert {a.color for a in attrs} == set(synthetic.COLORS)
    assert {a.shape for a in attrs} == set(synthetic.SHAPES)
    assert {a.position for a in attrs} == set(synthetic.POSITIONS)


def test_shapes_sit_in_their_region():
    """The coloured pixels of a 'top' image are in the top half, and so on."""
    for position, (axis, half) in {"top": (0, 0), "bottom": (0, 1), "left": (1, 0), "right": (1, 1)}.items():
        a = synthetic.Attributes(count=2, size="large", color="blue", shape="square", position=position)
        img = np.asarray(synthetic.render(a, 64, random.Random(0))).astype(int)
        coloured = np.argwhere(img[..., 2] - img[..., 0] > 100)  # blue pixels
        centre = coloured[:, axis].mean()
        assert (centre < 32) if half == 0 else (centre >= 32), position


def test_write_url_list_is_headerless_caption_tab_url(tmp_path):
    tsv = synthetic.write_url_list(tmp_path, 5, "http://127.0.0.1:9/", seed=4)
    lines = tsv.read_text().splitlines()
    assert len(lines) == 5
    expected = list(synthetic.generate(5, seed=4))
    for line, s in zip(lines, expected, strict=True):
        caption, url = line.split("\t")
        assert caption == s.caption and url == f"http://127.0.0.1:9/images/{s.key}.png"
        img = Image.open(tmp_path / "images" / f"{s.key}.png")
        assert img.size == (64, 64) and np.array_equal(np.asarray(img.convert("RGB")), np.asarray(s.image))

"""clipcap_core.scenes: seeded, several references per image, held-out combinations, a large caption space."""

from __future__ import annotations

import json
import random
import tarfile
import time

import numpy as np
import pytest

from clipcap_core import scenes


def test_deterministic_and_range_independent():
    a = list(scenes.generate(6, seed=5))
    b = list(scenes.generate(6, seed=5))
    tail = list(scenes.generate(3, seed=5, start=3))
    assert [s.references for s in a] == [s.references for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))
    assert [s.key for s in a[3:]] == [s.key for s in tail]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a[3:], tail, strict=True))
    assert [s.caption for s in scenes.generate(6, seed=6)] != [s.caption for s in a]
    assert {s.key for s in scenes.generate(4, split="test")}.isdisjoint(s.key for s in scenes.generate(4))


def test_references_say_the_same_scene_in_different_words_and_orders():
    for s in scenes.generate(200, seed=1):
        assert s.caption == s.references[0] and len(set(s.references)) == 6
        parsed = [scenes.parse_caption(r) for r in s.references]
        assert all(p is not None and p.normalized() == s.scene.normalized() for p in parsed)
        assert scenes.parse_caption(s.caption) == s.scene
        assert scenes.parse_caption(s.caption.capitalize() + ".") == s.scene
        assert all(set(r.split()) <= set(scenes.VOCABULARY) for r in s.references)
        assert {r.split()[0] for r in s.references} <= set(scenes.COUNTS)  # both groups lead some reference
    scene = scenes.Scene(scenes.Group(2, "small", "red", "circle"), "left", scenes.Group(1, "large", "blue", "square"))
    assert scenes.references(scene)[:2] == ("two small red circles left of a large blue square",
                                            "a large blue square right of two small red circles")
    assert "a large blue square to the right of two small red circles" in scenes.references(scene)
    assert scenes.parse_caption("two red circles left of a large blue square") is None  # size missing
    assert scenes.parse_caption("a small red circles left of a large blue square") is None  # plural with one


def test_caption_space_is_far_too_large_to_memorise():
    space = scenes.caption_space()
    assert space == {"groups": 240, "canonical_captions": 230_400, "scenes": 115_200, "captions": 691_200}
    captions = [s.caption for s in scenes.generate(2000, seed=3, size=16)]
    assert len(set(captions)) > 1950  # almost every image has a caption no other image has


def test_heldout_combinations_never_occur_in_training_and_fill_the_novel_split():
    held = scenes.heldout_combos()
    assert len(held) == len(scenes.COLORS)
    assert {c for c, _ in held} == set(scenes.COLORS) and len({s for _, s in held}) == len(scenes.SHAPES)
    assert scenes.heldout_combos(1) != held and scenes.heldout_combos(0) == held
    for split in ("train", "test"):
        combos = {(g.color, g.shape) for s in scenes.generate(1500, seed=2, size=16, split=split)
                  for g in (s.scene.first, s.scene.second)}
        assert combos.isdisjoint(held) and len(combos) == 40 - len(held), split
    novel = list(scenes.generate(300, seed=2, size=16, split="novel"))
    assert all({(g.color, g.shape) for g in (s.scene.first, s.scene.second)} & held for s in novel)
    assert {s.scene.relation for s in novel} == set(scenes.RELATIONS)


def test_every_attribute_value_occurs():
    groups = [g for s in scenes.generate(400, seed=4) for g in (s.scene.first, s.scene.second)]
    assert {g.count for g in groups} == {1, 2, 3} and {g.size for g in groups} == set(scenes.SIZES)
    assert {g.color for g in groups} == set(scenes.COLORS) and {g.shape for g in groups} == set(scenes.SHAPES)


def _centre(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    near = np.abs(img.astype(int) - np.array(rgb)).sum(axis=2) < 60
    return np.argwhere(near).mean(axis=0)  # (row, column)


def test_the_first_group_is_where_the_relation_says():
    a, b = scenes.Group(2, "large", "blue", "square"), scenes.Group(1, "large", "yellow", "circle")
    for relation, (axis, sign) in {"left": (1, -1), "right": (1, 1), "above": (0, -1), "below": (0, 1)}.items():
        for seed in range(5):
            img = np.asarray(scenes.render(scenes.Scene(a, relation, b), 64, random.Random(seed)))
            d = _centre(img, scenes.COLORS["blue"])[axis] - _centre(img, scenes.COLORS["yellow"])[axis]
            assert d * sign > 10, (relation, seed)


def test_renders_fast():
    t0 = time.perf_counter()
    n = sum(1 for _ in scenes.generate(200, seed=9))
    assert n / (time.perf_counter() - t0) > 50  # ~500 images/s on one free core; benchmarks/scenes.py measures


def test_write_url_list_and_webdataset_carry_every_reference(tmp_path):
    tsv = scenes.write_url_list(tmp_path / "u", 4, "http://127.0.0.1:9/", seed=4)
    samples = list(scenes.generate(4, seed=4))
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    assert rows == [[s.caption, f"http://127.0.0.1:9/images/{s.key}.png"] for s in samples]
    refs = [json.loads(line) for line in (tmp_path / "u" / "references.jsonl").read_text().splitlines()]
    assert refs == [{"key": s.key, "caption": c} for s in samples for c in s.references]
    (shard,) = scenes.write_webdataset(tmp_path / "w", 4, seed=4, caption="random")
    with tarfile.open(shard) as tf:
        for s in samples:
            text = tf.extractfile(f"{s.key}.txt").read().decode()
            meta = json.loads(tf.extractfile(f"{s.key}.json").read())
            assert text == scenes.training_caption(s, 4) and text in s.references
            assert meta["references"] == list(s.references)


def test_hard_negatives_are_one_edit_away():
    s = scenes.Scene(scenes.Group(2, "small", "red", "circle"), "left", scenes.Group(1, "large", "blue", "square"))
    negs = scenes.hard_negatives(s)
    assert len(negs["count"]) == 4 and len(negs["size"]) == 2 and len(negs["color"]) == 14
    assert len(negs["shape"]) == 8 and {n.relation for n in negs["relation"]} == {"right", "above", "below"}
    (swap,) = negs["binding"]
    assert scenes.caption_for(swap) == "two small blue circles left of a large red square"
    assert all(n != s for kind in negs.values() for n in kind)
    same = scenes.Scene(s.first, "left", scenes.Group(1, "large", "red", "square"))
    assert scenes.hard_negatives(same)["binding"] == []  # both groups red: swapping colours changes nothing


def _kind_of_edit(a: scenes.Scene, b: scenes.Scene) -> str | None:
    return next((k for k, edits in scenes.hard_negatives(a).items() if b in edits), None)


def test_twins_are_one_edit_apart_and_keep_the_holdout():
    holdout = scenes.heldout_combos()
    plain = list(scenes.generate(300, seed=3))
    twins = list(scenes.generate(300, seed=3, twins=True))
    kinds = []
    for i in range(0, 300, 2):
        base, twin = twins[i], twins[i + 1]
        assert base.scene == plain[i].scene and np.array_equal(np.asarray(base.image), np.asarray(plain[i].image))
        kinds.append(_kind_of_edit(base.scene, twin.scene))
        assert all((g.color, g.shape) not in holdout for g in (twin.scene.first, twin.scene.second))
    assert None not in kinds  # every odd sample is one minimal edit of the one before it
    assert {"shape", "relation", "count", "size", "color", "binding"} <= set(kinds)
    assert kinds.count("shape") > kinds.count("size")  # shape and relation are drawn twice as often
    assert scenes.references(twins[1].scene) == twins[1].references
    with pytest.raises(ValueError, match="twins"):
        next(scenes.generate(2, split="novel", twins=True))

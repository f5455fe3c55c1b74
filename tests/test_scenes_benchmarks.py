"""The scenes benchmarks' shared scoring (``benchmarks/scenes_eval.py``) and the seed summary of
``benchmarks/scenes_clipcap.py``, on hand-made evaluation folders (no clipcap run)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.scenes_clipcap import summarise
from benchmarks.scenes_eval import attribute_accuracy, per_half
from clipcap_core import scenes


def _eval_dir(tmp_path, samples, predicted):
    rows = [{"image_id": f"archives/heldout.tar/{s.key}", "caption": p, "exact_match": float(p in s.references),
             "cider": 1.0 if p in s.references else 0.5} for s, p in zip(samples, predicted, strict=True)]
    (tmp_path / "results.json").write_text(json.dumps([{k: r[k] for k in ("image_id", "caption")} for r in rows]))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "per_image.parquet")
    return tmp_path


def test_scores_are_split_by_half_and_by_attribute(tmp_path):
    seen, novel = list(scenes.generate(4, seed=3, split="test")), list(scenes.generate(4, seed=3, split="novel"))
    wrong_shape = [scenes.caption_for(scenes.hard_negatives(s.scene)["shape"][0]) for s in novel]
    ev = _eval_dir(tmp_path, seen + novel, [s.references[1] for s in seen] + wrong_shape)
    halves = per_half(ev)
    assert halves["seen_combos"] == {"n": 4, "exact_match": 1.0, "cider": 1.0}
    assert halves["novel_combos"] == {"n": 4, "exact_match": 0.0, "cider": 0.5}
    novel_acc = attribute_accuracy(ev, seen + novel, "scnno")
    assert novel_acc["shape"] == 0 and novel_acc["color"] == novel_acc["relation"] == 1 and novel_acc["exact"] == 0
    assert attribute_accuracy(ev, seen + novel, "scnte")["exact"] == 1
    assert attribute_accuracy(ev, seen + novel)["shape"] == 0.5


def test_summary_is_mean_and_spread_over_seeds():
    def run(x: float) -> dict:
        return {"figures": {h: {"cider": x} for h in ("all", "seen_combos", "novel_combos")},
                "zero_shot_top1": {"seen_combos": x / 2, "novel_combos": x / 4}}

    s = summarise([run(0.5), run(0.6), run(0.7)])
    assert s["all"]["cider"] == pytest.approx((60.0, 20.0))
    assert s["seen_combos"]["clip_zero_shot_top1"] == pytest.approx((30.0, 10.0))
    assert s["novel_combos"]["clip_zero_shot_top1"] == pytest.approx((15.0, 5.0))

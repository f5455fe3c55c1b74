"""Caption metrics: exact match after normalisation, pycocoevalcap scores that separate good from bad."""

from __future__ import annotations

import shutil

import pytest

from clipcap_core import metrics
from clipcap_core.metrics import caption_metrics, exact_match

REFS = [["a man riding a horse on a beach.", "a person rides a horse near the sea"],
        ["two dogs playing with a red ball", "dogs play with a ball on grass"],
        ["a plate of food with broccoli and rice", "a dinner plate with rice and vegetables"]]
GOOD = ["a man riding a horse on the beach", "two dogs playing with a ball", "a plate of rice and broccoli"]
BAD = ["a cat sleeping on a sofa", "a red car parked in the street", "an airplane in a blue sky"]


def test_exact_match_normalises_case_punctuation_and_spacing():
    assert exact_match(["Two small red circles at the top.", "a square"], ["two small red  circles at the top",
                                                                           "a circle"]) == 0.5
    assert exact_match(["b"], [["a", "B."]]) == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1"):
        exact_match(["a", "b"], ["a"])


def test_scores_separate_good_from_bad_captions_without_java():
    good = caption_metrics(GOOD, REFS, metrics=("bleu", "rouge", "cider"), tokenize="simple")
    bad = caption_metrics(BAD, REFS, metrics=("bleu", "rouge", "cider"), tokenize="simple")
    assert set(good) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
    for key in good:
        assert good[key] > bad[key], key
    perfect = caption_metrics([r[0] for r in REFS], REFS, metrics=("bleu",), tokenize="simple")
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need Java")
def test_coco_pipeline_with_ptb_tokenizer_and_meteor():
    good = caption_metrics(GOOD, REFS)  # one call: every JVM start costs seconds
    assert set(good) == {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"}
    simple = caption_metrics(GOOD, REFS, metrics=("bleu", "cider"), tokenize="simple")
    assert good["bleu4"] == pytest.approx(simple["bleu4"], abs=0.05)  # PTB vs our tokenisation: close
    assert 0.2 < good["meteor"] < 1.0 and good["cider"] > 1.0


def test_spice_failure_and_unknown_metrics_are_clear(monkeypatch):
    monkeypatch.setattr(metrics, "_need_java", lambda what: None)

    class Offline:
        def __init__(self):
            raise OSError("Name or service not known")  # what the CoreNLP download does offline

    import pycocoevalcap.spice.spice as spice_mod

    monkeypatch.setattr(spice_mod, "Spice", Offline)
    with pytest.raises(RuntimeError, match="SPICE could not run.*internet"):
        caption_metrics(GOOD, REFS, metrics=("spice",), tokenize="simple")
    with pytest.raises(ValueError, match="unknown metric"):
        caption_metrics(GOOD, REFS, metrics=("bleurt",))


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need Java")
def test_corpus_and_per_image_scores_equal_pycocoevalcap_called_directly(monkeypatch):
    """Our evaluation vs pycocoevalcap's own COCOEvalCap on the same COCO-format inputs (SPICE left out:
    it downloads CoreNLP). Catches a wrong tokenizer, a metric mix-up, per-image scores shifted to another id."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    from clipcap_core.metrics import evaluate_predictions

    class NoSpice:  # COCOEvalCap always runs SPICE last; offline it cannot, so it scores nothing here
        def method(self):
            return "SPICE"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    preds = GOOD[:2] + BAD[2:] + ["A man, riding a horse!"]
    refs = REFS + [["a man riding a horse.", "someone on a horse"]]
    ids = [42, 7, 1000, 3]  # not in order: per-image scores must follow the ids, not positions
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in ids],
                  "annotations": [{"image_id": i, "id": 10 * i + j, "caption": r}
                                  for i, rs in zip(ids, refs, strict=True) for j, r in enumerate(rs)]}
    gt.createIndex()
    res = gt.loadRes([{"image_id": i, "caption": p} for i, p in zip(ids, preds, strict=True)])
    theirs = coco_eval.COCOEvalCap(gt, res)
    theirs.evaluate()
    ours = evaluate_predictions(preds, refs, spice="off")
    names = {"Bleu_1": "bleu1", "Bleu_2": "bleu2", "Bleu_3": "bleu3", "Bleu_4": "bleu4", "METEOR": "meteor",
             "ROUGE_L": "rouge_l", "CIDEr": "cider"}
    for coco_name, name in names.items():
        assert ours.summary[name] == pytest.approx(theirs.eval[coco_name], abs=1e-9), name
        for pos, image_id in enumerate(ids):
            assert ours.per_item[name][pos] == pytest.approx(theirs.imgToEval[image_id][coco_name], abs=1e-9), name
    assert ours.notes["spice"] == "SPICE not requested"
    assert ours.per_item["exact_match"] == [0.0, 0.0, 0.0, 1.0]

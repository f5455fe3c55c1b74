"""The range and meaning of every score ``clipcap report`` prints, so no number stands without its scale
("CLIPScore 241.60" means 2.416 of a possible 2.5, x100 as COCO tables print it).
"""

from __future__ import annotations

from typing import Any

from pipelines.evaluate.run import ROWS

# score -> (maximum per image; what it measures). Every score is >= 0.
SCALES: dict[str, tuple[float, str]] = {
    **{f"bleu{n}": (1.0, f"BLEU-{n}: n-gram precision against the references, with a brevity penalty")
       for n in range(1, 5)},
    "meteor": (1.0, "METEOR: unigram match with stems and synonyms"),
    "rouge_l": (1.0, "ROUGE-L: longest common subsequence F-score"),
    "cider": (10.0, "CIDEr-D: TF-IDF weighted n-gram similarity to the references (x10 by definition)"),
    "spice": (1.0, "SPICE: F-score of scene-graph tuples"),
    "exact_match": (1.0, "1 when the caption equals a reference after normalisation (per run: the share)"),
    "clip_score": (2.5, "CLIPScore: 2.5 x max(cos(image, caption), 0) with the captioner's CLIP"),
    "ref_clip_score": (2.5 * 2 / 3.5, "RefCLIPScore: harmonic mean of CLIPScore and the best reference cosine"),
}
LOG_PROB_SCALE = "<= 0; 0 = certain"  # the caption table's score: mean token log-prob


def scale(name: str, *, x100: bool = False) -> str:
    """``"0-<max>"`` of score ``name`` (x100 for the metric table); ``""`` for a score with no known range."""
    if name not in SCALES:
        return ""
    top = SCALES[name][0] * (100 if x100 else 1)
    return f"0-{top:.3g}" if top < 1000 else f"0-{top:.0f}"


def metric_table(summary: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, value x100, range x100, meaning) per metric of an evaluation summary, in the COCO order."""
    ms = summary["metrics"]
    return [(label, f"{ms[key] * factor:.2f}", scale(key, x100=True), SCALES[key][1])
            for label, key, factor in ROWS if ms.get(key) is not None and key in SCALES]

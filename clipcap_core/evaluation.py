"""One evaluation of captions against references, shared by ``clipcap evaluate``, training's held-out metrics,
nightly promotion and the sweep (so a number means the same thing wherever it is printed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipcap_core.clipscore import ClipScorer
from clipcap_core.metrics import caption_scores, normalize_caption, spice_unavailable

DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")


@dataclass
class Evaluation:
    summary: dict[str, float]                  # corpus-level: bleu1..4, meteor, rouge_l, cider, [spice],
    #                                            exact_match, [clip_score, ref_clip_score] (means), n
    per_item: dict[str, list[float]]           # the same names, one value per prediction
    notes: dict[str, str] = field(default_factory=dict)  # e.g. why SPICE did not run


def exact_matches(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> list[float]:
    """1.0 where a prediction equals (normalised) one of its references, else 0.0."""
    return [float(normalize_caption(p) in {normalize_caption(r) for r in rs}) for p, rs in zip(preds, refs,
                                                                                               strict=True)]


def evaluate_predictions(preds: Sequence[str], refs: Sequence[Sequence[str]], *,
                         metrics: Sequence[str] = DEFAULT_METRICS, tokenize: str = "ptb",
                         spice: str = "auto", image_emb: np.ndarray | None = None,
                         scorer: ClipScorer | None = None) -> Evaluation:
    """Score ``preds[i]`` against ``refs[i]``. ``spice``: "auto" (run when CoreNLP is present), "on" (try,
    even if that means pycocoevalcap's download), "off". CLIP scores need ``image_emb`` (N, D) and ``scorer``."""
    if spice not in ("auto", "on", "off"):
        raise ValueError(f"spice must be 'auto', 'on' or 'off', got {spice!r}")
    refs = [list(r) for r in refs]
    notes: dict[str, str] = {}
    wanted = [m for m in metrics if m != "spice"]
    reason = spice_unavailable() if spice == "auto" else ("SPICE not requested" if spice == "off" else None)
    if reason is None:
        wanted.append("spice")
    else:
        notes["spice"] = reason
    try:
        corpus, per = caption_scores(preds, refs, metrics=wanted, tokenize=tokenize)
    except RuntimeError as exc:
        if "spice" not in wanted or not str(exc).startswith("SPICE"):
            raise
        notes["spice"] = str(exc).splitlines()[0]
        corpus, per = caption_scores(preds, refs, metrics=[m for m in wanted if m != "spice"], tokenize=tokenize)
    per["exact_match"] = exact_matches(preds, refs)
    corpus["exact_match"] = float(np.mean(per["exact_match"])) if len(preds) else float("nan")
    if image_emb is not None and scorer is not None and len(preds):
        scores = scorer.score(image_emb, preds, refs)
        per["clip_score"] = scores.clip_score.tolist()
        corpus["clip_score"] = float(np.mean(scores.clip_score))
        if scores.ref_clip_score is not None:
            per["ref_clip_score"] = scores.ref_clip_score.tolist()
            corpus["ref_clip_score"] = float(np.mean(scores.ref_clip_score))
    corpus["n"] = float(len(preds))
    return Evaluation(corpus, per, notes)


def heldout_metrics(texts: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], *,
                    image_emb: np.ndarray | None = None, scorer: ClipScorer | None = None,
                    tokenize: str = "simple") -> dict[str, Any]:
    """Training / nightly / sweep held-out numbers: exact match, BLEU-4, CIDEr (+ CLIPScore with a scorer)."""
    ref_lists = [[r] if isinstance(r, str) else list(r) for r in refs]
    ev = evaluate_predictions(texts, ref_lists, metrics=("bleu", "cider"), tokenize=tokenize, spice="off",
                              image_emb=image_emb, scorer=scorer)
    keys = ("exact_match", "bleu4", "cider", "clip_score", "n")
    return {k: ev.summary[k] for k in keys if k in ev.summary}

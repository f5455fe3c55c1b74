"""Caption metrics: exact match, and COCO metrics through pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr,
optional SPICE).

    caption_metrics(preds, refs)                          # PTB tokenizer (Java), BLEU/METEOR/ROUGE-L/CIDEr
    caption_metrics(preds, refs, metrics=("bleu", "cider"), tokenize="simple")   # no Java, fast
    exact_match(preds, refs)                              # fraction equal to a reference after normalisation

``refs`` holds one reference string or a list of references per prediction. The PTB tokenizer and METEOR
need Java; SPICE also downloads Stanford CoreNLP on first use, so offline it fails with a clear message.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Sequence

from clipcap_core.tokenizer import words_of

METRICS = ("bleu", "meteor", "rouge", "cider", "spice")


def normalize_caption(text: str) -> str:
    """Lower-case words without punctuation, single-spaced."""
    return " ".join(w for w in words_of(text) if w.isalnum())


def _ref_lists(refs: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def exact_match(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal (normalised) to one of their references."""
    ref_lists = _ref_lists(refs)
    if len(preds) != len(ref_lists):
        raise ValueError(f"{len(preds)} predictions but {len(ref_lists)} reference sets")
    if not preds:
        return float("nan")
    hits = sum(normalize_caption(p) in {normalize_caption(r) for r in rs} for p, rs in zip(preds, ref_lists, strict=True))
    return hits / len(preds)


def _tokenized(preds: Sequence[str], ref_lists: list[list[str]], tokenize: str
               ) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    if tokenize == "simple":
        gts = {i: [normalize_caption(r) for r in rs] for i, rs in enumerate(ref_lists)}
        res = {i: [normalize_caption(p)] for i, p in enumerate(preds)}
        return gts, res
    if tokenize != "ptb":
        raise ValueError(f"tokenize must be 'ptb' or 'simple', got {tokenize!r}")
    _need_java("the PTB tokenizer (use tokenize='simple' to avoid it)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(ref_lists)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    return gts, res


def _need_java(what: str) -> None:
    if shutil.which("java") is None:
        raise RuntimeError(f"{what} needs Java (a `java` executable on PATH)")


def caption_metrics(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], *,
                    metrics: Sequence[str] = ("bleu", "meteor", "rouge", "cider"),
                    tokenize: str = "ptb") -> dict[str, float]:
    """Corpus-level scores: keys bleu1..bleu4, meteor, rouge_l, cider, spice (as requested)."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown} (known: {list(METRICS)})")
    ref_lists = _ref_lists(refs)
    if len(preds) != len(ref_lists):
        raise ValueError(f"{len(preds)} predictions but {len(ref_lists)} reference sets")
    if not preds:
        return {}
    gts, res = _tokenized(preds, ref_lists, tokenize)
    res = {i: [r[0] if r[0].strip() else "<empty>"] for i, r in res.items()}  # scorers reject empty hypotheses
    out: dict[str, float] = {}
    if "bleu" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"bleu{i + 1}": float(s) for i, s in enumerate(scores)})
    if "meteor" in metrics:
        _need_java("METEOR")
        from pycocoevalcap.meteor.meteor import Meteor

        out["meteor"] = float(Meteor().compute_score(gts, res)[0])
    if "rouge" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if "cider" in metrics:
        from pycocoevalcap.cider.cider import Cider

        out["cider"] = float(Cider().compute_score(gts, res)[0])
    if "spice" in metrics:
        out["spice"] = _spice(gts, res)
    return out


def _spice(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    _need_java("SPICE")
    try:
        from pycocoevalcap.spice.spice import Spice

        with contextlib.redirect_stdout(io.StringIO()):
            return float(Spice().compute_score(gts, res)[0])
    except Exception as exc:  # noqa: BLE001 - any failure here means SPICE could not run
        raise RuntimeError(
            "SPICE could not run: it downloads Stanford CoreNLP (~1 GB) on first use, which needs internet; "
            f"run it once online or leave 'spice' out of metrics ({type(exc).__name__}: {exc})") from exc

"""Caption metrics: exact match, and COCO metrics through pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE).

The PTB tokenizer, METEOR and SPICE need Java (SPICE also CoreNLP); offline they fail with a clear message.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Sequence

import pycocoevalcap.spice as spice_pkg
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

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

    # one tokenizer run (one JVM start, seconds on a busy machine) for references and predictions together
    # (an empty caption would be an empty line, which the tokenizer's rstrip() drops, shifting every later line
    # onto the wrong id: "." tokenizes to nothing after punctuation removal instead)
    both = {("g", i): [{"caption": r if r.strip() else "."} for r in rs] for i, rs in enumerate(ref_lists)}
    both.update({("r", i): [{"caption": p if p.strip() else "."}] for i, p in enumerate(preds)})
    out = PTBTokenizer().tokenize(both)
    gts = {i: out[("g", i)] for i in range(len(ref_lists))}
    res = {i: out[("r", i)] for i in range(len(preds))}
    return gts, res


def _need_java(what: str) -> None:
    if shutil.which("java") is None:
        raise RuntimeError(f"{what} needs Java (a `java` executable on PATH)")


def caption_metrics(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], *,
                    metrics: Sequence[str] = ("bleu", "meteor", "rouge", "cider"),
                    tokenize: str = "ptb") -> dict[str, float]:
    """Corpus-level scores: keys bleu1..bleu4, meteor, rouge_l, cider, spice (as requested)."""
    return caption_scores(preds, refs, metrics=metrics, tokenize=tokenize)[0]


def caption_scores(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], *,
                   metrics: Sequence[str] = ("bleu", "meteor", "rouge", "cider"),
                   tokenize: str = "ptb") -> tuple[dict[str, float], dict[str, list[float]]]:
    """Corpus-level scores and per-prediction scores (same keys; lists aligned with ``preds``)."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown} (known: {list(METRICS)})")
    ref_lists = _ref_lists(refs)
    if len(preds) != len(ref_lists):
        raise ValueError(f"{len(preds)} predictions but {len(ref_lists)} reference sets")
    if not preds:
        return {}, {}
    gts, res = _tokenized(preds, ref_lists, tokenize)
    res = {i: [r[0] if r[0].strip() else "<empty>"] for i, r in res.items()}  # scorers reject empty hypotheses
    order = list(gts)  # the scorers return per-item scores in gts' key order
    out: dict[str, float] = {}
    per: dict[str, list[float]] = {}

    def put(name: str, corpus: float, items: Sequence[float]) -> None:
        out[name] = float(corpus)
        by_id = dict(zip(order, (float(v) for v in items), strict=True))
        per[name] = [by_id[i] for i in range(len(preds))]

    for name, scorer in _scorers(metrics):
        corpus, items = scorer().compute_score(gts, res)
        if name == "bleu":
            for n, (c, i) in enumerate(zip(corpus, items, strict=True)):
                put(f"bleu{n + 1}", c, i)
        else:
            put(name, corpus, items)
    if "spice" in metrics:
        corpus, items = _spice(gts, res)
        put("spice", corpus, items)
    return out, per


def _scorers(metrics: Sequence[str]) -> list[tuple[str, type]]:
    """(output name, pycocoevalcap scorer class) for the requested metrics except SPICE, imported lazily."""
    out: list[tuple[str, type]] = []
    if "bleu" in metrics:
        out.append(("bleu", _Bleu4))
    if "meteor" in metrics:
        _need_java("METEOR")

        out.append(("meteor", Meteor))
    if "rouge" in metrics:
        out.append(("rouge_l", Rouge))
    if "cider" in metrics:
        out.append(("cider", Cider))
    return out


class _Bleu4:
    """pycocoevalcap's Bleu(4), quiet (it prints its internal ratios otherwise)."""

    def compute_score(self, gts: dict, res: dict) -> tuple[list[float], list[list[float]]]:
        return Bleu(4).compute_score(gts, res, verbose=0)


SPICE_JAR = "stanford-corenlp-3.6.0.jar"


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here without a download (None when it can): Java, and the CoreNLP jar that
    pycocoevalcap downloads on first use (~1 GB zip, needs internet)."""
    if shutil.which("java") is None:
        return "SPICE needs Java (a `java` executable on PATH)"

    jar = os.path.join(os.path.dirname(spice_pkg.__file__), "lib", SPICE_JAR)
    if not os.path.exists(jar):
        return (f"SPICE not run: Stanford CoreNLP ({jar}) is missing; pycocoevalcap downloads it (~1 GB) on "
                "first use, which needs internet (ask for it explicitly to try)")
    return None


def _spice(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    _need_java("SPICE")
    try:
        from pycocoevalcap.spice.spice import Spice

        with contextlib.redirect_stdout(io.StringIO()):
            corpus, items = Spice().compute_score(gts, res)
        return float(corpus), [float(item["All"]["f"]) for item in items]
    except Exception as exc:  # noqa: BLE001 - any failure here means SPICE could not run
        raise RuntimeError(
            "SPICE could not run: it downloads Stanford CoreNLP (~1 GB) on first use, which needs internet; "
            f"run it once online or leave 'spice' out of metrics ({type(exc).__name__}: {exc})") from exc

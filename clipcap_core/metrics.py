"""Caption scores: exact match, the COCO metrics through pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr,
SPICE), CLIPScore / RefCLIPScore and CLIP reranking (Hessel et al. 2021); and the one evaluation every command
shares, so a number means the same thing wherever it is printed. PTB tokenizer, METEOR and SPICE need Java.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycocoevalcap.spice as spice_pkg
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from clipcap_core.tokenizer import words_of

log = logging.getLogger(__name__)
METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")
W = 2.5  # CLIPScore's rescaling: CLIP cosines of matching pairs rarely exceed 0.4


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
    return float(np.mean(exact_matches(preds, ref_lists))) if preds else float("nan")


def _tokenized(preds: Sequence[str], ref_lists: list[list[str]], tokenize: str
               ) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    if tokenize == "simple":
        return ({i: [normalize_caption(r) for r in rs] for i, rs in enumerate(ref_lists)},
                {i: [normalize_caption(p)] for i, p in enumerate(preds)})
    if tokenize != "ptb":
        raise ValueError(f"tokenize must be 'ptb' or 'simple', got {tokenize!r}")
    _need_java("the PTB tokenizer (use tokenize='simple' to avoid it)")
    # one tokenizer run (one JVM start) for both; an empty caption is sent as "." (an empty line would be
    # dropped, shifting every later line onto the wrong id) and tokenizes to nothing
    both = {("g", i): [{"caption": r if r.strip() else "."} for r in rs] for i, rs in enumerate(ref_lists)}
    both.update({("r", i): [{"caption": p if p.strip() else "."}] for i, p in enumerate(preds)})
    out = PTBTokenizer().tokenize(both)
    return {i: out[("g", i)] for i in range(len(ref_lists))}, {i: out[("r", i)] for i in range(len(preds))}


def _need_java(what: str) -> None:
    if shutil.which("java") is None:
        raise RuntimeError(f"{what} needs Java (a `java` executable on PATH)")


def caption_metrics(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], *,
                    metrics: Sequence[str] = DEFAULT_METRICS, tokenize: str = "ptb") -> dict[str, float]:
    """Corpus-level scores: keys bleu1..bleu4, meteor, rouge_l, cider, spice (as requested)."""
    return caption_scores(preds, refs, metrics=metrics, tokenize=tokenize)[0]


def caption_scores(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], *,
                   metrics: Sequence[str] = DEFAULT_METRICS, tokenize: str = "ptb"
                   ) -> tuple[dict[str, float], dict[str, list[float]]]:
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
    if "meteor" in metrics:
        _need_java("METEOR")
    res = {i: [r[0] if r[0].strip() else "<empty>"] for i, r in res.items()}  # scorers reject empty hypotheses
    out: dict[str, float] = {}
    per: dict[str, list[float]] = {}

    def put(name: str, corpus: float, items: Sequence[float]) -> None:
        out[name] = float(corpus)
        per[name] = [float(v) for v in items]  # in gts' key order: 0 .. N-1

    if "bleu" in metrics:
        corpus, items = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: it prints its ratios otherwise
        for n, (c, i) in enumerate(zip(corpus, items, strict=True)):
            put(f"bleu{n + 1}", c, i)
    for metric, name, scorer in (("meteor", "meteor", Meteor), ("rouge", "rouge_l", Rouge),
                                 ("cider", "cider", Cider)):
        if metric in metrics:
            put(name, *scorer().compute_score(gts, res))
    if "spice" in metrics:
        put("spice", *_spice(gts, res))
    return out, per


SPICE_JAR = "stanford-corenlp-3.6.0.jar"


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here without a download (None when it can): Java, and the ~1 GB CoreNLP jar."""
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


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64, so tests can compare with a hand computation exactly)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # (N, D), (N, D) -> (N,)
    return np.sum(normalize(a) * normalize(b), axis=-1)


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray, w: float = W) -> np.ndarray:
    """CLIPScore per pair: ``w * max(cos, 0)`` -> (N,)."""
    return w * np.clip(cosine(image_emb, text_emb), 0.0, None)


def ref_similarity(text_emb: np.ndarray, ref_embs: Sequence[np.ndarray]) -> np.ndarray:
    """For each caption i, ``max(max_r cos(c_i, r), 0)`` over its references ``ref_embs[i]`` (R_i, D)."""
    if len(ref_embs) != len(text_emb):
        raise ValueError(f"{len(text_emb)} captions but {len(ref_embs)} reference sets")
    cand = normalize(text_emb)
    out = np.zeros(len(cand))
    for i, refs in enumerate(ref_embs):
        if len(refs):
            out[i] = max(float(np.max(normalize(refs) @ cand[i])), 0.0)
    return out


def ref_clip_score(clip_s: np.ndarray, ref_sim: np.ndarray) -> np.ndarray:
    """Harmonic mean of CLIPScore and reference similarity (0 where both are 0)."""
    clip_s, ref_sim = np.asarray(clip_s, dtype=np.float64), np.asarray(ref_sim, dtype=np.float64)
    total = clip_s + ref_sim
    return np.divide(2 * clip_s * ref_sim, total, out=np.zeros_like(total), where=total > 0)


def rerank(image_emb: np.ndarray, cand_emb: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(order (N, n), cos (N, n)) of each image's ``n`` candidates (rows [i*n, (i+1)*n) of ``cand_emb``) by
    CLIP similarity, best first; ties keep the decoder's order."""
    image_emb = np.asarray(image_emb)
    if len(cand_emb) != len(image_emb) * n:
        raise ValueError(f"{len(cand_emb)} candidates for {len(image_emb)} images x {n}")
    cos = cosine(np.repeat(image_emb, n, axis=0), cand_emb).reshape(len(image_emb), n)
    order = np.argsort(-cos, axis=1, kind="stable")
    return order, cos


@dataclass
class ClipScores:
    clip_score: np.ndarray              # (N,)
    ref_clip_score: np.ndarray | None   # (N,) when references were given
    ref_similarity: np.ndarray | None


class ClipScorer:
    """CLIPScore / RefCLIPScore of captions against image embeddings, with ``encoder`` encoding the texts."""

    def __init__(self, encoder: Any, batch_size: int = 256, w: float = W):
        self.encoder, self.batch_size, self.w = encoder, batch_size, w

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, D) float32 in batches (empty captions encode as the empty string, like the paper's)."""
        texts = [t or "" for t in texts]
        if not texts:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        return np.concatenate([self.encoder.encode_text(texts[s: s + self.batch_size])
                               for s in range(0, len(texts), self.batch_size)])

    def score(self, image_emb: np.ndarray, captions: Sequence[str],
              references: Sequence[Sequence[str]] | None = None) -> ClipScores:
        image_emb = np.asarray(image_emb, dtype=np.float32)
        if image_emb.ndim != 2 or image_emb.shape[1] != self.encoder.dim:
            raise ValueError(f"image embeddings of shape {image_emb.shape} but CLIP {self.encoder.model_name!r} "
                             f"has D={self.encoder.dim}")
        text = self.embed_texts(captions)
        cs = clip_score(image_emb, text, self.w)
        if references is None:
            return ClipScores(cs, None, None)
        emb = self.embed_texts([r for refs in references for r in refs])
        bounds = np.cumsum([0] + [len(r) for r in references])
        sims = ref_similarity(text, [emb[bounds[i]: bounds[i + 1]] for i in range(len(references))])
        return ClipScores(cs, ref_clip_score(cs, sims), sims)


@functools.lru_cache(maxsize=2)
def scorer_for(encoder_cfg: Any, dim: int) -> ClipScorer | None:
    """A scorer with the CLIP of ``encoder_cfg`` (once per process), or None (logged) when it cannot be loaded
    here or does not give D = ``dim``: held-out metrics then go on without CLIPScore."""
    # lazy: torch ~6.7 s to import (python -X importtime)
    from clipcap_core.encoders import load_encoder

    try:
        encoder = load_encoder(encoder_cfg)
    except Exception as exc:  # noqa: BLE001 - e.g. hub weights on an offline worker
        log.warning("CLIPScore left out: cannot load CLIP %s: %s", encoder_cfg, exc)
        return None
    if encoder.dim != dim:
        log.warning("CLIPScore left out: CLIP %s gives D=%d, the embeddings D=%d", encoder_cfg.model_name,
                    encoder.dim, dim)
        return None
    return ClipScorer(encoder)


@dataclass
class Evaluation:
    summary: dict[str, float]                  # corpus-level scores (clip scores: means) and n
    per_item: dict[str, list[float]]           # the same names, one value per prediction
    notes: dict[str, str] = field(default_factory=dict)  # e.g. why SPICE did not run


def exact_matches(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> list[float]:
    """1.0 where a prediction equals (normalised) one of its references, else 0.0."""
    return [float(normalize_caption(p) in {normalize_caption(r) for r in rs})
            for p, rs in zip(preds, refs, strict=True)]


def evaluate_predictions(preds: Sequence[str], refs: Sequence[Sequence[str]], *,
                         metrics: Sequence[str] = DEFAULT_METRICS, tokenize: str = "ptb",
                         spice: str = "auto", image_emb: np.ndarray | None = None,
                         scorer: ClipScorer | None = None) -> Evaluation:
    """Score ``preds[i]`` against ``refs[i]``. ``spice``: "auto" (when CoreNLP is present), "on" (try, even
    with a download), "off". CLIP scores need ``image_emb`` (N, D) and ``scorer``."""
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
        for name in ("clip_score", "ref_clip_score"):
            if (values := getattr(scores, name)) is not None:
                per[name], corpus[name] = values.tolist(), float(np.mean(values))
    corpus["n"] = float(len(preds))
    return Evaluation(corpus, per, notes)


def heldout_metrics(texts: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], *,
                    image_emb: np.ndarray | None = None, scorer: ClipScorer | None = None,
                    tokenize: str = "simple") -> dict[str, Any]:
    """Training / nightly / sweep held-out numbers: exact match, BLEU-4, CIDEr (+ CLIPScore with a scorer)."""
    ev = evaluate_predictions(texts, _ref_lists(refs), metrics=("bleu", "cider"), tokenize=tokenize, spice="off",
                              image_emb=image_emb, scorer=scorer)
    keys = ("exact_match", "bleu4", "cider", "clip_score", "n")
    return {k: ev.summary[k] for k in keys if k in ev.summary}

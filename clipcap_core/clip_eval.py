"""CLIP evaluation on embeddings (no Ray, no I/O): retrieval recall@K both ways, zero-shot classification,
the modality gap. Captions repeat, so a retrieval hit is judged by caption text (each distinct caption
searched once). Embeddings are L2-normalised here, whatever the caller passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

KS = (1, 5, 10)


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)  # (N, k) best first


def retrieval(image_emb: np.ndarray, text_emb: np.ndarray, captions: Sequence[str],
              ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K image->text and text->image over N pairs (hits judged by caption text, see module doc)."""
    n = len(captions)
    if n == 0 or len(image_emb) != n or len(text_emb) != n:
        raise ValueError(f"retrieval needs N paired rows, got {len(image_emb)} images, {len(text_emb)} texts, "
                         f"{n} captions")
    img, txt = l2n(image_emb), l2n(text_emb)
    index = {c: j for j, c in enumerate(dict.fromkeys(captions))}  # distinct captions, in order of first use
    own = np.array([index[c] for c in captions])
    gallery = txt[np.unique(own, return_index=True)[1]]  # one embedding per distinct caption: its first row
    out: dict[str, float] = {"n": float(n), "distinct_captions": float(len(index))}
    i2t = _topk(img @ gallery.T, max(ks))
    t2i = _topk(gallery @ img.T, max(ks))  # each distinct caption queries the images once
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean((i2t[:, :k] == own[:, None]).any(1)))
        out[f"t2i_r{k}"] = float(np.mean((own[t2i[:, :k]] == np.arange(len(index))[:, None]).any(1)))
    return out


def class_embeddings(encode_text: Callable[[list[str]], np.ndarray], classes: Sequence[str],
                     templates: Sequence[str] = ("{}",)) -> np.ndarray:
    """Zero-shot classifier weights (C, D): for each class, the mean of its normalised prompt embeddings
    (``template.format(class)`` for every template), renormalised: the CLIP paper's prompt ensembling."""
    if not classes or not templates:
        raise ValueError("zero-shot needs at least one class and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"each template needs a '{{}}' for the class name; these have none: {bad[:3]}")
    prompts = [t.format(c) for c in classes for t in templates]
    emb = l2n(encode_text(prompts)).reshape(len(classes), len(templates), -1)
    return l2n(emb.mean(axis=1))


def zero_shot(image_emb: np.ndarray, labels: Sequence[int], class_emb: np.ndarray,
              ks: Sequence[int] = (1, 5)) -> dict[str, object]:
    """Top-K accuracy of classifying each image by its most similar class embedding; ``labels`` index classes."""
    if len(image_emb) != len(labels) or len(labels) == 0:
        raise ValueError(f"zero-shot needs one label per image, got {len(labels)} for {len(image_emb)}")
    top = _topk(l2n(image_emb) @ l2n(class_emb).T, max(ks))
    y = np.asarray(labels)
    out: dict[str, object] = {"n": len(y)}
    for k in ks:
        out[f"top{k}"] = float(np.mean((top[:, :k] == y[:, None]).any(1)))
    out["predictions"] = top[:, 0].tolist()
    return out


def _mean_offdiagonal_cosine(x: np.ndarray) -> float:
    """Mean cosine between distinct rows of unit vectors ``x`` (the narrowness of a modality's cone)."""
    n = len(x)
    s = x.sum(axis=0)
    return float((s @ s - n) / (n * (n - 1))) if n > 1 else float("nan")


def modality_gap(image_emb: np.ndarray, text_emb: np.ndarray) -> dict[str, float]:
    """The modality gap of N paired embeddings (Liang et al., "Mind the Gap", NeurIPS 2022) on unit vectors:
    paired cosine, centroid distance, the share of the pooled variance along the centroid difference and each
    modality's cone (mean cosine between distinct rows). Real CLIPs: ~0.3 and 0.8; no gap: ~1 and 0."""
    if len(image_emb) != len(text_emb) or len(image_emb) < 2:
        raise ValueError(f"modality_gap needs N >= 2 paired rows, got {len(image_emb)} images, {len(text_emb)} texts")
    img, txt = l2n(image_emb), l2n(text_emb)
    delta = img.mean(axis=0) - txt.mean(axis=0)
    distance = float(np.linalg.norm(delta))
    pooled = np.concatenate([img, txt])
    centred = pooled - pooled.mean(axis=0)
    total = float((centred**2).sum())
    along = float(((centred @ (delta / max(distance, 1e-12))) ** 2).sum())
    return {"paired_cosine": float(np.mean((img * txt).sum(axis=1))), "centroid_distance": distance,
            "gap_variance_share": along / total if total > 0 and distance > 1e-6 else 0.0,  # no gap: no direction
            "image_cone": _mean_offdiagonal_cosine(img), "text_cone": _mean_offdiagonal_cosine(txt)}

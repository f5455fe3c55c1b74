"""CLIPScore, RefCLIPScore and CLIP reranking of captions (Hessel et al. 2021, arXiv 2104.08718).

As in the authors' code, ``w`` scales the image side only; every function normalises its inputs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
W = 2.5  # the paper's rescaling: CLIP cosines of matching pairs rarely exceed 0.4


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64, so tests can compare with a hand computation exactly)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) and (N, D) -> (N,)."""
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
    """Order of each image's ``n`` candidates by CLIP similarity, best first (stable: ties keep the decoder's
    order). ``cand_emb`` is (N * n, D), image i owning rows [i*n, (i+1)*n). Returns (order (N, n), cos (N, n))."""
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
        flat = [r for refs in references for r in refs]
        emb = self.embed_texts(flat)
        bounds = np.cumsum([0] + [len(r) for r in references])
        sims = ref_similarity(text, [emb[bounds[i]: bounds[i + 1]] for i in range(len(references))])
        return ClipScores(cs, ref_clip_score(cs, sims), sims)


@functools.lru_cache(maxsize=2)
def scorer_for(encoder_cfg: Any, dim: int) -> ClipScorer | None:
    """A scorer with the CLIP of ``encoder_cfg`` (loaded once per process), or None when that CLIP cannot be
    loaded here or does not give D = ``dim``: held-out metrics then go on without CLIPScore (logged)."""
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

"""Held-out metrics of the training jobs, computed by rank 0 at epoch ends: ClipCap caption metrics
(``evaluate_model``, also used on saved artifacts) and CLIP retrieval (``evaluate_retrieval``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from clipcap_core.clip_eval import retrieval
from clipcap_core.metrics import scorer_for
from pipelines.io import tables


def evaluate_model(model: Any, tokenizer: Any, heldout: pa.Table, *, max_tokens: int = 40,
                   batch_size: int = 64) -> dict[str, float]:
    """Held-out loss + greedy-caption metrics (exact match, BLEU-4, CIDEr, CLIPScore) of ``model`` on ``heldout``
    (``clipcap_core.metrics.heldout_metrics``, the code ``clipcap evaluate`` uses)."""
    # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from clipcap_core.training import collate, evaluate_captions, evaluate_loss

    captions = heldout.column("caption").to_pylist()
    emb = tables.embeddings_numpy(heldout)
    batches = (collate(tokenizer, captions[s: s + batch_size], emb[s: s + batch_size], max_tokens)
               for s in range(0, len(captions), batch_size))
    metrics = {"val_loss": evaluate_loss(model, batches)}
    scores = evaluate_captions(model, tokenizer, emb, captions, max_length=max_tokens, batch_size=batch_size,
                               clip_scorer=scorer_for(model.config.encoder, emb.shape[1]))
    metrics.update({k: float(v) for k, v in scores.items() if k != "n"})
    return metrics


def evaluate_retrieval(model: Any, heldout: tuple[np.ndarray, Any, list[str]], precision: str = "fp32"
                       ) -> dict[str, float]:
    """Retrieval R@1/5/10 both ways on held-out pairs (``clip_eval.retrieval``), with the model's temperature."""
    # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from clipcap_core.clip_training import encode_batches

    pixels, tokens, captions = heldout
    if not captions:
        return {}
    img, txt = encode_batches(model, pixels, tokens, precision=precision)
    out = {f"heldout_{k}": v for k, v in retrieval(img, txt, captions).items()}
    out["logit_scale"] = float(getattr(model, "module", model).logit_scale.exp().item())
    return out

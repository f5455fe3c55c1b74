"""Prefix interpretation (ClipCap paper, Fig. 6): the vocabulary tokens nearest to each prefix vector."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from clipcap_core.model import ClipCapModel


@torch.inference_mode()
def nearest_tokens(model: ClipCapModel, clip_embeds: np.ndarray | torch.Tensor, top_k: int = 1,
                   metric: Literal["cosine", "l2"] = "cosine") -> torch.Tensor:
    """Token ids (N, k, top_k) nearest to each of the k prefix vectors of each embedding."""
    prefix = model.prefix(torch.as_tensor(np.asarray(clip_embeds, dtype=np.float32))).float()  # (N, k, E)
    vocab = model.lm.get_input_embeddings().weight.float()  # (V, E)
    if metric == "cosine":
        sim = F.normalize(prefix, dim=-1) @ F.normalize(vocab, dim=-1).T  # (N, k, V)
    elif metric == "l2":
        sim = -torch.cdist(prefix, vocab.unsqueeze(0).expand(prefix.shape[0], -1, -1))  # (N, k, V)
    else:
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    return sim.topk(top_k, dim=-1).indices


def interpret_prefix(model: ClipCapModel, tokenizer: PreTrainedTokenizerBase, clip_embeds: np.ndarray,
                     top_k: int = 1, metric: Literal["cosine", "l2"] = "cosine") -> list[list[list[str]]]:
    """For each embedding, for each prefix vector, its ``top_k`` nearest tokens as strings."""
    ids = nearest_tokens(model, clip_embeds, top_k, metric).tolist()
    return [[[tokenizer.decode([t]).strip() for t in pos] for pos in image] for image in ids]

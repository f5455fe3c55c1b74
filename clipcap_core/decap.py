"""DeCap (arXiv 2303.03032): caption images with a decoder trained on text only.

Training: the usual ClipCap training, with the CLIP *text* embedding of each caption as the prefix input
(use ``normalize_prefix=True``: DeCap works on unit vectors). Inference: project the image embedding onto a
memory M of caption text embeddings, w = softmax(v . M^T / tau), prefix = normalize(w . M), tau = 0.01 by
default, then decode as usual. ``save_model(..., decap=memory)`` stores M in the artifact
(``decap.safetensors``) and ``Captioner`` applies the projection automatically.

    memory = DecapMemory.from_texts(encoder, captions)      # (M, D) unit vectors
    prefix_inputs = memory.project(image_embeddings)        # (N, D)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class DecapMemory:
    def __init__(self, memory: np.ndarray | torch.Tensor, tau: float = 0.01):
        mem = torch.as_tensor(np.asarray(memory, dtype=np.float32))
        if mem.ndim != 2 or mem.shape[0] == 0:
            raise ValueError(f"DeCap memory must be a non-empty (M, D) array, got {tuple(mem.shape)}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.memory = F.normalize(mem, dim=-1)  # (M, D)
        self.tau = float(tau)

    @property
    def dim(self) -> int:
        return int(self.memory.shape[1])

    @classmethod
    def from_texts(cls, encoder: Any, texts: Sequence[str], tau: float = 0.01, batch_size: int = 256) -> DecapMemory:
        """Memory of the CLIP text embeddings of ``texts`` (``encoder``: a ``ClipEncoder``)."""
        chunks = [encoder.encode_text(list(texts[i: i + batch_size])) for i in range(0, len(texts), batch_size)]
        return cls(np.concatenate(chunks), tau=tau)

    @torch.inference_mode()
    def project(self, embeddings: np.ndarray | torch.Tensor, chunk: int = 4096) -> np.ndarray:
        """Image embeddings (N, D) -> memory-projected unit vectors np.float32 (N, D)."""
        v = F.normalize(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)), dim=-1)  # (N, D)
        if v.shape[-1] != self.dim:
            raise ValueError(f"embeddings have D={v.shape[-1]} but the DeCap memory has D={self.dim}")
        out = []
        for start in range(0, v.shape[0], chunk):
            w = (v[start: start + chunk] @ self.memory.T / self.tau).softmax(dim=-1)  # (n, M)
            out.append(F.normalize(w @ self.memory, dim=-1))  # (n, D)
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) for a safetensors file."""
        return {"memory": self.memory.contiguous()}, {"tau": repr(self.tau)}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> DecapMemory:
        return cls(tensors["memory"].numpy(), tau=float(metadata["tau"]))

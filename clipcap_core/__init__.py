"""clipcap_core: pure PyTorch + tokenizer code for CLIP-prefix captioning (ClipCap, DeCap). No Ray imports."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Captioner", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Captioner":
        # lazy: safetensors.torch + torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
        from clipcap_core.captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'clipcap_core' has no attribute {name!r}")

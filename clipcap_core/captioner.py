"""The Python API: ``Captioner.from_pretrained(uri_or_preset).caption(images)``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image

from clipcap_core.artifacts import LoadedModel, load_model
from clipcap_core.decap import ProjectionConfig, resolve_projection
from clipcap_core.decoding import Generation, generate
from clipcap_core.encoders import load_encoder
from clipcap_core.imaging import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, to_rgb

ImageInput = Image.Image | str | os.PathLike[str] | bytes


def open_image(item: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from a PIL image, path / URI or bytes, by ``imaging``'s safe path (errors name it)."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, (bytes, bytearray)):
        return decode_image(bytes(item), max_pixels=max_pixels)

    try:
        with fsspec.open(str(item), "rb") as f:
            data = f.read()
        return decode_image(data, max_pixels=max_pixels)
    except (OSError, ImageDecodeError) as exc:
        raise ImageDecodeError(f"{item}: {exc}") from None


class Captioner:
    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu", encoder_precision: str = "fp32",
                 projection: ProjectionConfig | None = None):
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, loaded.config
        self.metadata = loaded.metadata
        self.device = torch.device(device)
        self.encoder_precision = encoder_precision
        self._encoder: Any = None
        memory = resolve_projection(projection or ProjectionConfig(), loaded.decap, self.config.clip_dim)
        # once, on the model's device and in its dtype: every batch then projects there
        self.decap = memory.to(self.model.device, self.model.dtype) if memory is not None else None

    @classmethod
    def from_pretrained(cls, uri_or_preset: str, device: str | torch.device = "cpu", precision: str = "fp32",
                        projection: ProjectionConfig | None = None) -> Captioner:
        """Load an artifact (local dir or fsspec URI) or an untrained preset (``"tiny"``)."""
        loaded = load_model(uri_or_preset, device=device, precision=precision)
        return cls(loaded, device=device, encoder_precision=precision, projection=projection)

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            enc = load_encoder(self.config.encoder, device=self.device, precision=self.encoder_precision)
            if enc.dim != self.config.clip_dim:
                raise ValueError(f"CLIP encoder {enc.tag} gives D={enc.dim} but the model expects "
                                 f"clip_dim={self.config.clip_dim}")
            self._encoder = enc
        return self._encoder

    def embed_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> np.ndarray:  # (N, D)
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.encoder.preprocess(open_image(im)) for im in images[start: start + batch_size]])
            out.append(self.encoder.encode_images(batch))
        return np.concatenate(out) if out else np.zeros((0, self.config.clip_dim), np.float32)

    def generate(self, images: Sequence[ImageInput] | None = None, embeddings: np.ndarray | None = None,
                 strategy: str = "greedy", **options: Any) -> Generation:
        """Captions with scores and token ids; ``options`` are ``DecodeConfig`` fields."""
        if (images is None) == (embeddings is None):
            raise ValueError("pass exactly one of images= or embeddings=")
        emb = self.embed_images(list(images)) if images is not None else np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.config.clip_dim:
            raise ValueError(f"embeddings must have shape (N, {self.config.clip_dim}), got {emb.shape}")
        prefix_input: np.ndarray | torch.Tensor = emb
        if self.decap is not None:
            prefix_input = self.decap.project(torch.from_numpy(np.ascontiguousarray(emb)))  # (N, D) on the device
        options.setdefault("batch_size", 64)
        return generate(self.model, prefix_input, self.tokenizer, strategy, **options)

    def caption(self, images: Sequence[ImageInput] | None = None, embeddings: np.ndarray | None = None,
                strategy: str = "greedy", beam_size: int = 5, max_length: int = 30, stop_token: str | None = None,
                n: int = 1, **options: Any) -> list[str] | list[list[str]]:
        """One caption per input (a list of ``n`` captions per input when n > 1)."""
        gen = self.generate(images=images, embeddings=embeddings, strategy=strategy, beam_size=beam_size,
                            max_length=max_length, stop_token=stop_token, n=n, **options)
        return gen.grouped() if n > 1 else gen.texts

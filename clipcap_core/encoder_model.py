"""The loaded CLIP (torch + open_clip): ``load_encoder`` builds an ``EncoderConfig``'s model on a device and
returns a ``ClipEncoder``. Kept apart from ``clipcap_core.encoders`` (the config side), so config-level code
(job drivers validating a model, naming its output folder, reading its D and preprocessing) never pays for
importing torch, torchvision and open_clip. No Ray import here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from clipcap_core.encoders import (
    TINY_SEED,
    EncoderConfig,
    _open_clip,
    encoder_tag,
    resolve_precision,
    resolve_weights,
    shipped_weights,
    validate_config,
)
from clipcap_core.preprocess import ImageResizer, spec_from_dict

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class ClipEncoder:
    """A loaded open_clip model in eval mode with its preprocessing and tokenizer."""

    def __init__(self, cfg: EncoderConfig, model: torch.nn.Module, device: torch.device, precision: str):
        oc = _open_clip(cfg.model_name)
        # lazy: open_clip + torch ~12.6 s to import (python -X importtime)
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.cfg = cfg
        self.model = model
        self.device = device
        self.precision = precision
        self.spec = spec_from_dict(dict(model.visual.preprocess_cfg))
        self._preprocess = image_transform_v2(PreprocessCfg(**asdict(self.spec)), is_train=False)
        self.resizer = ImageResizer(self.spec)
        self._tokenizer = oc.get_tokenizer(cfg.model_name)
        self._mean = torch.tensor(self.spec.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.std, device=device).view(1, 3, 1, 1)
        self.dim = int(getattr(model.visual, "output_dim", 0) or self._probe_dim())  # read, never assumed

    @property
    def model_name(self) -> str:
        return self.cfg.model_name

    @property
    def pretrained(self) -> str | None:
        return self.cfg.pretrained

    @property
    def tag(self) -> str:
        return encoder_tag(self.cfg)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """open_clip's eval transform: PIL image -> float tensor (3, H, W)."""
        return self._preprocess(image)

    def resize(self, image: Image.Image) -> np.ndarray:
        return self.resizer(image)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision in _AUTOCAST:
            return torch.autocast(device_type=self.device.type, dtype=_AUTOCAST[self.precision])
        return contextlib.nullcontext()

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """Preprocessed images (B, 3, H, W) -> unnormalised image embeddings np.float32 (B, D)."""
        x = images.to(self.device, non_blocking=True)
        with self._autocast():
            out = self.model.encode_image(x)
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Resized uint8 images (B, H, W, 3) -> embeddings np.float32 (B, D) (normalises on the device)."""
        pixels = np.ascontiguousarray(pixels)
        if not pixels.flags.writeable:  # e.g. zero-copy views of Ray objects; torch wants writable memory
            pixels = pixels.copy()
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1], like ToTensor
        x = (x - self._mean) / self._std
        with self._autocast():
            out = self.model.encode_image(x)
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Captions -> unnormalised text embeddings np.float32 (B, D)."""
        tokens = self._tokenizer(list(texts)).to(self.device)
        with self._autocast():
            out = self.model.encode_text(tokens)
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def _probe_dim(self) -> int:
        size = self.spec.size if isinstance(self.spec.size, tuple) else (self.spec.size, self.spec.size)
        return int(self.model.encode_image(torch.zeros(1, 3, *size, device=self.device)).shape[-1])


def load_encoder(cfg: EncoderConfig, device: str | torch.device = "cpu", precision: str = "fp32") -> ClipEncoder:
    """Build the model of ``cfg`` (validated first) on ``device``; ``precision`` "fp16"/"bf16" = autocast."""
    validate_config(cfg)
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    oc = _open_clip(cfg.model_name)
    weights = resolve_weights(cfg.pretrained) if cfg.pretrained else shipped_weights(cfg.model_name)
    # Seeded init without touching the caller's RNG: `tiny-random` (and any random-weights model) is
    # then identical in every process. Built on the CPU so the init does not depend on the device.
    with torch.random.fork_rng(devices=[]), _quiet_random_init(weights is None), _skip_init(weights is not None):
        torch.manual_seed(TINY_SEED)
        model = oc.create_model(cfg.model_name, pretrained=weights, device="cpu", pretrained_text=False)
    model = model.to(device).eval()
    return ClipEncoder(cfg, model, device, precision)


@contextlib.contextmanager
def _skip_init(active: bool) -> Iterator[None]:
    """No random init of weights that the checkpoint replaces: open_clip loads full checkpoints with
    ``strict=True``, so every parameter is overwritten (a missing key fails the load), while buffers it computes
    (the text tower's causal mask) are not made by ``torch.nn.init``. Saves ~1.5 s of CPU per ViT-B-32 load,
    on the start-up path of every embed and caption actor. Process-global while it lasts: models are built
    one at a time in a process."""
    if not active:
        yield
        return
    init = torch.nn.init
    saved = {n: getattr(init, n) for n in dir(init) if n.endswith("_") and not n.startswith("_")}
    try:
        for name in saved:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init(active: bool) -> Iterator[None]:
    """Without ``pretrained`` the seeded init *is* the model (the ``tiny`` preset, speed runs): open_clip's
    root-logger warning "No pretrained weights loaded ... initialized randomly" would only alarm users who
    load a trained ClipCap model built on such an encoder."""
    if not active:
        yield
        return
    flt, root = _DropRandomInitWarning(), logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)

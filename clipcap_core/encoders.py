"""CLIP image/text encoders (open_clip): loading by name + pretrained tag, local file or object-store URI.

    enc = load_encoder(EncoderConfig(model_name="ViT-B-32", pretrained="openai"), device="cuda")
    enc = load_encoder(EncoderConfig(model_name="ViT-B-32", pretrained="s3://bucket/clip/vit-b-32.pt"))
    enc = load_encoder(EncoderConfig())            # the `tiny` preset: seeded random weights, CPU-fast
    x = torch.stack([enc.preprocess(img) for img in images])    # (B, 3, H, W)
    e = enc.encode_images(x)                                     # np.float32 (B, D), D = enc.dim

The `tiny` preset is a small open_clip config shipped in ``clipcap_core/resources/tiny.json`` (ViT on
64x64 images, 8x8 patches, fixed 2-D sin-cos positions, average pooling; 2-layer text tower). Its weights are
a fixed-seed random init, identical in every process, so the embed and caption jobs agree without a
checkpoint file. Random weights keep colour, shape, size, count and position of the synthetic images
linearly decodable (checked by ``tests/core/test_encoders.py``); they carry no language-image alignment.

Preprocessing is split for pipelines: ``resize`` (PIL -> uint8 (H, W, 3), done in decode tasks) then
``encode_pixels`` (uint8 (B, H, W, 3) -> normalise -> encode, done in the encoder actor); together they equal
``encode_images(stack(preprocess(img)))``. No Ray import here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipcap_core import uris
from clipcap_core.preprocess import ImageResizer, PreprocessSpec, spec_from_dict

TINY = "tiny"
TINY_SEED = 1234
_RESOURCES = Path(__file__).parent / "resources"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Which CLIP model makes the embeddings. ``pretrained``: open_clip tag, local file or fsspec URI."""

    model_name: str = TINY
    pretrained: str | None = None


def _open_clip() -> Any:
    import open_clip

    if TINY not in open_clip.list_models():
        for cfg in sorted(_RESOURCES.glob("*.json")):  # tiny.json, tiny-random.json: model name = file stem
            open_clip.add_model_config(cfg)
    return open_clip


def shipped_weights(model_name: str) -> str | None:
    """Weights shipped with the package for ``model_name`` (the aligned ``tiny`` CLIP), else None.

    ``resources/<name>.safetensors`` is loaded when no ``pretrained`` is given; ``tiny-random`` has none (its
    seeded random init is the point)."""
    path = _RESOURCES / f"{model_name}.safetensors"
    return str(path) if path.is_file() else None


def available_models() -> list[str]:
    return list(_open_clip().list_models())


def validate_config(cfg: EncoderConfig) -> None:
    """Raise ValueError (clear message) unless the model name and pretrained source can be resolved.

    Cheap: no weights are read; a URI is only checked for existence.
    """
    oc = _open_clip()
    models = oc.list_models()
    if cfg.model_name not in models:
        close = [m for m in models if cfg.model_name.lower().replace("/", "-") in m.lower()][:8]
        hint = f" Did you mean one of {close}?" if close else f" Known models include {models[:10]}..."
        raise ValueError(f"unknown CLIP model name {cfg.model_name!r}.{hint}")
    pre = cfg.pretrained
    if not pre:
        return
    if pre in oc.list_pretrained_tags_by_model(cfg.model_name):
        return
    if uris.is_remote(pre):
        try:
            found = uris.exists(pre)
        except Exception as exc:  # noqa: BLE001 - any backend error is a config problem here
            raise ValueError(f"cannot reach CLIP weights {pre!r}: {type(exc).__name__}: {exc}") from exc
        if not found:
            raise ValueError(f"CLIP weights not found at {pre!r}")
        return
    if not Path(pre.removeprefix("file://")).is_file():
        tags = oc.list_pretrained_tags_by_model(cfg.model_name)
        raise ValueError(f"pretrained {pre!r} for {cfg.model_name!r} is neither a known tag {tags} nor an existing "
                         "file / object-store URI")


def encoder_tag(cfg: EncoderConfig) -> str:
    """Path-safe name of the model that made the embeddings: "tiny", "ViT-B-32-openai", "ViT-B-32-mycheckpoint"."""
    if not cfg.pretrained:
        return cfg.model_name
    pre = cfg.pretrained
    if "/" in pre or pre.endswith((".pt", ".pth", ".bin", ".safetensors")):
        pre = posixpath.basename(pre.rstrip("/")).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{cfg.model_name}-{pre}")


def embedding_dim(cfg: EncoderConfig) -> int:
    """D of ``cfg``'s model, read from its open_clip config (no weights are built)."""
    return int(_open_clip().get_model_config(cfg.model_name)["embed_dim"])


def preprocess_spec(cfg: EncoderConfig) -> PreprocessSpec:
    """The inference preprocessing open_clip uses for ``cfg``, without building the model."""
    oc = _open_clip()
    from open_clip.transform import PreprocessCfg

    base = asdict(PreprocessCfg())
    if cfg.pretrained and cfg.pretrained in oc.list_pretrained_tags_by_model(cfg.model_name):
        tag_cfg = oc.get_pretrained_cfg(cfg.model_name, cfg.pretrained)
        base.update({k: v for k, v in tag_cfg.items() if k in base and v is not None})
    base["size"] = oc.get_model_config(cfg.model_name)["vision_cfg"]["image_size"]
    return spec_from_dict(base)


def resolve_weights(pretrained: str, cache_dir: str | None = None) -> str:
    """Local path for ``pretrained``: a tag or local file is returned as is; a URI is downloaded once."""
    if not uris.is_remote(pretrained):
        return pretrained.removeprefix("file://")
    cache = Path(cache_dir or os.environ.get("CLIPCAP_CACHE", Path.home() / ".cache" / "clipcap")) / "weights"
    digest = hashlib.sha256(pretrained.encode()).hexdigest()[:16]
    local = cache / digest / posixpath.basename(pretrained.rstrip("/"))
    if not local.exists():
        uris.download_file(pretrained, local)  # concurrent actors: last rename wins, same bytes
    return str(local)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


class ClipEncoder:
    """A loaded open_clip model in eval mode with its preprocessing and tokenizer."""

    def __init__(self, cfg: EncoderConfig, model: torch.nn.Module, device: torch.device, precision: str):
        oc = _open_clip()
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
    oc = _open_clip()
    weights = resolve_weights(cfg.pretrained) if cfg.pretrained else shipped_weights(cfg.model_name)
    # Seeded init without touching the caller's RNG: the tiny preset (and any random-weights model) is
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

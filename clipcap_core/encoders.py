"""CLIP encoders (open_clip) by name + pretrained tag, file or URI: the config (``EncoderConfig``; D and
preprocessing read from open_clip's JSON model configs, nothing built) and the loaded model (``ClipEncoder``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from clipcap_core import uris
from clipcap_core.imaging import ImageResizer, PreprocessSpec, spec_from_dict

TINY = "tiny"
TINY_SEED = 1234
_RESOURCES = Path(__file__).parent / "resources"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")  # weights file names (not hub tags)
# open_clip's ``PreprocessCfg()`` defaults (tests check them against open_clip's own)
OPEN_CLIP_PREPROCESS = {"size": 224, "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
                        "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic",
                        "resize_mode": "shortest", "fill_color": 0}


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Which CLIP model makes the embeddings."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"model_name": "--clip", "pretrained": "--clip-pretrained"}
    model_name: str = TINY  # open_clip model name, e.g. ViT-B-32 (default: tiny)
    pretrained: str | None = None
    """open_clip tag (openai, laion2b_s34b_b79k...), local file or fsspec URI (s3://...) of the weights"""


def _open_clip() -> Any:
    """open_clip with our model configs (``resources/*.json``) registered."""
    # lazy: open_clip takes 4-6 s to import after torch (2-core VM, loaded); the config side reads its JSON instead
    import open_clip

    if TINY not in open_clip.list_models():
        for cfg in sorted(_RESOURCES.glob("*.json")):  # tiny.json, tiny-random.json: model name = file stem
            open_clip.add_model_config(cfg)
    return open_clip


def _natural_key(name: str) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


@cache
def model_configs() -> dict[str, dict[str, Any]]:
    """Every model open_clip can build, name -> config, read from its JSON files and ours (which win), in
    open_clip's order, without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed (pip install open_clip_torch)")
    folders = [Path(next(iter(spec.submodule_search_locations))) / "model_configs", _RESOURCES]
    found: dict[str, dict[str, Any]] = {}
    for folder in folders:
        for path in folder.glob("*.json"):
            cfg = json.loads(path.read_text())
            if isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                found[path.stem] = cfg
    return dict(sorted(found.items(), key=lambda kv: _natural_key(kv[0])))


def is_weights_location(pretrained: str) -> bool:
    """True when ``pretrained`` names a file or object (path, URI, weights file name), not a hub tag."""
    return (uris.is_remote(pretrained) or pretrained.startswith("file://") or "/" in pretrained
            or os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES))


def shipped_weights(model_name: str) -> str | None:
    """Weights shipped with the package for ``model_name`` (``tiny``, ``tiny-scenes``...), else None."""
    path = _RESOURCES / f"{model_name}.safetensors"
    return str(path) if path.is_file() else None


def describe_weights(model_name: str, pretrained: str | None) -> str:
    """Where ``model_name``'s weights come from, for model cards (random never passes for trained)."""
    if pretrained:
        kind = "weights file" if is_weights_location(pretrained) else "pretrained tag"
        return f"{model_name}, {kind} {pretrained!r}"
    shipped = shipped_weights(model_name)
    if shipped:
        return f"{model_name}, trained weights shipped with clipcap_core (resources/{Path(shipped).name})"
    return f"{model_name}, seeded random init (no pretrained weights)"


def available_models() -> list[str]:
    return list(model_configs())


def validate_config(cfg: EncoderConfig) -> None:
    """Raise ValueError (clear message) unless the model name and pretrained source can be resolved."""
    models = available_models()
    if cfg.model_name not in models:
        close = [m for m in models if cfg.model_name.lower().replace("/", "-") in m.lower()][:8]
        hint = f" Did you mean one of {close}?" if close else f" Known models include {models[:10]}..."
        raise ValueError(f"unknown CLIP model name {cfg.model_name!r}.{hint}")
    pre = cfg.pretrained
    if not pre:
        return
    if not is_weights_location(pre) and pre in _open_clip().list_pretrained_tags_by_model(cfg.model_name):
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
        tags = _open_clip().list_pretrained_tags_by_model(cfg.model_name)
        raise ValueError(f"pretrained {pre!r} for {cfg.model_name!r} is neither a known tag {tags} nor an existing "
                         "file / object-store URI")


def fetch_pretrained(cfg: EncoderConfig) -> str | None:
    """Bring a hub tag's weights into the local cache on the driver before any actor starts (else an
    unreachable hub fails inside actors Ray restarts again and again); returns the file, None for others."""
    pre = cfg.pretrained
    if not pre or is_weights_location(pre):
        return None
    oc = _open_clip()
    source = oc.get_pretrained_cfg(cfg.model_name, pre)
    if not source:
        return None  # validate_config names an unknown tag
    try:
        return oc.download_pretrained(source) or None
    except Exception as exc:  # noqa: BLE001 - no network, no hub, a proxy error: one clear message
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"cannot fetch the CLIP weights {cfg.model_name}/{pre} from the model hub "
                         f"({type(exc).__name__}: {first[:200]}); pass --clip-pretrained a local file or an object-store "
                         "URI (s3://...) of the checkpoint instead") from None


def encoder_tag(cfg: EncoderConfig) -> str:
    """Path-safe name of the model that made the embeddings: "tiny", "ViT-B-32-openai", "ViT-B-32-mycheckpoint"."""
    if not cfg.pretrained:
        return cfg.model_name
    pre = cfg.pretrained
    if "/" in pre or pre.endswith(WEIGHT_SUFFIXES):
        pre = posixpath.basename(pre.rstrip("/")).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{cfg.model_name}-{pre}")


def _model_config(name: str) -> dict[str, Any]:
    try:
        return model_configs()[name]
    except KeyError:
        raise ValueError(f"unknown CLIP model name {name!r}") from None


def embedding_dim(cfg: EncoderConfig) -> int:
    """D of ``cfg``'s model, read from its open_clip config (no weights are built)."""
    return int(_model_config(cfg.model_name)["embed_dim"])


def preprocess_spec(cfg: EncoderConfig) -> PreprocessSpec:
    """open_clip's inference preprocessing for ``cfg`` (a hub tag's own settings included), nothing built."""
    base = dict(OPEN_CLIP_PREPROCESS)
    if cfg.pretrained and not is_weights_location(cfg.pretrained):
        oc = _open_clip()
        if cfg.pretrained in oc.list_pretrained_tags_by_model(cfg.model_name):
            tag_cfg = oc.get_pretrained_cfg(cfg.model_name, cfg.pretrained)
            base.update({k: v for k, v in tag_cfg.items() if k in base and v is not None})
    base["size"] = _model_config(cfg.model_name)["vision_cfg"]["image_size"]
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


def resolve_precision(precision: str, device: Any) -> str:
    """"auto" -> fp16 on a CUDA ``device`` (a ``torch.device``), fp32 elsewhere; others checked and kept."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision in AMP_DTYPES:
        return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])
    return contextlib.nullcontext()


class ClipEncoder:
    """A loaded open_clip model in eval mode with its preprocessing and tokenizer."""

    def __init__(self, cfg: EncoderConfig, model: torch.nn.Module, device: torch.device, precision: str):
        oc = _open_clip()
        self.cfg = cfg
        self.model = model
        self.device = device
        self.precision = precision
        self.spec = spec_from_dict(dict(model.visual.preprocess_cfg))
        # open_clip's eval transform, PIL image -> float tensor (3, H, W); its geometry alone, PIL -> uint8 (H, W, 3)
        self.preprocess = oc.transform.image_transform_v2(oc.transform.PreprocessCfg(**asdict(self.spec)),
                                                          is_train=False)
        self.resize = ImageResizer(self.spec)
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

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """Preprocessed images (B, 3, H, W) -> unnormalised image embeddings np.float32 (B, D)."""
        return self._run(self.model.encode_image, images.to(self.device, non_blocking=True))

    @torch.inference_mode()
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Resized uint8 images (B, H, W, 3) -> embeddings np.float32 (B, D) (normalises on the device)."""
        pixels = np.ascontiguousarray(pixels)
        if not pixels.flags.writeable:  # e.g. zero-copy views of Ray objects; torch wants writable memory
            pixels = pixels.copy()
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1], like ToTensor
        return self._run(self.model.encode_image, (x - self._mean) / self._std)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Captions -> unnormalised text embeddings np.float32 (B, D)."""
        return self._run(self.model.encode_text, self._tokenizer(list(texts)).to(self.device))

    def _run(self, encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> np.ndarray:
        with autocast(self.precision, self.device):
            return encode(x).float().cpu().numpy()

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
    # seeded on the CPU, caller's RNG untouched: random weights are the same in every process and device
    with torch.random.fork_rng(devices=[]), _quiet_random_init() if weights is None else _skip_init():
        torch.manual_seed(TINY_SEED)
        model = oc.create_model(cfg.model_name, pretrained=weights, device="cpu", pretrained_text=False)
    model = model.to(device).eval()
    return ClipEncoder(cfg, model, device, precision)


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """No random init of weights a checkpoint replaces (open_clip loads with ``strict=True``): ~1.5 s of CPU
    per ViT-B-32 load in every embed and caption actor. Process-global while it lasts."""
    init = torch.nn.init
    saved = {n: getattr(init, n) for n in dir(init) if n.endswith("_") and not n.startswith("_")}
    try:
        for name in saved:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _not_random_init_warning(record: logging.LogRecord) -> bool:
    return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded" warning where the seeded init *is* the model."""
    logging.getLogger().addFilter(_not_random_init_warning)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(_not_random_init_warning)

"""Contrastive CLIP training, pure PyTorch (no Ray), following open_clip's own trainer (loss, temperature
clamp, AdamW settings, no-decay rule, schedule) so a model trained here behaves like one trained there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save_file

from clipcap_core.encoders import (
    TINY_SEED,
    EncoderConfig,
    _open_clip,
    autocast,
    resolve_weights,
    shipped_weights,
    validate_config,
)
from clipcap_core.training import optimizer_step

DEFAULT_WARMUP_STEPS, MAX_WARMUP_FRACTION = 100, 0.05


@dataclass(frozen=True, kw_only=True)
class ClipTrainConfig:
    """Contrastive training hyperparameters (open_clip's defaults); ``CLI_FLAGS``: the fields not flags."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {
        "beta1": None, "beta2": None, "eps": None, "warmup_fraction": None, "gather_with_grad": None,
        "crop_scale": None, "logit_scale": None, "cone_init": None, "group_size": None,
    }
    epochs: int = 10  # passes over the training pairs
    batch_size: int = 256  # pairs per worker per step (the loss sees workers x this: features are gathered)
    lr: float = 5e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.2  # AdamW weight decay (not on gains, biases, logit scale)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int | None = None
    """linear warm-up steps before the cosine decay (default: DEFAULT_WARMUP_STEPS = 100, at most
    MAX_WARMUP_FRACTION = 5% of the run)"""
    warmup_fraction: float | None = None  # warm-up as a share of the run's steps (instead of steps)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast precision (bf16 / fp16 on GPU)
    seed: int = 0  # init, crop and shard-order seed
    local_loss: bool = False  # each worker's rows against all gathered features (open_clip --local-loss)
    gather_with_grad: bool = True  # gradients flow through the gathered features (open_clip --gather-with-grad)
    lock_image: bool = False  # freeze the image tower (LiT-style when fine-tuning)
    lock_text: bool = False  # freeze the text tower
    augment: Literal["none", "crop"] = "crop"
    """training-time image augmentation (crop: RandomResizedCrop(scale=crop_scale) in the data tasks)"""
    crop_scale: tuple[float, float] = (0.9, 1.0)  # open_clip's default train crop
    # Fixed logit scale (1 / temperature, e.g. 100), not learned; None: learned from open_clip's init (1 / 0.07).
    logit_scale: float | None = None
    # Seeded offset of this size (x sqrt(width)) on each tower's final LayerNorm bias: one cone per modality.
    cone_init: float = 0.0
    # Consecutive pairs kept in one batch (2: a scene and its twin, ``scenes.generate(twins=True)``);
    # in-memory data with no held-out split (a held-out sample would break its group).
    group_size: int = 1

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps of a run of ``total_steps``: as set, or the default capped at 5% of the run."""
        if self.warmup_fraction is not None:
            return math.ceil(self.warmup_fraction * total_steps)
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(DEFAULT_WARMUP_STEPS, max(1, math.ceil(MAX_WARMUP_FRACTION * total_steps)))

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"epochs must be >= 1 and batch_size >= 2, got {self.epochs} / {self.batch_size}")
        if self.lr <= 0 or (self.warmup_steps or 0) < 0 or self.grad_clip < 0:
            raise ValueError("lr must be > 0, warmup_steps and grad_clip >= 0")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.logit_scale is not None and not 0 < self.logit_scale <= 100:
            raise ValueError(f"logit_scale must be in (0, 100] (it is clamped to 100), got {self.logit_scale}")
        if self.cone_init < 0:
            raise ValueError(f"cone_init must be >= 0, got {self.cone_init}")
        if self.group_size < 1 or self.batch_size % self.group_size:
            raise ValueError(f"group_size must be >= 1 and divide batch_size {self.batch_size}, got {self.group_size}")
        if self.lock_image and self.lock_text:
            raise ValueError("lock_image and lock_text together leave nothing to train but the temperature")


@dataclass(frozen=True, kw_only=True)
class ClipModelSpec:
    """Which CLIP to train: an open_clip model name, from scratch or fine-tuned from ``pretrained``."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"model_name": "--clip", "pretrained": "--clip-pretrained"}
    model_name: str = "tiny"  # open_clip model name (tiny, ViT-B-32, ...)
    pretrained: str | None = None  # fine-tune from an open_clip tag, a weights file or an object-store URI
    from_scratch: bool = False  # seeded random init even where the name ships weights (e.g. the aligned tiny)

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(model_name=self.model_name, pretrained=self.pretrained)


def build_clip(spec: ClipModelSpec, *, seed: int = TINY_SEED, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The open_clip model of ``spec`` in train mode: seeded init (same in every process), then its weights."""
    validate_config(spec.encoder_config())
    oc = _open_clip()
    weights = resolve_weights(spec.pretrained) if spec.pretrained else None
    if weights is None and not spec.from_scratch:
        weights = shipped_weights(spec.model_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = oc.create_model(spec.model_name, pretrained=weights, device="cpu", pretrained_text=False)
    return model.to(device).train()


def lock_towers(model: torch.nn.Module, hp: ClipTrainConfig) -> None:
    """Freeze the towers ``hp`` asks for, with open_clip's own ``lock_*_tower`` (fully locked)."""
    if hp.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    if hp.lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)


def _final_norms(model: torch.nn.Module) -> list[torch.nn.LayerNorm]:
    """The LayerNorms right before each tower's projection (open_clip's ``visual.ln_post``, ``ln_final``)."""
    m = getattr(model, "module", model)
    text = getattr(m, "text", m)  # CustomTextCLIP keeps its text tower under .text
    norms = [getattr(getattr(m, "visual", None), "ln_post", None), getattr(text, "ln_final", None)]
    if not all(isinstance(n, torch.nn.LayerNorm) for n in norms):
        raise ValueError("cone_init needs open_clip towers with visual.ln_post and ln_final LayerNorms")
    return norms  # type: ignore[return-value]


def shape_init(model: torch.nn.Module, hp: ClipTrainConfig) -> None:
    """Apply ``hp.cone_init`` and a frozen ``hp.logit_scale``: the two causes of the modality gap in Liang
    et al., "Mind the Gap" (NeurIPS 2022)."""
    m = getattr(model, "module", model)
    gen = torch.Generator().manual_seed(hp.seed + 7919)
    with torch.no_grad():
        if hp.cone_init > 0:
            for norm in _final_norms(m):
                width = norm.bias.numel()
                offset = torch.nn.functional.normalize(torch.randn(width, generator=gen), dim=0)
                norm.bias.add_(offset.to(norm.bias) * hp.cone_init * math.sqrt(width))
        if hp.logit_scale is not None:
            m.logit_scale.fill_(math.log(hp.logit_scale))
            m.logit_scale.requires_grad_(False)


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    # open_clip_train/main.py: gains, biases, 1-D params and the temperature get no weight decay
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def grouped_order(n: int, group: int, gen: torch.Generator) -> torch.Tensor:
    """A seeded permutation of ``range(n)`` keeping each run of ``group`` consecutive indices together."""
    return (torch.randperm(n // group, generator=gen)[:, None] * group + torch.arange(group)).reshape(-1)


def make_optimizer_and_scheduler(model: torch.nn.Module, hp: ClipTrainConfig, total_steps: int
                                 ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with open_clip's weight-decay exclusions; linear warm-up then cosine decay to 0 at ``total_steps``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the CLIP model has no trainable parameters")
    groups = [{"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": hp.weight_decay}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=(hp.beta1, hp.beta2),
                                  eps=hp.eps)
    warmup = hp.warmup_for(total_steps)
    warm = max(1, warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warm
        span = max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_loss(hp: ClipTrainConfig, rank: int = 0, world_size: int = 1) -> torch.nn.Module:
    """open_clip's ``ClipLoss``; with ``world_size`` > 1 it all-gathers features over the default process group."""
    return ClipLoss(local_loss=hp.local_loss, gather_with_grad=hp.gather_with_grad, cache_labels=True,
                    rank=rank, world_size=world_size)


def normalize_pixels(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised with the model's preprocessing mean/std."""
    cfg = getattr(model, "module", model).visual.preprocess_cfg  # DDP-wrapped or not
    mean = torch.tensor(cfg["mean"], device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=pixels.device).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float().div_(255.0) - mean) / std


def features(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, precision: str = "fp32"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised image features (B, D), normalised text features (B, D), logit scale exp'd) of a batch."""
    with autocast(precision, pixels.device):
        out = model(normalize_pixels(model, pixels), tokens)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def clamp_logit_scale(model: torch.nn.Module) -> None:
    with torch.no_grad():
        getattr(model, "module", model).logit_scale.clamp_(0, math.log(100))


def train_step(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, optimizer: torch.optim.Optimizer,
               scheduler: Any, hp: ClipTrainConfig, loss_fn: torch.nn.Module,
               scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimisation step on a (pixels uint8 (B,H,W,3), tokens (B,T)) batch; returns the loss."""
    model.train()
    img, txt, scale = features(model, pixels, tokens, hp.precision)
    loss = loss_fn(img.float(), txt.float(), scale.float())
    optimizer_step(loss, [p for p in model.parameters() if p.requires_grad], optimizer, scheduler, hp.grad_clip,
                   scaler)
    clamp_logit_scale(model)
    return float(loss.detach())


def make_scaler(hp: ClipTrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if hp.precision == "fp16" and device.type == "cuda" else None


def save_clip_weights(model: torch.nn.Module, path: str, dtype: torch.dtype | None = None) -> None:
    """The model's state dict as one safetensors file (open_clip loads it as ``pretrained=<file>``)."""
    state = getattr(model, "module", model).state_dict()
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state.items()}
    save_file(tensors, path, metadata={"format": "pt"})


@torch.inference_mode()
def encode_batches(model: torch.nn.Module, pixels: np.ndarray, tokens: torch.Tensor, batch_size: int = 256,
                   precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Normalised image and text embeddings (float32 numpy) of paired arrays, in batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    imgs, txts = [], []
    for s in range(0, len(pixels), batch_size):
        px = torch.from_numpy(np.ascontiguousarray(pixels[s: s + batch_size])).to(device)
        with autocast(precision, device):
            imgs.append(model.encode_image(normalize_pixels(model, px), normalize=True).float().cpu().numpy())
            txts.append(model.encode_text(tokens[s: s + batch_size].to(device), normalize=True).float().cpu().numpy())
    model.train(was_training)
    d = int(getattr(getattr(model, "visual", None), "output_dim", 0) or 0)
    empty = np.zeros((0, d), np.float32)
    return (np.concatenate(imgs) if imgs else empty), (np.concatenate(txts) if txts else empty)

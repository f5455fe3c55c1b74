"""Training core (pure PyTorch; the Ray Train job calls these per worker): batches, AdamW + linear warm-up,
the train step (gradient clipping, mixed precision), evaluation loss and held-out caption metrics."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from clipcap_core.decoding import generate
from clipcap_core.encoders import autocast
from clipcap_core.metrics import heldout_metrics
from clipcap_core.model import ClipCapModel, trainable_parameters
from clipcap_core.tokenizer import encode_caption


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How a model preset trains unless told otherwise (``presets.RECIPES``). ``max_warmup_fraction`` caps the
    recipe's warm-up at that share of the run, so a short run still reaches its peak rate."""

    lr: float
    warmup_steps: int
    batch_size: int
    epochs: int
    max_caption_tokens: int  # including the final end-of-text
    weight_decay: float = 0.0
    max_warmup_fraction: float = 0.05
    label_smoothing: float = 0.0  # eps of the caption loss's label smoothing


# The ClipCap paper's COCO recipe: ~141k steps on COCO, where the 5% cap (7k) leaves the 5,000 unchanged.
PAPER_RECIPE = Recipe(lr=2e-5, warmup_steps=5000, batch_size=40, epochs=10, max_caption_tokens=40)
RECIPE_FIELDS = ("lr", "warmup_steps", "batch_size", "epochs", "max_caption_tokens", "weight_decay",
                 "label_smoothing")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training hyperparameters; a field left ``None`` comes from the preset's ``Recipe`` (``PAPER_RECIPE`` if
    unresolved). ``CLI_FLAGS``: the fields that are not flags of the training commands."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"max_warmup_fraction": None, "grad_clip": None,
                                                  "label_smoothing": None}
    lr: float | None = None  # peak learning rate, AdamW (default: the preset's recipe)
    warmup_steps: int | None = None  # linear warm-up steps (default: the recipe's, at most 5% of the run)
    warmup_fraction: float | None = None  # linear warm-up as a share of the run's steps (instead of steps)
    max_warmup_fraction: float | None = None  # cap on warmup_steps as a share of the run (None: no cap)
    batch_size: int | None = None  # captions per step and worker (default: the preset's recipe)
    epochs: int | None = None  # passes over the training split (default: the preset's recipe)
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """training precision (bf16 / fp16: autocast, fp16 with a grad scaler)"""
    seed: int = 0  # seed of the model init and the data order
    max_caption_tokens: int | None = None
    """caption tokens kept per sample, incl. end-of-text (default: the preset's recipe)"""
    weight_decay: float | None = None  # AdamW weight decay (default: the preset's recipe)
    label_smoothing: float | None = None  # caption loss label smoothing eps in [0, 1)

    def __post_init__(self) -> None:
        def bad(name: str, ok: Callable[[Any], bool]) -> bool:
            value = getattr(self, name)
            return value is not None and not ok(value)

        if (bad("lr", lambda v: v > 0) or bad("batch_size", lambda v: v >= 1) or bad("epochs", lambda v: v >= 1)
                or bad("warmup_steps", lambda v: v >= 0)):
            raise ValueError("need lr > 0, batch_size >= 1, epochs >= 1, warmup_steps >= 0")
        if bad("warmup_fraction", lambda v: 0 <= v < 1) or bad("max_warmup_fraction", lambda v: 0 < v <= 1):
            raise ValueError("need 0 <= warmup_fraction < 1 and 0 < max_warmup_fraction <= 1")
        if bad("max_caption_tokens", lambda v: v >= 2):
            raise ValueError("max_caption_tokens must be >= 2 (one word + end-of-text)")
        if bad("label_smoothing", lambda v: 0 <= v < 1):
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def with_recipe(self, recipe: Recipe = PAPER_RECIPE) -> TrainConfig:
        """Every unset field from ``recipe``; its warm-up cap applies to its own warm-up only."""
        changes = {name: getattr(recipe, name) for name in RECIPE_FIELDS if getattr(self, name) is None}
        user_warmup = self.warmup_steps is not None or self.warmup_fraction is not None
        if self.max_warmup_fraction is None and not user_warmup:
            changes["max_warmup_fraction"] = recipe.max_warmup_fraction
        return dataclasses.replace(self, **changes) if changes else self

    def warmup_for(self, total_steps: int | None) -> int:
        """Warm-up steps of a run of ``total_steps`` (unknown: the configured steps, uncapped)."""
        cfg = self.with_recipe()
        if total_steps is None:
            return int(cfg.warmup_steps)
        if cfg.warmup_fraction is not None:
            return math.ceil(cfg.warmup_fraction * total_steps)
        steps = int(cfg.warmup_steps)
        if cfg.max_warmup_fraction is not None:
            steps = min(steps, max(1, math.ceil(cfg.max_warmup_fraction * total_steps)))
        return steps

    def for_run(self, recipe: Recipe, total_steps: Callable[[TrainConfig], int]) -> TrainConfig:
        """The config a run uses: recipe filled in, warm-up fixed to steps for ``total_steps(cfg)``."""
        cfg = self.with_recipe(recipe)
        return dataclasses.replace(cfg, warmup_steps=cfg.warmup_for(total_steps(cfg)), warmup_fraction=None,
                                   max_warmup_fraction=None)


@dataclass
class Batch:
    embeds: torch.Tensor  # (B, D) float32
    tokens: torch.Tensor  # (B, T) long, right-padded with end-of-text
    mask: torch.Tensor  # (B, T) float32, 1 = real token (the final end-of-text included)

    def to(self, device: str | torch.device) -> Batch:
        return Batch(self.embeds.to(device, non_blocking=True), self.tokens.to(device, non_blocking=True),
                     self.mask.to(device, non_blocking=True))


def collate(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], embeddings: np.ndarray | torch.Tensor,
            max_tokens: int) -> Batch:
    """Tokenise captions (each + end-of-text, at most ``max_tokens``), pad to the longest in the batch."""
    ids = [encode_caption(tokenizer, c, max_tokens) for c in captions]
    T = max(len(x) for x in ids)
    tokens = torch.full((len(ids), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), T)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1.0
    embeds = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    if embeds.shape[0] != len(ids):
        raise ValueError(f"{len(ids)} captions but {embeds.shape[0]} embeddings")
    return Batch(embeds, tokens, mask)


def iterate_batches(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], embeddings: np.ndarray,
                    cfg: TrainConfig, epoch: int = 0, shuffle: bool = True) -> Iterator[Batch]:
    """In-memory batches of one epoch, shuffled by (seed, epoch)."""
    cfg = cfg.with_recipe()
    order = np.arange(len(captions))
    if shuffle:
        np.random.default_rng([cfg.seed, epoch]).shuffle(order)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start: start + cfg.batch_size]
        yield collate(tokenizer, [captions[i] for i in idx], embeddings[idx], cfg.max_caption_tokens)


def make_optimizer_and_scheduler(model: nn.Module, cfg: TrainConfig, total_steps: int | None = None
                                 ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters + linear warm-up (then linear decay to 0 at ``total_steps``)."""
    cfg = cfg.with_recipe()
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_for(total_steps)
    warm = max(1, warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warm
        if total_steps is None or total_steps <= warmup:
            return 1.0
        return max(0.0, (total_steps - step) / (total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None


def train_step(model: ClipCapModel, batch: Batch, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None, cfg: TrainConfig,
               scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimisation step on ``batch`` (moved to the model's device); returns the loss."""
    device = model.device
    batch = batch.to(device)
    model.train()
    with autocast(cfg.precision, device):
        loss = model(batch.embeds, batch.tokens, batch.mask, label_smoothing=cfg.label_smoothing or 0.0).loss
    optimizer_step(loss, trainable_parameters(model), optimizer, scheduler, cfg.grad_clip, scaler)
    return float(loss.detach())


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient is NaN or infinite: the step is not taken and training must stop."""


def optimizer_step(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler | None, grad_clip: float | None,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward, optional gradient clipping, optimizer + scheduler step. A non-finite loss or gradient norm
    raises ``NonFiniteError`` before the weights change (after backward: all data-parallel workers stop)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    bad_grad = scaler is None and not bool(torch.isfinite(norm))
    if bad_grad or not bool(torch.isfinite(loss.detach())):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite {'gradient norm' if bad_grad else 'loss'} "
                             f"(loss {float(loss.detach()):.4g}, gradient norm {float(norm):.4g})")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()


def batch_rows_note(embeds: torch.Tensor | np.ndarray) -> str:
    """'; rows [i, j] of the batch have non-finite vectors' where the batch shows the cause, else ''."""
    bad = (~torch.isfinite(torch.as_tensor(embeds)).all(dim=-1)).nonzero().flatten().tolist()
    return f"; rows {bad[:10]} of the batch have non-finite vectors" if bad else ""


@torch.no_grad()
def evaluate_loss(model: ClipCapModel, batches: Iterable[Batch], precision: str = "fp32") -> float:
    """Token-weighted mean caption loss over ``batches`` (eval mode)."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    try:
        for batch in batches:
            batch = batch.to(model.device)
            with autocast(precision, model.device):
                loss = model(batch.embeds, batch.tokens, batch.mask).loss
            n = float(batch.mask.sum())
            total, count = total + float(loss) * n, count + n
    finally:
        model.train(was_training)
    return total / count if count else math.nan


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # per step
    epoch_losses: list[float] = field(default_factory=list)  # mean train loss per epoch
    eval_losses: list[float] = field(default_factory=list)  # per epoch, when eval batches are given
    seconds: float = 0.0


def train_loop(model: ClipCapModel, batches: Callable[[int], Iterable[Batch]], cfg: TrainConfig, *,
               total_steps: int | None = None, eval_batches: Callable[[], Iterable[Batch]] | None = None,
               on_step: Callable[[int, float], Any] | None = None) -> TrainResult:
    """``cfg.epochs`` passes over ``batches(epoch)``; optional per-epoch eval loss and per-step callback."""
    cfg = cfg.with_recipe()
    torch.manual_seed(cfg.seed)
    optimizer, scheduler = make_optimizer_and_scheduler(model, cfg, total_steps)
    scaler = make_scaler(cfg, model.device)
    result, t0 = TrainResult(), time.perf_counter()
    for epoch in range(cfg.epochs):
        epoch_losses = []
        for batch in batches(epoch):
            try:
                loss = train_step(model, batch, optimizer, scheduler, cfg, scaler)
            except NonFiniteError as exc:
                raise NonFiniteError(f"step {result.steps + 1}: {exc}{batch_rows_note(batch.embeds)}") from None
            result.steps += 1
            result.losses.append(loss)
            epoch_losses.append(loss)
            if on_step is not None:
                on_step(result.steps, loss)
        result.epoch_losses.append(float(np.mean(epoch_losses)) if epoch_losses else math.nan)
        if eval_batches is not None:
            result.eval_losses.append(evaluate_loss(model, eval_batches(), cfg.precision))
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result


def evaluate_captions(model: ClipCapModel, tokenizer: PreTrainedTokenizerBase, embeds: np.ndarray,
                      refs: Sequence[str] | Sequence[Sequence[str]], *, strategy: str = "greedy",
                      max_length: int = 30, batch_size: int = 256, tokenize: str = "simple",
                      clip_scorer: Any = None, **decode: Any) -> dict[str, float]:
    """``metrics.heldout_metrics`` of ``strategy`` captions vs ``refs`` (CLIPScore with ``clip_scorer``)."""
    texts = generate(model, embeds, tokenizer, strategy, max_length=max_length, batch_size=batch_size,
                     **decode).texts
    return heldout_metrics(texts, refs, image_emb=embeds if clip_scorer is not None else None,
                           scorer=clip_scorer, tokenize=tokenize)

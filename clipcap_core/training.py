"""Training core (pure PyTorch; the Ray Train job calls these per worker): batches, AdamW + linear warm-up,
train step with gradient clipping and mixed precision, evaluation loss and held-out caption metrics.

    cfg = TrainConfig(lr=1e-3, warmup_steps=50, epochs=5, batch_size=64)
    batches = lambda epoch: iterate_batches(tok, captions, embeds, cfg, epoch=epoch)
    result = train_loop(model, batches, cfg)                 # TrainResult(steps, losses)
    evaluate_captions(model, tok, heldout_embeds, heldout_captions)   # exact match, BLEU-4, CIDEr

Only parameters with ``requires_grad`` are optimised (a frozen LM is never touched). Schedule: linear warm-up
to ``lr`` over ``warmup_steps``, then linear decay to 0 at ``total_steps`` (constant when it is unknown),
as in the paper's ``get_linear_schedule_with_warmup``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from clipcap_core.model import ClipCapModel, trainable_parameters
from clipcap_core.tokenizer import encode_caption

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    lr: float = 2e-5
    warmup_steps: int = 5000
    batch_size: int = 40
    epochs: int = 10
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16 / fp16: autocast (fp16 with a grad scaler)
    seed: int = 0
    max_caption_tokens: int = 40  # including the final end-of-text
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, batch_size >= 1, epochs >= 1, warmup_steps >= 0")
        if self.max_caption_tokens < 2:
            raise ValueError("max_caption_tokens must be >= 2 (one word + end-of-text)")


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
    order = np.arange(len(captions))
    if shuffle:
        np.random.default_rng([cfg.seed, epoch]).shuffle(order)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start: start + cfg.batch_size]
        yield collate(tokenizer, [captions[i] for i in idx], embeddings[idx], cfg.max_caption_tokens)


def make_optimizer_and_scheduler(model: nn.Module, cfg: TrainConfig, total_steps: int | None = None
                                 ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters + linear warm-up (then linear decay to 0 at ``total_steps``)."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.warmup_steps)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / warm
        if total_steps is None or total_steps <= cfg.warmup_steps:
            return 1.0
        return max(0.0, (total_steps - step) / (total_steps - cfg.warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision in AMP_DTYPES:
        return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])
    return contextlib.nullcontext()


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
        loss = model(batch.embeds, batch.tokens, batch.mask).loss
    optimizer_step(loss, trainable_parameters(model), optimizer, scheduler, cfg.grad_clip, scaler)
    return float(loss.detach())


def optimizer_step(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler | None, grad_clip: float,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward (scaled with fp16), optional gradient clipping of ``params``, optimizer + scheduler step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()


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
    torch.manual_seed(cfg.seed)
    optimizer, scheduler = make_optimizer_and_scheduler(model, cfg, total_steps)
    scaler = make_scaler(cfg, model.device)
    result, t0 = TrainResult(), time.perf_counter()
    for epoch in range(cfg.epochs):
        epoch_losses = []
        for batch in batches(epoch):
            loss = train_step(model, batch, optimizer, scheduler, cfg, scaler)
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
    """Held-out caption quality: exact-match accuracy, BLEU-4 and CIDEr of ``strategy`` captions vs ``refs``,
    plus CLIPScore against ``embeds`` with a ``clipscore.ClipScorer`` of the model's CLIP (the shared
    ``evaluation.heldout_metrics``, as ``clipcap evaluate`` computes them)."""
    from clipcap_core.decoding import generate
    from clipcap_core.evaluation import heldout_metrics

    texts = generate(model, embeds, tokenizer, strategy, max_length=max_length, batch_size=batch_size,
                     **decode).texts
    return heldout_metrics(texts, refs, image_emb=embeds if clip_scorer is not None else None,
                           scorer=clip_scorer, tokenize=tokenize)

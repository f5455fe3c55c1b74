"""Training core: batches, warm-up schedule, clipping, mixed precision, and the learning test: the tiny
preset learns the synthetic set (held-out exact-match captions), as MLP + tuned LM and as transformer +
frozen LM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipcap_core.model import build_model
from clipcap_core.presets import preset_config
from clipcap_core.tokenizer import build_word_tokenizer
from clipcap_core.training import (
    TrainConfig,
    collate,
    evaluate_captions,
    evaluate_loss,
    iterate_batches,
    make_optimizer_and_scheduler,
    train_loop,
    train_step,
)
from tests.core.core_helpers import one_thread, sharp_model, synthetic_embeddings  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_collate_pads_per_batch_and_ends_every_caption_with_eos():
    tok = build_word_tokenizer()
    caps = ["a red circle", "three large blue squares on the left", "two"]
    b = collate(tok, caps, np.zeros((3, 4), np.float32), max_tokens=20)
    assert b.tokens.shape == (3, 8)  # longest caption (7 words) + eos: padded to the batch, not to max_tokens
    lengths = b.mask.sum(1).long().tolist()
    assert lengths == [4, 8, 2]
    for row, n in zip(b.tokens.tolist(), lengths, strict=True):
        assert row[n - 1] == tok.eos_token_id and all(t == tok.pad_token_id for t in row[n:])
    assert collate(tok, caps, np.zeros((3, 4)), max_tokens=3).tokens.shape == (3, 3)
    with pytest.raises(ValueError, match="3 captions but 2"):
        collate(tok, caps, np.zeros((2, 4)), max_tokens=5)


def test_linear_warmup_then_linear_decay():
    model, _ = sharp_model("mlp")
    cfg = TrainConfig(lr=0.1, warmup_steps=4, epochs=1)
    opt, sched = make_optimizer_and_scheduler(model, cfg, total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, [0.025, 0.05, 0.075, 0.1, 0.1, 0.075, 0.05, 0.025])


def test_gradient_clipping_bounds_the_global_norm():
    model, tok = sharp_model("mlp")
    cfg = TrainConfig(lr=1e-4, warmup_steps=0, grad_clip=1e-3)
    opt, sched = make_optimizer_and_scheduler(model, cfg)
    b = collate(tok, ["a red circle at the top"] * 4, 50 * np.ones((4, 128), np.float32), 10)
    train_step(model, b, opt, sched, cfg)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    assert norm <= 1e-3 * 1.001


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_reduce_the_loss(precision):
    model, tok = sharp_model("mlp")
    caps, x = synthetic_embeddings(32)
    b = collate(tok, caps, x, 12)
    cfg = TrainConfig(lr=3e-3, warmup_steps=0, precision=precision)
    before = evaluate_loss(model, [b])
    opt, sched = make_optimizer_and_scheduler(model, cfg)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    losses = [train_step(model, b, opt, sched, cfg, scaler) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert evaluate_loss(model, [b]) < before


@pytest.mark.parametrize("preset", ["tiny", "tiny-transformer"])
def test_tiny_preset_learns_the_synthetic_set(preset):
    """Held-out captions come out exactly right after a few CPU seconds of training; an untrained model gets
    none (so the check can fail)."""
    captions, x = synthetic_embeddings(1500)
    held_caps, held_x = synthetic_embeddings(200, start=100_000)
    tok = build_word_tokenizer(captions)
    torch.manual_seed(0)
    model = build_model(preset_config(preset), tok)
    untrained = evaluate_captions(model, tok, held_x, held_caps, max_length=12)
    assert untrained["exact_match"] == 0.0
    cfg = TrainConfig(lr=3e-3, warmup_steps=20, batch_size=64, epochs=6, max_caption_tokens=12)
    steps = []
    result = train_loop(model, lambda e: iterate_batches(tok, captions, x, cfg, epoch=e), cfg,
                        total_steps=6 * math.ceil(1500 / 64),
                        eval_batches=lambda: iterate_batches(tok, held_caps, held_x, cfg, shuffle=False),
                        on_step=lambda step, loss: steps.append(step))
    assert steps == list(range(1, result.steps + 1)) and result.steps == 6 * 24
    assert result.eval_losses[-1] < result.eval_losses[0] < math.log(len(tok))
    scores = evaluate_captions(model, tok, held_x, held_caps, max_length=12)
    assert scores["exact_match"] >= 0.9, scores
    assert scores["bleu4"] > 0.9 and scores["cider"] > 5

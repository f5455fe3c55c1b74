"""clip_training: open_clip's loss/optimizer conventions, tower locking, temperature clamp, weights files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipcap_core import synthetic
from clipcap_core.clip_training import (
    ClipModelSpec,
    ClipTrainConfig,
    build_clip,
    clip_loss,
    lock_towers,
    make_optimizer_and_scheduler,
    save_clip_weights,
    shape_init,
    train_step,
)

SPEC = ClipModelSpec(model_name="tiny-random", from_scratch=True)


def _batch(model: torch.nn.Module, n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    import open_clip

    samples = list(synthetic.generate(n, seed=seed, size=64))
    pixels = torch.from_numpy(np.stack([np.asarray(s.image, dtype=np.uint8) for s in samples]))
    return pixels, open_clip.get_tokenizer("tiny-random")([s.caption for s in samples])


def test_weight_decay_exclusions_follow_open_clip():
    model = build_clip(SPEC)
    opt, _ = make_optimizer_and_scheduler(model, ClipTrainConfig(weight_decay=0.3), total_steps=10)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.3 for p in g["params"]}
    assert "logit_scale" in no_decay and any(n.endswith(".bias") for n in no_decay)
    assert any("ln_" in n for n in no_decay) and not any("ln_" in n or n.endswith(".bias") for n in decay)
    assert "text_projection" in decay or any("proj" in n for n in decay)


def test_schedule_warms_up_then_decays_to_zero():
    model = build_clip(SPEC)
    opt, sched = make_optimizer_and_scheduler(model, ClipTrainConfig(lr=1.0, warmup_steps=4), total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False)) and lrs[-1] < 0.02


def test_steps_lower_the_loss_and_clamp_the_temperature():
    torch.manual_seed(0)
    model = build_clip(SPEC)
    hp = ClipTrainConfig(lr=1e-3, warmup_steps=0)
    opt, sched = make_optimizer_and_scheduler(model, hp, total_steps=1000)
    pixels, tokens = _batch(model)
    losses = [train_step(model, pixels, tokens, opt, sched, hp, clip_loss(hp)) for _ in range(8)]
    assert losses[-1] < losses[0] * 0.8
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) > 100
    train_step(model, pixels, tokens, opt, sched, hp, clip_loss(hp))
    assert model.logit_scale.item() <= math.log(100) + 1e-6


def test_fixed_temperature_stays_and_cone_init_narrows_each_modality():
    """``logit_scale`` is frozen at its value through steps; ``cone_init`` offsets both towers' final norms."""
    hp = ClipTrainConfig(lr=1e-3, warmup_steps=0, logit_scale=100.0, cone_init=1.0)
    plain, model = build_clip(SPEC), build_clip(SPEC)
    shape_init(model, hp)
    opt, sched = make_optimizer_and_scheduler(model, hp, total_steps=100)
    pixels, tokens = _batch(model)
    for _ in range(3):
        train_step(model, pixels, tokens, opt, sched, hp, clip_loss(hp))
    assert model.logit_scale.exp().item() == pytest.approx(100.0) and not model.logit_scale.requires_grad
    assert all(p is not model.logit_scale for g in opt.param_groups for p in g["params"])
    moved = (model.visual.ln_post.bias - plain.visual.ln_post.bias).norm().item()
    assert moved > 0.5 * math.sqrt(plain.visual.ln_post.bias.numel())
    with pytest.raises(ValueError, match="logit_scale"):
        ClipTrainConfig(logit_scale=200.0)


def test_lock_image_keeps_the_image_tower():
    model = build_clip(SPEC)
    hp = ClipTrainConfig(lr=1e-2, warmup_steps=0, lock_image=True)
    lock_towers(model, hp)
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    text_before = model.token_embedding.weight.clone()
    opt, sched = make_optimizer_and_scheduler(model, hp, total_steps=10)
    pixels, tokens = _batch(model)
    train_step(model, pixels, tokens, opt, sched, hp, clip_loss(hp))
    assert all(torch.equal(before[k], v) for k, v in model.visual.state_dict().items())
    assert not torch.equal(text_before, model.token_embedding.weight)


def test_fine_tuning_starts_from_saved_weights(tmp_path):
    trained = build_clip(SPEC, seed=1)
    with torch.no_grad():
        trained.logit_scale.fill_(1.234)
    path = tmp_path / "w.safetensors"
    save_clip_weights(trained, str(path))
    loaded = build_clip(ClipModelSpec(model_name="tiny-random", pretrained=str(path)), seed=99)
    fresh = build_clip(SPEC, seed=99)
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not torch.equal(fresh.state_dict()["logit_scale"], trained.state_dict()["logit_scale"])

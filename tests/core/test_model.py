"""The ClipCap model: loss on caption tokens only, logits alignment, frozen vs tuned LM, strict configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipcap_core.configs import ConfigError, from_dict, to_dict
from clipcap_core.model import ModelConfig, build_model
from clipcap_core.presets import preset_config
from clipcap_core.tokenizer import build_word_tokenizer
from clipcap_core.training import TrainConfig, collate, make_optimizer_and_scheduler, train_step
from tests.core.core_helpers import one_thread, sharp_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["a small red circle at the top", "three large blue squares on the left", "two small green triangles"]


def _batch(tok):
    torch.manual_seed(1)
    return collate(tok, CAPTIONS, torch.randn(3, 128).numpy(), max_tokens=12)


def test_logits_i_predict_token_i_from_prefix_and_earlier_tokens():
    model, tok = sharp_model("mlp")
    b = _batch(tok)
    out = model(b.embeds, b.tokens, b.mask)
    k = model.prefix_length
    full = model.lm(inputs_embeds=torch.cat((model.prefix(b.embeds), model.lm.transformer.wte(b.tokens)), 1)).logits
    torch.testing.assert_close(out.logits, full[:, k - 1: -1])
    assert out.logits.shape == (*b.tokens.shape, len(tok))


def test_loss_covers_caption_tokens_only():
    model, tok = sharp_model("mlp")
    b = _batch(tok)
    out = model(b.embeds, b.tokens, b.mask)
    real = b.mask.bool()
    manual = F.cross_entropy(out.logits[real], b.tokens[real])
    torch.testing.assert_close(out.loss, manual)
    # what sits in the padding changes neither the loss nor the logits of real positions
    junk = b.tokens.clone()
    junk[~real] = 5
    out2 = model(b.embeds, junk, b.mask)
    torch.testing.assert_close(out2.loss, out.loss)
    torch.testing.assert_close(out2.logits[real], out.logits[real])
    # the final end-of-text is part of the loss: the model learns to stop
    last = b.mask.sum(1).long() - 1
    assert (b.tokens[torch.arange(3), last] == tok.eos_token_id).all()


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_frozen_lm_gets_no_gradients_and_never_changes(kind):
    model, tok = sharp_model(kind, freeze=True)
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    assert not any(p.requires_grad for p in model.lm.parameters())
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, batch_size=3, epochs=1)
    opt, sched = make_optimizer_and_scheduler(model, cfg)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.mapping.parameters()}
    train_step(model, _batch(tok), opt, sched, cfg)
    assert all(p.grad is None for p in model.lm.parameters())  # none computed, none stored
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mapping.parameters())
    assert not model.lm.training  # frozen LM: no dropout even in train mode
    for k, v in model.lm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_tuned_lm_is_trained():
    model, tok = sharp_model("mlp", freeze=False)
    before = model.lm.transformer.h[0].attn.c_attn.weight.clone()
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, batch_size=3, epochs=1)
    opt, sched = make_optimizer_and_scheduler(model, cfg)
    train_step(model, _batch(tok), opt, sched, cfg)
    assert model.lm.transformer.h[0].attn.c_attn.weight.grad is not None
    assert not torch.equal(model.lm.transformer.h[0].attn.c_attn.weight, before)


def test_model_config_is_strict_and_round_trips():
    cfg = preset_config("tiny-transformer")
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    bad = to_dict(cfg)
    bad["mapping"]["heads"] = 4
    with pytest.raises(ConfigError, match="mapping"):
        from_dict(ModelConfig, bad)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(ModelConfig, {**to_dict(cfg), "prefix": 3})
    with pytest.raises(ConfigError, match="clip_dim"):
        from_dict(ModelConfig, {**to_dict(cfg), "clip_dim": "512"})


def test_tokenizer_larger_than_lm_vocabulary_is_refused():
    cfg = preset_config("tiny")
    lm = build_model(cfg, build_word_tokenizer()).lm
    with pytest.raises(ValueError, match="vocabulary"):
        build_model(cfg, build_word_tokenizer(words=[f"w{i}" for i in range(100)]), lm=lm)

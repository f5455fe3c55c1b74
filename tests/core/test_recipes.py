"""Training recipes: presets carry them, flags override them, warm-up is capped by the run's length, a
non-finite step stops training with the weights untouched, and artifacts and metrics are never poisoned."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipcap_core.artifacts import save_model, verify_weights
from clipcap_core.configs import strict_json
from clipcap_core.model import build_model
from clipcap_core.presets import RECIPES, preset_config, preset_recipe
from clipcap_core.tokenizer import load_tokenizer
from clipcap_core.training import (
    PAPER_RECIPE,
    Batch,
    NonFiniteError,
    TrainConfig,
    make_optimizer_and_scheduler,
    train_loop,
)


def _peak_lr(cfg: TrainConfig, total: int) -> float:
    with_params = torch.nn.Module()
    with_params.p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = make_optimizer_and_scheduler(with_params, cfg, total)
    peak = 0.0
    for _ in range(total):
        peak = max(peak, opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return peak


def _run(cfg: TrainConfig, recipe, steps_per_epoch: int) -> TrainConfig:
    return cfg.for_run(recipe, lambda c: c.epochs * steps_per_epoch)


def test_a_short_run_reaches_the_recipes_peak_rate():
    # 679 steps with the paper's 5,000 warm-up steps: capped at 5% of the run, so the peak is reached.
    hp = _run(TrainConfig(), PAPER_RECIPE, 68)
    assert (hp.lr, hp.batch_size, hp.epochs, hp.max_caption_tokens) == (2e-5, 40, 10, 40)
    assert hp.warmup_steps == 34 and hp.warmup_fraction is None and hp.max_warmup_fraction is None
    assert _peak_lr(hp, 680) == pytest.approx(2e-5)
    # The authors' COCO run (~141k steps) keeps the paper's 5,000 warm-up steps.
    assert _run(TrainConfig(), PAPER_RECIPE, 14_168).warmup_steps == 5000
    # The uncapped schedule of a config that predates the cap never leaves warm-up on that run.
    assert _peak_lr(TrainConfig(warmup_steps=5000), 680) < 0.2 * 2e-5


def test_flags_override_the_recipe_and_user_warmup_is_not_capped():
    hp = _run(TrainConfig(lr=1e-3, warmup_steps=500), preset_recipe("tiny"), 10)
    assert (hp.lr, hp.warmup_steps, hp.batch_size) == (1e-3, 500, RECIPES["tiny"].batch_size)
    assert _run(TrainConfig(warmup_fraction=0.1), preset_recipe("tiny"), 100).warmup_steps == 300
    assert preset_recipe("clipcap-mlp") == PAPER_RECIPE == preset_recipe("clipcap-transformer")
    assert preset_recipe("tiny").lr > 10 * PAPER_RECIPE.lr
    with pytest.raises(ValueError, match="warmup_fraction"):
        TrainConfig(warmup_fraction=1.5)


def _tiny_model():
    cfg = preset_config("tiny")
    tok = load_tokenizer(cfg.tokenizer_source)
    torch.manual_seed(0)
    return build_model(cfg, tok), tok, cfg


def _batch(tok, dim: int, nan_row: int | None = None) -> Batch:
    emb = torch.randn(4, dim)
    if nan_row is not None:
        emb[nan_row, 3] = float("nan")
    ids = tok("a small red circle", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tokens = torch.tensor([ids] * 4)
    return Batch(emb, tokens, torch.ones_like(tokens, dtype=torch.float32))


def test_a_nan_batch_stops_training_at_that_step_with_the_weights_untouched():
    model, tok, cfg = _tiny_model()
    good = _batch(tok, cfg.clip_dim)
    bad = _batch(tok, cfg.clip_dim, nan_row=2)
    hp = TrainConfig(lr=1e-3, warmup_steps=0, epochs=1)
    before = {}

    def batches(epoch):
        yield good
        yield good
        before.update({k: v.clone() for k, v in model.state_dict().items()})
        yield bad
        yield good

    with pytest.raises(NonFiniteError, match=r"step 3: non-finite .*rows \[2\] of the batch"):
        train_loop(model, batches, hp)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(bool(torch.isfinite(v).all()) for v in after.values())


def test_saving_refuses_nan_weights_and_loading_refuses_a_nan_file(tmp_path):
    model, tok, _ = _tiny_model()
    save_model(model, tok, str(tmp_path / "ok"), metrics={"val_loss": float("nan"), "bleu4": 0.5})
    # metrics.json and config.json are strict JSON: NaN is written as null
    strict = json.loads((tmp_path / "ok/metrics.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert strict == {"val_loss": None, "bleu4": 0.5}
    json.loads((tmp_path / "ok/config.json").read_text(), parse_constant=lambda c: 1 / 0)
    verify_weights(str(tmp_path / "ok"))

    with torch.no_grad():
        next(model.mapping.parameters()).view(-1)[5] = float("nan")
    with pytest.raises(ValueError, match="refusing to save a model with non-finite weights: \\['mapping"):
        save_model(model, tok, str(tmp_path / "nan"))
    assert not (tmp_path / "nan").exists()

    # A NaN written behind our back (another tool, a poisoned download) is refused on load, by file name.
    from safetensors.torch import load_file, save_file

    path = tmp_path / "ok" / "mapping.safetensors"
    state = load_file(str(path))
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("inf")
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"mapping\.safetensors is corrupt: non-finite .*{name}"):
        verify_weights(str(tmp_path / "ok"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_finite_check_reads_each_float_format(tmp_path, dtype):
    from safetensors.torch import save_file

    from clipcap_core.artifacts import _check_finite_tensors, _check_safetensors

    for value, finite in ((1.0, True), (float("nan"), False), (float("-inf"), False), (65504.0, True)):
        t = torch.zeros(7, dtype=dtype)
        t[3] = value
        save_file({"w": t, "i": torch.arange(3)}, str(tmp_path / "w.st"))
        with open(tmp_path / "w.st", "rb") as f:
            header = _check_safetensors(f, (tmp_path / "w.st").stat().st_size)
            if finite:
                _check_finite_tensors(f, header)
            else:
                with pytest.raises(ValueError, match="non-finite"):
                    _check_finite_tensors(f, header)


def test_strict_json_writes_non_finite_numbers_as_null():
    text = strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(2.5)})
    assert json.loads(text, parse_constant=lambda c: 1 / 0) == {"a": None, "b": [1.0, None], "c": 2.5}


def test_train_clip_caps_its_default_warmup_by_the_run_but_not_a_given_one():
    from clipcap_core.clip_training import ClipTrainConfig

    assert ClipTrainConfig().warmup_for(100_000) == 100 and ClipTrainConfig().warmup_for(400) == 20
    assert ClipTrainConfig(warmup_steps=300).warmup_for(400) == 300
    assert ClipTrainConfig(warmup_fraction=0.25).warmup_for(400) == 100


def test_a_nan_row_in_a_decap_memory_table_is_left_out(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipcap_core.decap import load_memory_table

    vectors = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    vectors[2, 1] = np.nan
    pq.write_table(pa.table({"key": list("abcde"), "text_embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.ravel()), 4)}), tmp_path / "part-0.parquet")
    memory = load_memory_table(str(tmp_path / "part-0.parquet"))
    assert np.isfinite(memory.state()[0]["memory"].numpy()).all() and memory.state()[0]["memory"].shape[0] == 4

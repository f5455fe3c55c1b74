"""The precision a component is asked for is the dtype its matmuls actually run in (comparing outputs alone would
not notice ``ClipEncoder`` or the training step ignoring bf16 / fp16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipcap_core.encoders import EncoderConfig, load_encoder
from clipcap_core.training import TrainConfig, collate, make_optimizer_and_scheduler, train_step
from tests.core.core_helpers import one_thread, sharp_model, synthetic_embeddings  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _linear_output_dtypes(module: torch.nn.Module) -> tuple[set[torch.dtype], list]:
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return seen, hooks


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_clip_encoder_runs_its_linears_in_the_requested_dtype(precision):
    enc = load_encoder(EncoderConfig(), precision=precision)
    seen, hooks = _linear_output_dtypes(enc.model)
    try:
        size = enc.spec.size if isinstance(enc.spec.size, int) else enc.spec.size[0]
        out = enc.encode_pixels(np.zeros((2, size, size, 3), np.uint8))
        enc.encode_text(["a red circle"])
    finally:
        for h in hooks:
            h.remove()
    assert seen == {DTYPES[precision]} and out.dtype == np.float32  # outputs stay float32 for the tables


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_step_autocasts_to_the_configured_precision(precision):
    model, tok = sharp_model("mlp")
    caps, x = synthetic_embeddings(8)
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, precision=precision)
    opt, sched = make_optimizer_and_scheduler(model, cfg)
    seen, hooks = _linear_output_dtypes(model.mapping)
    try:
        scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
        train_step(model, collate(tok, caps, x, 12), opt, sched, cfg, scaler)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {DTYPES[precision]}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32

"""Prefix interpretation (nearest vocabulary tokens) and the DeCap memory projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipcap_core.decap import DecapMemory
from clipcap_core.model import interpret_prefix, nearest_tokens
from tests.core.core_helpers import sharp_model


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_prefix_made_of_token_embeddings_reads_back_as_those_tokens(metric):
    model, tok = sharp_model("mlp")
    words = ["two", "small", "red", "circles"]
    ids = [tok.convert_tokens_to_ids(w) for w in words]
    wte = model.lm.get_input_embeddings().weight
    last = model.mapping.net.net[2]
    with torch.no_grad():  # make the MLP output exactly those embeddings, whatever the input
        last.weight.zero_()
        last.bias.copy_(wte[ids].flatten())
    assert interpret_prefix(model, tok, np.random.randn(2, 128).astype(np.float32), metric=metric) == [
        [[w] for w in words]] * 2
    top3 = nearest_tokens(model, np.random.randn(1, 128).astype(np.float32), top_k=3, metric=metric)
    assert top3.shape == (1, 4, 3) and top3[0, :, 0].tolist() == ids


def test_decap_projection_between_nearest_memory_and_mean():
    rng = np.random.default_rng(0)
    memory = rng.normal(size=(30, 16)).astype(np.float32)
    unit = memory / np.linalg.norm(memory, axis=1, keepdims=True)
    query = unit[[3, 17]] + 0.05 * rng.normal(size=(2, 16)).astype(np.float32)
    sharp = DecapMemory(memory, tau=1e-4).project(query)
    np.testing.assert_allclose(sharp, unit[[3, 17]], atol=1e-4)  # tau -> 0: the nearest caption embedding
    flat = DecapMemory(memory, tau=1e4).project(query)
    mean = unit.mean(0) / np.linalg.norm(unit.mean(0))
    np.testing.assert_allclose(flat, np.stack([mean, mean]), atol=1e-3)  # tau -> inf: the memory's mean
    mid = DecapMemory(memory).project(query)
    np.testing.assert_allclose(np.linalg.norm(mid, axis=1), 1.0, atol=1e-5)


def test_decap_from_texts_and_errors():
    class FakeEncoder:
        def encode_text(self, texts):
            return np.stack([np.eye(4, dtype=np.float32)[len(t) % 4] for t in texts])

    mem = DecapMemory.from_texts(FakeEncoder(), ["a", "bb", "ccc", "dddd", "e"], batch_size=2)
    assert mem.memory.shape == (5, 4)
    with pytest.raises(ValueError, match="D=3"):
        mem.project(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="tau"):
        DecapMemory(np.ones((2, 4)), tau=0)

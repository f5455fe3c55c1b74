"""Batched KV-cache decoding: equal to one-at-a-time, to no-cache, to HF beam search; scores are the mean
token log-prob; sampling is seeded; stopping rules. For MLP / transformer mappings, tuned / frozen LMs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipcap_core.configs import ConfigError
from clipcap_core.decoding import DecodeConfig, generate
from tests.core.core_helpers import one_thread, sharp_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = [("mlp", False), ("mlp", True), ("transformer", False), ("transformer", True)]
N, T = 24, 10


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{k}-{'frozen' if f else 'tuned'}" for k, f in VARIANTS])
def setup(request):
    kind, freeze = request.param
    model, tok = sharp_model(kind, freeze=freeze, seed=3)
    x = 3 * torch.randn(N, 128, generator=torch.Generator().manual_seed(5))
    return model, tok, x


def test_outputs_are_varied_enough_to_test_stopping(setup):
    model, tok, x = setup
    g = generate(model, x, tok, "greedy", max_length=T)
    lengths = {len(ids) for ids in g.token_ids}
    assert len(set(g.texts)) > N // 3 and len(lengths) > 1  # captions differ and some stop early


def test_batched_greedy_equals_one_at_a_time(setup):
    model, tok, x = setup
    batched = generate(model, x, tok, "greedy", max_length=T)
    single = [generate(model, x[i: i + 1], tok, "greedy", max_length=T) for i in range(N)]
    assert batched.token_ids == [s.token_ids[0] for s in single]
    np.testing.assert_allclose(batched.scores, [s.scores[0] for s in single], atol=1e-5)


@pytest.mark.parametrize("strategy,opts", [("greedy", {}), ("beam", {"n": 2}), ("reference-beam", {"n": 2}),
                                           ("sample", {"n": 3, "top_p": 0.9, "seed": 1})])
def test_kv_cache_equals_no_cache(setup, strategy, opts):
    model, tok, x = setup
    static = generate(model, x, tok, strategy, max_length=T, stop_token=".", **opts)
    dynamic = generate(model, x, tok, strategy, max_length=T, stop_token=".", static_cache=False, **opts)
    none = generate(model, x, tok, strategy, max_length=T, stop_token=".", use_cache=False, **opts)
    assert static.token_ids == dynamic.token_ids == none.token_ids
    np.testing.assert_allclose(static.scores, none.scores, atol=1e-5)


def test_beam_of_one_equals_greedy(setup):
    model, tok, x = setup
    greedy = generate(model, x, tok, "greedy", max_length=T, stop_token=".")
    assert generate(model, x, tok, "beam", beam_size=1, max_length=T, stop_token=".").token_ids == greedy.token_ids
    assert generate(model, x, tok, "reference-beam", beam_size=1, max_length=T,
                    stop_token=".").token_ids == greedy.token_ids


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_equals_hugging_face_beam_search(setup, length_penalty):
    model, tok, x = setup
    ours = generate(model, x, tok, "beam", beam_size=4, max_length=T, length_penalty=length_penalty, n=2)
    with torch.inference_mode():
        prefix = model.prefix(x)
        hf = model.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                               num_beams=4, num_return_sequences=2, max_new_tokens=T, do_sample=False,
                               length_penalty=length_penalty, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.eos_token_id)
    eos = tok.eos_token_id
    hf_ids = [[i for i in row if i != eos] for row in hf.tolist()]
    assert ours.token_ids == hf_ids


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_scores_are_mean_token_log_probs(setup, strategy):
    model, tok, x = setup
    gen = generate(model, x, tok, strategy, max_length=T, n=2 if strategy != "greedy" else 1)
    eos = tok.eos_token_id
    for i, (ids, score) in enumerate(zip(gen.token_ids, gen.scores, strict=True)):
        full = ids + [eos] if len(ids) < T else ids  # the end-of-text the model emitted counts
        tokens = torch.tensor([full])
        with torch.no_grad():
            logp = model(x[i // gen.n][None], tokens).logits.log_softmax(-1)
        expected = logp[0, torch.arange(len(full)), tokens[0]].mean().item()
        assert score == pytest.approx(expected, abs=1e-4)


def test_sampling_is_seeded_and_top_k_1_is_greedy(setup):
    model, tok, x = setup
    a = generate(model, x, tok, "sample", max_length=T, n=2, seed=7)
    b = generate(model, x, tok, "sample", max_length=T, n=2, seed=7)
    c = generate(model, x, tok, "sample", max_length=T, n=2, seed=8)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert len(a.texts) == 2 * N and len(a.grouped()) == N
    greedy = generate(model, x, tok, "greedy", max_length=T).token_ids
    assert generate(model, x, tok, "sample", max_length=T, top_k=1, seed=3).token_ids == greedy
    assert generate(model, x, tok, "sample", max_length=T, top_p=1e-6, seed=3).token_ids == greedy


def test_stop_token_ends_captions_and_stays_in_the_text(setup):
    model, tok, x = setup
    dot = tok.encode(".", add_special_tokens=False)[0]
    free = generate(model, x, tok, "greedy", max_length=T, stop_at_eos=False)
    stopped = generate(model, x, tok, "greedy", max_length=T, stop_token=".", stop_at_eos=False)
    assert any(dot in ids[:-1] for ids in free.token_ids)  # '.' occurs mid-caption without the rule
    for f, s, text in zip(free.token_ids, stopped.token_ids, stopped.texts, strict=True):
        cut = f.index(dot) + 1 if dot in f else len(f)
        assert s == f[:cut]
        assert text.endswith(".") == (dot in s)
    assert all(len(ids) <= T for ids in free.token_ids)


def test_bf16_decoding_runs():
    model, tok = sharp_model("transformer", freeze=True)
    model = model.to(torch.bfloat16)
    gen = generate(model, torch.randn(4, 128), tok, "beam", max_length=6)
    assert len(gen.texts) == 4 and np.isfinite(gen.scores).all()


def test_decode_config_validation():
    with pytest.raises(ConfigError, match="unknown config key"):
        generate(None, np.zeros((1, 2)), None, "greedy", beams=3)
    with pytest.raises(ConfigError, match="strategy"):
        generate(None, np.zeros((1, 2)), None, "topk")
    with pytest.raises(ValueError, match="greedy"):
        DecodeConfig(strategy="greedy", n=2)
    with pytest.raises(ValueError, match="beam_size"):
        DecodeConfig(strategy="beam", n=6, beam_size=5)

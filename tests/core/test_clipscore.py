"""CLIPScore / RefCLIPScore against a hand computation with a real (tiny) open_clip model; CLIP reranking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clipcap_core.encoders import EncoderConfig, load_encoder
from clipcap_core.metrics import ClipScorer, clip_score, ref_clip_score, ref_similarity, rerank


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(EncoderConfig(model_name="tiny"))


def _cos(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_clip_score_and_ref_clip_score_equal_a_hand_computation(encoder):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, encoder.dim)).astype(np.float32) * 5  # unnormalised, like our tables
    captions = ["one red circle at the top", "two small blue squares", ""]
    refs = [["one red circle at the top", "a red circle"], ["three green triangles"], ["x", "y", "z"]]
    got = ClipScorer(encoder, batch_size=2).score(images, captions, refs)  # batches of 2: batching must not matter
    text = encoder.encode_text(captions)
    for i in range(3):
        cs = 2.5 * max(_cos(images[i], text[i]), 0.0)
        ref_emb = encoder.encode_text(refs[i])
        rs = max(max(_cos(text[i], r) for r in ref_emb), 0.0)
        assert got.clip_score[i] == pytest.approx(cs, abs=1e-5)
        assert got.ref_similarity[i] == pytest.approx(rs, abs=1e-5)
        assert got.ref_clip_score[i] == pytest.approx(2 * cs * rs / (cs + rs) if cs + rs else 0.0, abs=1e-5)
    assert got.ref_similarity[0] == pytest.approx(1.0, abs=1e-5)  # the caption is its own reference


def test_negative_cosines_clip_to_zero_and_harmonic_mean_handles_zero():
    img = np.array([[1.0, 0.0], [1.0, 0.0]])
    txt = np.array([[-1.0, 0.1], [3.0, 4.0]])
    assert clip_score(img, txt).tolist() == pytest.approx([0.0, 2.5 * 0.6])
    sims = ref_similarity(txt, [np.array([[1.0, 0.0]]), np.zeros((0, 2))])
    assert sims.tolist() == pytest.approx([0.0, 0.0])  # negative -> 0; no references -> 0
    assert ref_clip_score(np.array([0.0, 1.5, 1.0]), np.array([0.0, 0.5, 1.0])).tolist() == pytest.approx(
        [0.0, 2 * 1.5 * 0.5 / 2.0, 1.0])
    with pytest.raises(ValueError, match="2 captions but 1 reference sets"):
        ref_similarity(txt, [np.zeros((1, 2))])


def test_rerank_orders_candidates_by_similarity_and_keeps_decoder_order_on_ties():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    cands = np.array([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0],     # image 0: best is candidate 2, then 1, then 0
                      [1.0, 1.0], [2.0, 2.0], [0.0, 1.0]])    # image 1: 2 first; 0 and 1 tie (keep 0 before 1)
    order, cos = rerank(img, cands, 3)
    assert order.tolist() == [[2, 1, 0], [2, 0, 1]]
    assert cos.shape == (2, 3) and cos[0, 2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="5 candidates for 2 images x 3"):
        rerank(img, cands[:5], 3)


def test_scorer_refuses_embeddings_of_another_clip(encoder):
    with pytest.raises(ValueError, match=f"has D={encoder.dim}"):
        ClipScorer(encoder).score(np.zeros((1, encoder.dim + 1)), ["a"])


def test_heldout_metrics_add_clip_score_with_the_models_clip(encoder):
    """Training / nightly held-out numbers: the CLIP of the model's config scores the captions; a CLIP that
    cannot load or gives another D leaves CLIPScore out instead of failing the run."""
    from clipcap_core.metrics import heldout_metrics, scorer_for

    caps = ["one red circle at the top", "two small blue squares on the left"]
    scorer = scorer_for(EncoderConfig(model_name="tiny"), encoder.dim)
    assert scorer is not None and scorer_for(EncoderConfig(model_name="tiny"), encoder.dim) is scorer  # cached
    same = heldout_metrics(caps, caps, image_emb=encoder.encode_text(caps), scorer=scorer)
    assert same["clip_score"] == pytest.approx(2.5, abs=1e-5) and same["exact_match"] == 1.0  # cos = 1
    swapped = heldout_metrics(caps, caps, image_emb=encoder.encode_text(caps[::-1]), scorer=scorer)
    assert swapped["clip_score"] < same["clip_score"] and set(swapped) == {"exact_match", "bleu4", "cider",
                                                                           "clip_score", "n"}
    assert scorer_for(EncoderConfig(model_name="tiny"), encoder.dim + 1) is None
    assert scorer_for(EncoderConfig(model_name="no-such-clip"), encoder.dim) is None
    assert "clip_score" not in heldout_metrics(caps, caps)

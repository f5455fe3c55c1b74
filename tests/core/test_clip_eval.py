"""clip_eval: retrieval recall judged by caption text, zero-shot accuracy, prompt ensembling, the modality gap."""

from __future__ import annotations

import numpy as np
import pytest

from clipcap_core.clip_eval import class_embeddings, l2n, modality_gap, retrieval, zero_shot


def _onehot(ids: list[int], d: int = 8) -> np.ndarray:
    x = np.zeros((len(ids), d), np.float32)
    x[np.arange(len(ids)), ids] = 1.0
    return x


def test_retrieval_perfect_and_shuffled():
    caps = ["a", "b", "c", "d"]
    txt = _onehot([0, 1, 2, 3])
    perfect = retrieval(txt * 3.0, txt, caps)  # scale does not matter (normalised)
    assert perfect["i2t_r1"] == perfect["t2i_r1"] == 1.0
    swapped = retrieval(_onehot([1, 0, 2, 3]), txt, caps)  # images 0 and 1 look like each other's caption
    assert swapped["i2t_r1"] == pytest.approx(0.5) and swapped["t2i_r1"] == pytest.approx(0.5)
    assert swapped["i2t_r5"] == 1.0  # only 4 captions: every one is in the top 5


def test_retrieval_counts_duplicate_captions_once():
    caps = ["red", "red", "blue"]
    txt = _onehot([0, 0, 1])
    img = _onehot([0, 0, 1])
    out = retrieval(img, txt, caps)
    assert out["distinct_captions"] == 2.0
    assert out["i2t_r1"] == 1.0 and out["t2i_r1"] == 1.0  # "red" retrieving either red image is a hit


def test_retrieval_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="paired rows"):
        retrieval(_onehot([0, 1]), _onehot([0]), ["a", "b"])


def test_zero_shot_top1_top5():
    classes = _onehot([0, 1, 2])
    img = _onehot([0, 1, 1])
    out = zero_shot(img, [0, 1, 2], classes)
    assert out["top1"] == pytest.approx(2 / 3) and out["top5"] == 1.0
    assert out["predictions"] == [0, 1, 1]


def test_prompt_ensemble_is_mean_of_normalised_prompts():
    rng = np.random.default_rng(0)
    table = {}

    def encode(texts: list[str]) -> np.ndarray:
        return np.stack([table.setdefault(t, rng.normal(size=4).astype(np.float32)) for t in texts])

    w = class_embeddings(encode, ["cat", "dog"], ["a {}", "the {}"])
    want = l2n(l2n(encode(["a cat"]))[0] + l2n(encode(["the cat"]))[0])
    np.testing.assert_allclose(w[0], want, rtol=1e-5)
    with pytest.raises(ValueError, match="'\\{\\}'"):
        class_embeddings(encode, ["cat"], ["no placeholder"])


def _gapped_pairs(n: int, d: int, a: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image_i = a e0 + b u_i, text_i = -a e0 + b u_i (u_i unit, orthogonal to e0, a^2 + b^2 = 1): a known gap."""
    u = np.random.default_rng(seed).standard_normal((n, d))
    u[:, 0] = 0.0
    u = l2n(u)
    e0 = np.eye(d, dtype=np.float32)[0]
    b = np.sqrt(1 - a * a)
    return a * e0 + b * u, -a * e0 + b * u, u


def test_modality_gap_of_constructed_pairs_is_known():
    a = 0.6
    img, txt, u = _gapped_pairs(500, 16, a)
    g = modality_gap(img, txt)
    assert g["paired_cosine"] == pytest.approx(1 - 2 * a * a, abs=1e-5)  # -a^2 + b^2
    assert g["centroid_distance"] == pytest.approx(2 * a, abs=1e-5)  # the centroids are +-a e0
    ubar = u.mean(axis=0)
    share = a * a / (a * a + (1 - a * a) * (1 - ubar @ ubar))  # along e0 / total, pooled and centred
    assert g["gap_variance_share"] == pytest.approx(share, abs=1e-4)
    off = (u @ u.T)[~np.eye(len(u), dtype=bool)].mean()
    assert g["image_cone"] == pytest.approx(a * a + (1 - a * a) * off, abs=1e-4)


def test_modality_gap_is_zero_for_identical_embeddings_and_scale_free():
    img, _, _ = _gapped_pairs(200, 8, 0.0, seed=1)
    g = modality_gap(img * 5.0, img)
    assert g["paired_cosine"] == pytest.approx(1.0) and g["centroid_distance"] == pytest.approx(0.0, abs=1e-6)
    assert g["gap_variance_share"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="paired rows"):
        modality_gap(img[:3], img[:2])

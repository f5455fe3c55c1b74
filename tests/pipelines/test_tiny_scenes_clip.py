"""The shipped ``scenes`` CLIPs: ``--model tiny-scenes`` / ``tiny-scenes-gapped`` load them, ``tiny-scenes`` is
well above chance but not saturated on unseen scenes and on held-out combinations, and ``tiny-scenes-gapped`` has a
modality gap near a real CLIP's (paired cosine ~0.3, centroid distance ~0.8) where ``tiny`` has none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipcap_core import scenes
from clipcap_core.clip_eval import modality_gap
from clipcap_core.encoders import EncoderConfig, load_encoder, shipped_weights
from pipelines.clip.evaluate import encode_texts
from pipelines.clip.tiny_scenes import RESOURCES, zero_shot_scenes

NAMES = ("tiny-scenes", "tiny-scenes-gapped")


@pytest.mark.parametrize("name", NAMES)
def test_shipped_scenes_clip_loads_and_is_small(name):
    path = shipped_weights(name)
    assert path is not None and path.endswith(f"{name}.safetensors")
    assert (RESOURCES / f"{name}.safetensors").stat().st_size <= 20 << 20
    shipped = load_file(path)
    assert all(v.dtype == torch.float16 for v in shipped.values() if v.is_floating_point())
    state = load_encoder(EncoderConfig(model_name=name)).model.state_dict()
    assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in shipped.items())
    assert f"{name}.safetensors" in (RESOURCES / f"{name}.md").read_text()


def test_tiny_scenes_is_far_above_chance_and_not_saturated():
    enc = load_encoder(EncoderConfig(model_name="tiny-scenes"))
    shape = []
    for split in ("test", "novel"):
        f = zero_shot_scenes(enc, split, n=300, seed=4242)  # a seed neither training nor the card used
        assert 0.1 < f["top1"] < 0.95, (split, f)  # chance is 1/300
        assert f["hard_color"] > 0.5 and f["hard_all"] < 0.95, (split, f)
        shape.append(f["hard_shape"])
    # shape is learned from the hard-negative twins (a CLIP trained on random batches stays at chance, 1/9)
    assert np.mean(shape) > 0.13, shape
    card = json.loads((RESOURCES / "tiny-scenes.eval.json").read_text())
    assert card["test"]["top1"] > card["novel"]["top1"] * 0.5 and card["test"]["images"] == 1000


def _gap(name: str, n: int = 300) -> dict[str, float]:
    enc = load_encoder(EncoderConfig(model_name=name))
    samples = list(scenes.generate(n, seed=4242, split="test"))
    img = enc.encode_pixels(np.stack([enc.resize(s.image) for s in samples]))
    return modality_gap(img, encode_texts(enc, [s.caption for s in samples]))


def test_gapped_clip_has_a_modality_gap_near_a_real_clips():
    """Real CLIPs: paired cosine ~0.3, centroid distance ~0.8; ``tiny`` / ``tiny-scenes``: above 0.9 and below 0.1."""
    gapped, plain = _gap("tiny-scenes-gapped"), _gap("tiny-scenes")
    assert 0.2 < gapped["paired_cosine"] < 0.65, gapped
    assert 0.6 < gapped["centroid_distance"] < 1.1, gapped
    assert gapped["gap_variance_share"] > 0.15, gapped
    assert plain["paired_cosine"] > 0.9 and plain["centroid_distance"] < 0.1, plain
    card = json.loads((RESOURCES / "tiny-scenes-gapped.eval.json").read_text())
    assert 0.2 < card["test"]["paired_cosine"] < 0.65 and 0.6 < card["test"]["centroid_distance"] < 1.1
    assert card["test"]["top1"] > 0.1  # still a working CLIP (chance 1/1000)


def test_eval_clip_prints_the_gap_for_every_model(tmp_path, capsys):
    from pipelines.cli import main

    scenes.write_webdataset(tmp_path / "shards", 120, seed=31, split="test")
    for name in ("tiny", "tiny-scenes-gapped"):
        out = tmp_path / f"{name}.json"
        assert main(["eval-clip", "--clip", name, "--shards", str(tmp_path / "shards"), "--output", str(out)]) == 0
        gap = json.loads(out.read_text())["gap"]
        assert set(gap) >= {"paired_cosine", "centroid_distance", "gap_variance_share"}
    printed = capsys.readouterr().out
    assert "gap/paired_cosine" in printed and "gap/centroid_distance" in printed

"""The shipped aligned tiny CLIP: `--model tiny` loads it, and on synthetic images of a seed it never saw it
retrieves the right caption among all 432 (the figures the model card records)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipcap_core import synthetic
from clipcap_core.encoders import EncoderConfig, load_encoder, shipped_weights
from pipelines.clip.tiny import RESOURCES, zero_shot_synthetic


@pytest.fixture(scope="module")
def tiny():
    return load_encoder(EncoderConfig(model_name="tiny"))


def test_tiny_loads_the_shipped_weights_and_tiny_random_does_not(tiny):
    path = shipped_weights("tiny")
    assert path is not None and path.endswith("tiny.safetensors")
    shipped = load_file(path)
    state = tiny.model.state_dict()
    assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in shipped.items())
    assert shipped_weights("tiny-random") is None
    rnd = load_encoder(EncoderConfig(model_name="tiny-random"))
    assert rnd.dim == tiny.dim == 128
    assert (RESOURCES / "tiny.safetensors").stat().st_size <= 20 << 20  # ships as package data


def test_shipped_tiny_clip_zero_shot_on_unseen_images(tiny):
    figures = zero_shot_synthetic(tiny, n=400, seed=4242)  # a seed neither training nor the card used
    assert figures["top1_exact"] >= 0.95, figures
    assert all(figures[f"attr_{a}"] >= 0.97 for a in ("count", "size", "color", "shape", "position")), figures
    random_enc = load_encoder(EncoderConfig(model_name="tiny-random"))
    assert zero_shot_synthetic(random_enc, n=200, seed=4242)["top1_exact"] < 0.05  # it is the training, not luck
    card = json.loads((RESOURCES / "tiny.eval.json").read_text())
    assert card["top1_exact"] >= 0.95 and "tiny.safetensors" in (RESOURCES / "tiny.md").read_text()


def test_eval_clip_cli_on_shards(tmp_path, capsys):
    from pipelines.cli import main

    synthetic.write_webdataset(tmp_path / "shards", 150, seed=31, shard_size=75)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(synthetic.all_captions()) + "\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("{}\na picture of {}\n")
    out = tmp_path / "eval.json"
    assert main(["eval-clip", "--clip", "tiny", "--shards", str(tmp_path / "shards"), "--classes", str(classes),
                 "--templates", str(templates), "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["retrieval"]["n"] == 150 and "retrieval/i2t_r1" in capsys.readouterr().out
    assert report["retrieval"]["i2t_r1"] > 0.8 and report["zero_shot"]["top1"] > 0.8
    assert report["zero_shot"]["unlabelled_images"] == 0 and report["zero_shot"]["attr_color"] > 0.9
    assert main(["eval-clip", "--clip", "tiny-random", "--shards", str(tmp_path / "shards"),
                 "--output", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["retrieval"]["i2t_r1"] < 0.2
    assert np.isfinite(report["seconds"])


def _sentences_calling_tiny_random(text: str) -> list[str]:
    """Sentences that name the `tiny` CLIP (not `tiny-random`) and call its weights random."""
    found = []
    for sentence in re.split(r"(?<=[.:;])\s+|\n\s*\n", text):
        flat = " ".join(sentence.split())
        names_tiny = re.search(r"`tiny`|``tiny``|\btiny (CLIP|preset)\b|\bthe tiny preset\b", flat)
        if names_tiny and "tiny-random" not in flat and re.search(r"random[- ]weights?\b", flat):
            found.append(flat)
    return found


def test_docs_describe_tiny_as_the_trained_clip_not_a_random_one():
    """`tiny` is a small trained, aligned CLIP shipped as package data; only `tiny-random` has random weights."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = [root / "README.md", root / "ARCHITECTURE.md", *sorted((root / "jobs").glob("*.py")),
             *sorted((root / "clipcap_core").glob("*.py")), *sorted((root / "pipelines").rglob("*.py"))]
    wrong = [(str(f.relative_to(root)), s) for f in files for s in _sentences_calling_tiny_random(f.read_text())]
    assert wrong == []

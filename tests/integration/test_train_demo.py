"""The training step of `clipcap demo`: tiny preset on the embedded set with Ray Train, held-out accuracy."""

from __future__ import annotations

import pytest

from clipcap_core.artifacts import read_metadata
from pipelines.demo import run as demo
from pipelines.demo import synthetic_tables

pytestmark = pytest.mark.integration


@pytest.mark.slow  # `make test-slow`: out of `make test`, which must stay well under 20 min on 2 cores
def test_demo_train_step_hands_a_model_on_and_reports_heldout_accuracy(ray_cluster, tmp_path):
    assert demo.STEPS.index(demo.step_train) == demo.STEPS.index(demo.step_embed) + 1  # after embedding
    assert demo.STEPS.index(demo.step_caption) > demo.STEPS.index(demo.step_train)  # captions with the model it trained
    root = str(tmp_path)
    synthetic_tables.write_synthetic_tables(root, 300, dim=128, dataset="synthetic", tag="tiny")  # D of the tiny CLIP it names
    result = demo.DemoResult(root=root, embeddings_uri=str(tmp_path / "embeddings/synthetic/tiny"))
    demo.step_train(demo.DemoConfig(root=root), result)

    meta = read_metadata(result.paths["model"])
    assert meta["model"]["clip_dim"] == 128 and meta["training"]["epochs"] == 30
    summary = result.summaries["train"]
    acc, chance = summary["accuracy"], summary["chance"]
    assert summary["heldout_rows"] + summary["train_rows"] == 300 and 35 < summary["heldout_rows"] < 85
    # These embeddings carry every attribute: the model must beat chance by far on each, and on whole captions.
    assert acc["exact"] > 0.5 > 100 * chance["exact"]
    assert all(acc[k] > chance[k] + 0.3 for k in ("count", "size", "color", "shape", "position"))
    text = "\n".join(result.lines)
    assert "held-out accuracy" in text and "exact caption" in text and "chance" in text

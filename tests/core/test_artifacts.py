"""Model artifacts: save -> load through a local path and the local S3 server gives identical outputs; the
layout and config.json; a frozen pretrained LM is referenced, never re-saved; clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import clipcap_core
from clipcap_core.artifacts import LM, SCHEMA_VERSION, load_model, read_config, save_model
from clipcap_core.configs import replace
from clipcap_core.decap import DecapMemory
from clipcap_core.decoding import generate
from clipcap_core.model import ClipCapModel
from clipcap_core.presets import preset_config
from clipcap_core.uris import upload_dir
from tests.core.core_helpers import one_thread, sharp_model, synthetic_embeddings, trained_tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_outputs(a: ClipCapModel, b: ClipCapModel, tok_a, tok_b) -> None:
    _, x = synthetic_embeddings(16, start=9000)
    tokens = torch.randint(0, len(tok_a), (16, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(torch.from_numpy(x), tokens).logits, b(torch.from_numpy(x), tokens).logits)
    for strategy in ("greedy", "beam"):
        ga, gb = generate(a, x, tok_a, strategy, max_length=10), generate(b, x, tok_b, strategy, max_length=10)
        assert ga.texts == gb.texts and ga.token_ids == gb.token_ids
        np.testing.assert_array_equal(ga.scores, gb.scores)


def test_model_card_names_the_clip_weights_the_recipe_and_missing_metrics(tmp_path):
    """A card a reader can trust: `tiny` is the shipped trained CLIP (not "tiny / None"), an empty metrics file
    is said to be empty, and the training recipe of config.json's ``training.train`` is listed."""
    loaded = load_model("tiny")
    save_model(loaded.model, loaded.tokenizer, str(tmp_path / "m"),
               extra={"training": {"train": {"lr": 0.003, "batch_size": 16}}})
    card = (tmp_path / "m" / "README.md").read_text()
    assert "- CLIP encoder: tiny, trained weights shipped with clipcap_core (resources/tiny.safetensors)" in card
    assert "## Metrics\n\n- none recorded (no held-out evaluation ran)" in card
    assert "## Training recipe\n\n- batch_size: 16\n- lr: 0.003\n" in card


def test_local_round_trip_and_layout(tmp_path):
    model, tok = trained_tiny()
    out = tmp_path / "model"
    save_model(model, tok, str(out), metrics={"exact_match": 0.97}, extra={"train": {"epochs": 6}})
    assert {p.name for p in out.iterdir()} == {"config.json", "mapping.safetensors", "lm.safetensors",
                                               "tokenizer", "metrics.json", "README.md"}
    meta = json.loads((out / "config.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION and meta["code_version"] == clipcap_core.__version__
    assert meta["model"]["mapping"]["prefix_length"] == model.config.mapping.prefix_length
    assert meta["model"]["clip_dim"] == 128 and meta["train"] == {"epochs": 6}
    assert json.loads((out / "metrics.json").read_text()) == {"exact_match": 0.97}
    assert "exact_match: 0.97" in (out / "README.md").read_text()
    loaded = load_model(str(out))
    assert loaded.config == model.config and read_config(str(out)) == model.config
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()
    _same_outputs(model, loaded.model, tok, loaded.tokenizer)


def test_s3_round_trip(s3_uri):
    model, tok = trained_tiny()
    save_model(model, tok, s3_uri, metrics={"bleu4": 0.5})
    loaded = load_model(s3_uri)
    assert loaded.metadata["weights"]["lm"] == LM
    _same_outputs(model, loaded.model, tok, loaded.tokenizer)


@pytest.mark.parametrize("where", ["local", "object-store"])
def test_frozen_pretrained_lm_is_referenced_not_saved(tmp_path, where):
    model, tok = sharp_model("transformer", freeze=True)
    base = tmp_path / "base-lm"
    model.lm.save_pretrained(base)  # a pretrained LM (stands in for a hub id)
    if where == "object-store":
        base = f"memory://lms/{tmp_path.name}"
        upload_dir(tmp_path / "base-lm", base)
    cfg = replace(model.config, lm={"name_or_path": str(base), "freeze": True})
    frozen = ClipCapModel(cfg, model.lm)
    frozen.mapping.load_state_dict(model.mapping.state_dict())
    save_model(frozen, tok, str(tmp_path / "art"))
    assert not (tmp_path / "art" / LM).exists()
    assert json.loads((tmp_path / "art" / "config.json").read_text())["weights"]["lm"] is None
    loaded = load_model(str(tmp_path / "art"))
    _same_outputs(frozen, loaded.model, tok, loaded.tokenizer)


def test_tuned_and_tiny_lms_are_saved(tmp_path):
    for kind, freeze in (("mlp", False), ("transformer", True)):  # tiny LMs are on no hub: always saved
        model, tok = sharp_model(kind, freeze=freeze)
        save_model(model, tok, str(tmp_path / kind))
        assert (tmp_path / kind / LM).exists()


def test_decap_memory_and_precision(tmp_path):
    model, tok = trained_tiny()
    _, memory = synthetic_embeddings(50, start=20000)
    save_model(model, tok, str(tmp_path / "decap"), decap=DecapMemory(memory, tau=0.05))
    loaded = load_model(str(tmp_path / "decap"), precision="bf16")
    assert loaded.decap is not None and loaded.decap.tau == 0.05
    torch.testing.assert_close(loaded.decap.memory, DecapMemory(memory).memory)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_presets_and_errors(tmp_path):
    tiny = load_model("tiny")
    assert tiny.config == preset_config("tiny") and tiny.metadata == {"preset": "tiny"}
    with pytest.raises(FileNotFoundError, match="no model artifact"):
        load_model(str(tmp_path / "missing"))
    model, tok = sharp_model("mlp")
    save_model(model, tok, str(tmp_path / "old"))
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema version 99"):
        load_model(str(tmp_path / "old"))
    with pytest.raises(ValueError, match="precision"):
        load_model("tiny", precision="int8")

"""``clipcap demo --world``: what the scenes world hands each demo step (CLIP, tokenizer, held-out samples,
references, accuracy), without running the demo (``tests/integration/test_demo.py`` runs the default one)."""

from __future__ import annotations

import pytest

from clipcap_core import scenes
from clipcap_core.tokenizer import load_tokenizer
from pipelines.demo.worlds import scenes_accuracy, world
from pipelines.embed.download_embed import default_job_config


def test_scenes_world_gives_its_clip_tokenizer_and_every_reference(tmp_path):
    w = world("scenes")
    held = w.heldout(6, 0, 2048)
    assert [s.key[:5] for s in held] == ["scnte"] * 3 + ["scnno"] * 3  # unseen scenes, then held-out combinations
    assert all(len(w.references(s)) == 6 and w.references(s)[0] == s.caption for s in held)
    tok = load_tokenizer(w.tokenizer)
    ids = [i for s in held for r in w.references(s) for i in tok(r)["input_ids"]]
    assert tok.unk_token_id not in ids and max(len(tok(r)["input_ids"]) for s in held for r in w.references(s)) < 24
    job = default_job_config(tmp_path, samples=8, world="scenes")
    assert job.embed.encoder.model_name == "tiny-scenes" and job.embed.dataset == "scenes"
    assert job.synthetic is not None and job.synthetic.world == "scenes"
    assert default_job_config(tmp_path).embed.encoder.model_name == "tiny"  # the default world is unchanged
    with pytest.raises(ValueError, match="unknown world"):
        world("mars")


def test_scenes_accuracy_takes_any_wording_of_the_same_scene():
    truth = "two small red circles left of a large blue square"
    said = ["a large blue square to the right of two small red circles",  # same scene, other words and order
            "two small red circles above a large blue square",  # relation wrong
            "two small red squares left of a large blue square",  # one shape wrong
            "a red thing"]  # does not parse
    scores = scenes_accuracy(said, [truth] * 4)
    acc, chance = scores["accuracy"], scores["chance"]
    assert acc["exact"] == pytest.approx(0.25) and acc["relation"] == pytest.approx(0.5)
    assert acc["shape"] == pytest.approx(0.5) and acc["color"] == pytest.approx(0.75)
    assert chance["relation"] == 0.5 and chance["exact"] < 1e-4


def test_decap_corpus_of_scenes_is_training_text_in_every_wording():
    """The text-only corpus ``clipcap demo --decap --world scenes`` trains on: parseable scenes captions in the
    scenes vocabulary, in several wordings, and never a held-out colour-shape combination (a corpus drawn from
    the wrong world or split, or always in one wording, fails here)."""
    corpus = world("scenes").corpus(300, 0)
    assert corpus == world("scenes").corpus(300, 0) and len(set(corpus)) > 290  # seeded, not one caption
    parsed = [scenes.parse_caption(c) for c in corpus]
    assert all(parsed)
    held = scenes.heldout_combos()
    assert not any((g.color, g.shape) in held for p in parsed for g in (p.first, p.second))
    assert sum(c == scenes.caption_for(p) for c, p in zip(corpus, parsed, strict=True)) < 0.5 * len(corpus)
    tok = load_tokenizer(world("scenes").tokenizer)
    assert tok.unk_token_id not in [i for c in corpus for i in tok(c)["input_ids"]]
    assert all(scenes.parse_caption(c) is None for c in world("synthetic").corpus(20, 0))


def test_heldout_samples_of_synthetic_world_are_the_old_ones():
    from clipcap_core import synthetic

    w = world("synthetic")
    assert [s.key for s in w.heldout(3, 0, 100)] == [s.key for s in synthetic.generate(3, seed=0, start=100)]
    assert w.references(w.heldout(1, 0, 0)[0]) == [next(synthetic.generate(1)).caption]
    assert scenes.parse_caption(w.heldout(1, 0, 0)[0].caption) is None

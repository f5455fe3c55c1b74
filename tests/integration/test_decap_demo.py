"""The DeCap step of ``clipcap demo --decap``: text-only training on a caption corpus, captioning images."""

from __future__ import annotations

import pytest

from clipcap_core import synthetic
from clipcap_core.artifacts import load_model
from clipcap_core.encoders import EncoderConfig
from pipelines.demo.run import ARCHIVE, demo_decap, read_captions

pytestmark = pytest.mark.integration


@pytest.mark.slow  # ~3 min on 2 cores (embed-text, Ray Train, two caption jobs): `make test-slow`
def test_text_only_model_captions_heldout_images_through_its_memory(ray_cluster, tmp_path):
    samples = list(synthetic.generate(32, seed=0, size=64, start=500_000))
    lines: list[str] = []
    report = demo_decap(str(tmp_path), samples, encoder=EncoderConfig(), corpus_size=1500, epochs=10,
                        echo=lines.append)
    corpus = (tmp_path / "decap-corpus" / "captions.txt").read_text().splitlines()
    assert len(corpus) == 1500 and not {s.caption for s in samples} - set(synthetic.all_captions())
    # the memory is the training captions' text embeddings, shipped in the artifact
    loaded = load_model(report["artifact"])
    assert loaded.decap is not None and 1200 <= len(loaded.decap) <= 1500
    # The bar: the projection's exact match >= 0.8 x the CLIP's own zero-shot top-1 on the same images.
    # A captioner fed the wrong embedding (raw instead of projected, another image's) or captions landing on the
    # wrong image would fall far below it.
    assert report["zero_shot_top1"] >= 0.8
    assert report["exact_match"] >= 0.8 * report["zero_shot_top1"], report
    # exact_match compares each image's rank-0 caption with that image's own true caption (caption_heldout)
    rows = read_captions(report["captions"]).to_pylist()
    assert sorted(r["key"] for r in rows if r["rank"] == 0) == sorted(f"{ARCHIVE}/{s.key}.png" for s in samples)
    assert any("zero-shot top-1" in line and "memory projection" in line for line in lines)


@pytest.mark.slow  # ~3 min on 2 cores: `make test-slow`
def test_text_only_model_on_scenes_speaks_the_scenes_world(ray_cluster, tmp_path):
    """``clipcap demo --decap --world scenes``'s step: a scenes corpus -> embed-text (tiny-scenes) -> train
    --decoder decap -> bulk captions of scenes images. Catches a decoder trained with the synthetic vocabulary
    (scenes words become <unk>, captions do not parse) or on the synthetic corpus."""
    from clipcap_core import scenes
    from pipelines.demo.worlds import world

    samples = world("scenes").heldout(16, 0, 100_000)
    report = demo_decap(str(tmp_path), samples, encoder=EncoderConfig(model_name="tiny-scenes"), corpus_size=1500,
                        epochs=4, world="scenes")
    loaded = load_model(report["artifact"])
    assert loaded.config.tokenizer == "word-scenes" and loaded.decap is not None
    corpus = (tmp_path / "decap-corpus" / "captions.txt").read_text().splitlines()
    assert len(corpus) == 1500 and all(scenes.parse_caption(c) for c in corpus)
    rows = [r for r in read_captions(report["captions"]).to_pylist() if r["rank"] == 0]
    assert sorted(r["key"] for r in rows) == sorted(f"{ARCHIVE}/{s.key}.png" for s in samples)
    # projected onto a memory of scenes captions, nearly every caption is a well-formed scenes caption
    assert sum(scenes.parse_caption(r["caption"]) is not None for r in rows) >= 0.75 * len(rows), rows
    # the world's accuracy: any wording counts; relation and attributes are scored on both decodings
    for key in ("accuracy", "accuracy_raw"):
        assert set(report[key]["accuracy"]) == {"exact", "count", "size", "color", "shape", "relation"}
    assert 0.0 <= report["zero_shot_top1"] <= 1.0

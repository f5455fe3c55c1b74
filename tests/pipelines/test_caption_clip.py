"""CLIPScore and CLIP reranking in bulk captioning (without Ray): the stage's scores and order, the commit."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core.decoding import DecodeConfig
from clipcap_core.encoders import EncoderConfig, load_encoder
from pipelines.caption.job import CaptionConfig, _run_record
from pipelines.caption.output import PartCommitter, layout
from pipelines.caption.stages import CaptionStage, score_and_rank
from pipelines.io import schemas


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(EncoderConfig())


def _cos(a, b) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_score_and_rank_orders_by_clip_similarity_and_scores_each_caption(encoder):
    from clipcap_core.metrics import ClipScorer

    texts = [["one red circle", "two blue squares", "three green triangles"],
             ["a small circle", "a large square", "one red circle"]]
    text_emb = encoder.encode_text([t for g in texts for t in g])
    # image i "looks like" its candidate best[i]: its embedding is that caption's plus a little noise
    best = [1, 2]
    rng = np.random.default_rng(0)
    images = np.stack([text_emb[3 * i + b] + 0.05 * rng.normal(size=encoder.dim) for i, b in enumerate(best)])
    scorer = ClipScorer(encoder)
    logp = [[-1.0, -2.0, -3.0], [-0.5, -0.6, -0.7]]
    kept, kept_logp, kept_clip = score_and_rank(images, texts, logp, scorer, rerank=False)
    assert kept == texts and kept_logp == logp
    for i in range(2):
        for k in range(3):
            assert kept_clip[i][k] == pytest.approx(2.5 * max(_cos(images[i], text_emb[3 * i + k]), 0), abs=1e-5)
    ranked, ranked_logp, ranked_clip = score_and_rank(images, texts, logp, scorer, rerank=True)
    for i in range(2):
        assert ranked[i][0] == texts[i][best[i]]
        assert ranked_clip[i] == sorted(kept_clip[i], reverse=True)
        assert sorted(ranked[i]) == sorted(texts[i])  # a permutation: nothing dropped or duplicated
        assert [ranked_logp[i][ranked[i].index(t)] for t in texts[i]] == logp[i]  # log-probs follow their captions


def test_caption_stage_ranks_sampled_candidates_by_clip_score():
    stage = CaptionStage("tiny", DecodeConfig(strategy="sample", n=4, max_length=8, seed=1), threads=1,
                         encoder_cfg=EncoderConfig(), rerank="clip")
    dim = stage.scorer.encoder.dim
    emb = np.random.default_rng(0).normal(size=(3, dim)).astype(np.float32)
    table = pa.table({"key": ["a", "b", "c", "err"], "error": [None, None, None, "bad"],
                      "embedding": [e.tobytes() for e in emb] + [b""]})
    out = stage(table).to_pylist()
    for row in out[:3]:
        assert len(row["captions"]) == len(row["clip_scores"]) == 4
        assert row["clip_scores"] == sorted(row["clip_scores"], reverse=True)
    assert out[3]["captions"] is None and out[3]["clip_scores"] is None
    plain = CaptionStage("tiny", DecodeConfig(strategy="sample", n=4, max_length=8, seed=1), threads=1)
    assert plain(table).column("clip_scores").to_pylist() == [None] * 4  # no encoder: no scores, no rerank


def test_committer_writes_clip_score_per_rank_and_run_record_names_rerank(tmp_path):
    out = str(tmp_path / "out")
    rows = pa.table({"part_id": ["p", "p"], "index": [0, -1], "key": ["a.png", ""], "source": ["s", ""],
                     "error": [None, None], "stage": [None, None], "total": [-1, 1],
                     "captions": [["x", "y"], None], "scores": [[-1.0, -2.0], None],
                     "clip_scores": [[0.75, 0.25], None]})
    PartCommitter(out, "m@1", DecodeConfig(strategy="beam", n=2), rerank="clip").add(rows)
    table = pq.read_table(layout(out).part("p"))
    assert table.schema.remove_metadata() == schemas.CAPTIONS_SCORED_SCHEMA
    assert table.column("clip_score").to_pylist() == [0.75, 0.25] and table.column("rank").to_pylist() == [0, 1]
    assert schemas.read_metadata(table.schema)[schemas.META_RERANK] == "clip"
    base = CaptionConfig(input="in", output="out", model="m")
    assert "rerank" not in _run_record(base, "m", "d")  # older outputs stay resumable
    assert _run_record(CaptionConfig(input="in", output="out", model="m", rerank="clip"), "m", "d")["rerank"] == "clip"
    with pytest.raises(ValueError, match="needs clip_score=True"):
        CaptionConfig(input="in", output="out", model="m", rerank="clip", clip_score=False)

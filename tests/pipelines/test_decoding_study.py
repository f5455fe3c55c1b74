"""``clipcap study decoding``: one trained model's rows captioned by every strategy, timed and scored."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import synthetic
from pipelines.cli import command_parser, study_config
from pipelines.evaluate import decoding_study
from pipelines.io import schemas, storage
from tests.pipelines.trained_model import SEED, SIZE, embed_like_the_pipeline


def _table(root, n: int = 12) -> str:
    """``n`` synthetic rows embedded by the tiny CLIP (the trained model's), as ``clipcap embed`` writes them."""
    samples = list(synthetic.generate(n, seed=SEED + 1, size=SIZE))
    emb = embed_like_the_pipeline([s.image for s in samples])
    meta = schemas.embedding_metadata(clip_model="tiny", clip_pretrained=None, dim=emb.shape[1], dtype="float32",
                                      preprocess="test")
    schema = schemas.with_metadata(schemas.embedding_schema(emb.shape[1]), meta)
    cols = {schemas.KEY: [s.key for s in samples], schemas.CAPTION: [s.caption for s in samples],
            schemas.URL: [None] * n,
            schemas.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])}
    uri = storage.join(str(root), "embeddings", "synthetic", "tiny", "part-00000.parquet")
    storage.atomic_write_table(pa.table({f.name: cols[f.name] for f in schema}, schema=schema), uri)
    return uri


def test_every_strategy_is_timed_and_scored_on_its_own_captions(trained_model, tmp_path):
    from clipcap_core.artifacts import load_model
    from clipcap_core.decoding import generate
    from clipcap_core.metrics import caption_metrics

    table = _table(tmp_path)
    p = command_parser("study")
    cfg = study_config(p.parse_args(
        ["decoding", "--input", table, "--model", trained_model, "--output", str(tmp_path / "out"),
         "--heldout-fraction", "0", "--beam-sizes", "2", "--rerank-n", "3", "--tokenize", "simple",
         "--max-length", "14", "--set", "options.metrics=[bleu, cider]"]))  # no JVM start per strategy
    rows = decoding_study.run_decoding_study(cfg)
    assert [r["strategy"] for r in rows] == ["greedy", "beam 2", "sample (top-p 0.9, T 1)",
                                             "3 samples + CLIP rerank"]
    assert all(r["images"] == 12 and r["images_per_s"] > 0 for r in rows)
    assert all(r["clip_score"] is not None and r["bleu4"] is not None for r in rows)  # the model's CLIP (tiny) scored every strategy
    # The greedy row is the metric of the model's own greedy captions of those rows, recomputed here.
    loaded = load_model(trained_model)
    read = pq.read_table(table)
    emb = np.stack(read.column(schemas.IMAGE_EMBEDDING).to_numpy(zero_copy_only=False))
    texts = generate(loaded.model, emb, loaded.tokenizer, "greedy", max_length=14).texts
    refs = [[c] for c in read.column(schemas.CAPTION).to_pylist()]
    assert rows[0]["cider"] == caption_metrics(texts, refs, metrics=("cider",), tokenize="simple")["cider"]
    out = tmp_path / "out" / "decoding-study"
    assert pq.read_table(out / "table.parquet").num_rows == 4 and (out / "decoding.png").stat().st_size > 0
    md = (out / "table.md").read_text().splitlines()
    assert md[0].startswith("| strategy | images/s") and md[2].endswith("| +0.00 | +0.00 |")  # greedy vs itself

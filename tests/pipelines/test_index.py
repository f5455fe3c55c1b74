"""``clipcap index`` / ``clipcap search``: faiss indexes over embedding tables, text/image/key queries with the
table's own CLIP, IVF and HNSW against exact search, the Ray-parallel build, DeCap's top-k projection."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clipcap_core import synthetic
from clipcap_core.decap import DecapMemory
from pipelines.cli import main
from pipelines.index import IndexConfig, Searcher, build_index
from pipelines.io import schemas, storage


def _write_table(uri: str, keys, captions, vectors: np.ndarray, clip_model: str = "tiny") -> str:
    d = vectors.shape[1]
    meta = schemas.embedding_metadata(clip_model=clip_model, clip_pretrained=None, dim=d, dtype="float32",
                                      preprocess="test")
    schema = schemas.with_metadata(schemas.embedding_schema(d), meta)
    table = pa.table({schemas.KEY: list(keys), schemas.CAPTION: list(captions), schemas.URL: [None] * len(keys),
                      schemas.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(
                          pa.array(vectors.astype(np.float32).ravel()), d)}, schema=schema)
    storage.atomic_write_table(table, uri)
    return uri


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    """600 unseen synthetic images embedded by the shipped tiny CLIP, in 2 table files."""
    from clipcap_core.encoders import EncoderConfig, load_encoder

    root = tmp_path_factory.mktemp("idx")
    clip = load_encoder(EncoderConfig())
    samples = list(synthetic.generate(600, seed=3, size=64, start=50_000))
    emb = clip.encode_pixels(np.stack([clip.resize(s.image) for s in samples]))
    for i, part in enumerate(np.array_split(np.arange(600), 2)):
        _write_table(str(root / f"t/part-{i:05d}.parquet"), [samples[j].key for j in part],
                     [samples[j].caption for j in part], emb[part])
    (root / "query.png").write_bytes(_png(samples[7].image))
    return root, samples


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_text_search_finds_the_images_with_that_caption(tiny_table, tmp_path):
    root, samples = tiny_table
    info = build_index(IndexConfig(input=str(root / "t"), output=str(tmp_path / "ix")))
    assert (info["kind"], info["count"], info["clip_model"]) == ("flat", 600, "tiny")
    searcher = Searcher.open(str(tmp_path / "ix"))
    by_caption: dict[str, set[str]] = {}
    for s in samples:
        by_caption.setdefault(s.caption, set()).add(s.key)
    captions = sorted(by_caption)[:80]
    hits = searcher.search_text(captions, k=10)
    recalls = [len({h["key"] for h in rows} & by_caption[c]) / min(10, len(by_caption[c]))
               for c, rows in zip(captions, hits, strict=True)]
    assert np.mean(recalls) >= 0.9, np.mean(recalls)
    assert hits[0][0]["caption"] == captions[0] and hits[0][0]["score"] >= hits[0][-1]["score"]
    # by key: the row itself first at cosine 1; by image file: an image's own row is its nearest neighbour
    first = searcher.search_keys([samples[5].key], k=3)[0]
    assert first[0]["key"] == samples[5].key and first[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert searcher.search_images([str(root / "query.png")], k=1)[0][0]["key"] == samples[7].key


def test_cli_index_and_search_with_a_table_written_out(tiny_table, tmp_path, capsys):
    root, samples = tiny_table
    assert main(["index", "--input", str(root / "t"), "--output", str(tmp_path / "ix"), "--kind", "hnsw"]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "ix"), "--key", samples[0].key, samples[1].key, "-k", "4",
                 "--output", str(tmp_path / "hits.parquet")]) == 0
    printed = capsys.readouterr().out
    assert f"# {samples[0].key}" in printed and samples[0].caption in printed
    hits = pq.read_table(tmp_path / "hits.parquet").to_pylist()
    assert len(hits) == 8 and hits[0]["key"] == samples[0].key and hits[4]["key"] == samples[1].key
    assert main(["search", "--index", str(tmp_path / "nothing"), "--text", "x"]) == 2


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    """CLIP-like vectors: 300 topics x 30 near-duplicate groups each, plus noise (real embeddings cluster at
    several scales; i.i.d. noise has no nearest neighbours worth the name)."""
    fixed = np.random.default_rng(0)
    topics = fixed.normal(size=(300, d))
    groups = topics[fixed.integers(0, 300, 9000)] + 0.5 * fixed.normal(size=(9000, d))
    rng = np.random.default_rng(seed)
    return groups[rng.integers(0, 9000, n)] + 0.25 * rng.normal(size=(n, d))


def test_ivf_and_hnsw_agree_with_exact_search_at_100k(tmp_path):
    vectors = _clustered(100_000, 32, 0)
    keys = [f"k{i}" for i in range(len(vectors))]
    _write_table(str(tmp_path / "t/part-00000.parquet"), keys, keys, vectors, clip_model="")
    queries = _clustered(200, 32, 1)
    results = {}
    for kind in ("flat", "ivf", "hnsw"):
        info = build_index(IndexConfig(input=str(tmp_path / "t"), output=str(tmp_path / kind), kind=kind))
        assert info["kind"] == kind and info["count"] == 100_000
        results[kind] = [{h["key"] for h in rows} for rows in Searcher.open(str(tmp_path / kind)).search_vectors(
            queries, k=10)]
    for kind in ("ivf", "hnsw"):
        agree = np.mean([len(a & b) / 10 for a, b in zip(results["flat"], results[kind], strict=True)])
        assert agree >= 0.95, (kind, agree)
    assert IndexConfig(input="x", output="y").kind_for(100_000) == "ivf"


def test_non_finite_rows_are_left_out_of_the_index(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(50, 8))
    vectors[4, 2] = np.nan
    keys = [f"k{i}" for i in range(50)]
    _write_table(str(tmp_path / "t/part-00000.parquet"), keys, keys, vectors, clip_model="")
    info = build_index(IndexConfig(input=str(tmp_path / "t"), output=str(tmp_path / "ix")))
    assert info["count"] == 49
    rows = Searcher.open(str(tmp_path / "ix")).search_vectors(vectors[:1], k=49)[0]
    assert "k4" not in {h["key"] for h in rows} and all(np.isfinite(h["score"]) for h in rows)


@pytest.mark.integration
def test_the_ray_build_equals_the_local_build(ray_cluster, tmp_path):
    vectors = _clustered(6000, 32, 2)
    for i, part in enumerate(np.array_split(np.arange(6000), 3)):
        keys = [f"k{j}" for j in part]
        _write_table(str(tmp_path / f"t/part-{i:05d}.parquet"), keys, keys, vectors[part], clip_model="")
    out = {}
    for mode in ("local", "ray"):
        cfg = IndexConfig(input=str(tmp_path / "t"), output=str(tmp_path / mode), kind="ivf", parallel=mode, nlist=40)
        assert build_index(cfg)["count"] == 6000
        out[mode] = Searcher.open(str(tmp_path / mode))
    assert out["ray"].rows.equals(out["local"].rows)
    queries = _clustered(50, 32, 3)
    a, b = (out[m].search_vectors(queries, k=10) for m in ("local", "ray"))
    assert [[h["key"] for h in r] for r in a] == [[h["key"] for h in r] for r in b]


def test_decap_top_k_projection_equals_the_full_softmax_where_k_covers_the_memory():
    import faiss

    rng = np.random.default_rng(0)
    mem, emb = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(20, 16)).astype(np.float32)
    full = DecapMemory(mem, tau=0.05).project(emb)
    assert np.allclose(DecapMemory(mem, tau=0.05, top_k=300).project(emb), full, atol=1e-6)
    top = DecapMemory(mem, tau=0.05, top_k=40).project(emb)
    assert not np.allclose(top, full, atol=1e-6) and np.allclose(top, full, atol=0.05)  # the tail weighs little
    exact = faiss.IndexFlatIP(16)
    exact.add(DecapMemory(mem).memory.numpy())
    with_index = DecapMemory(mem, tau=0.05, top_k=40, index=exact).project(emb)
    assert np.allclose(with_index, top, atol=1e-5)  # the index path picks the same entries
    assert torch.is_tensor(DecapMemory(mem, top_k=5).project(torch.as_tensor(emb)))


def test_ivf_lists_filled_in_place_equal_appending_byte_for_byte(tmp_path):
    """The IVF build writes each list once at its final size (memory); the index must be the one ``add`` builds:
    a list slip, an id offset by a batch or a reordering within a list changes the serialised bytes."""
    import faiss

    from pipelines import index
    from pipelines.demo import synthetic_tables

    files = synthetic_tables.write_synthetic_tables(str(tmp_path / "t"), 3000, shards=3, dim=32)
    cfg = IndexConfig(input=str(tmp_path / "t"), output=str(tmp_path / "i"), nlist=20, train_sample=3000)
    appended = index.empty_index("ivf", 32, 3000, cfg, files)
    in_place = faiss.deserialize_index(faiss.serialize_index(appended))
    rows_appended = index.fill(appended, files, cfg.column)
    rows_in_place = index.fill_ivf(in_place, files, cfg.column)
    assert rows_in_place.equals(rows_appended) and in_place.ntotal == 3000
    assert bytes(faiss.serialize_index(in_place)) == bytes(faiss.serialize_index(appended))

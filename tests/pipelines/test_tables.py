"""Embedding-table reading for training: discovery, metadata checks, key-hash splits, the Ray Data stream."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipcap_core import synthetic as syn
from pipelines.demo import synthetic_tables
from pipelines.io import schemas, storage, tables


@pytest.fixture()
def synth_root(tmp_path):
    root = str(tmp_path / "root")
    synthetic_tables.write_synthetic_tables(root, 300, shards=3, dim=16)
    return root


def test_list_and_inspect_tables(synth_root):
    # An errors table and a temporary file next to the parts must not be picked up.
    table_dir = storage.join(synth_root, "embeddings/synthetic/attr-proj")
    storage.atomic_write_table(pa.table({"key": ["x"]}), storage.join(table_dir, "_errors/part-00000.parquet"))
    meta = storage.join(synth_root, "_meta/embeddings/synthetic/attr-proj/errors/part-00000.parquet")
    storage.atomic_write_table(pa.table({"key": ["x"]}), meta)  # the embed stage's bookkeeping under the root
    files = tables.list_table_files(storage.join(synth_root, "embeddings"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert tables.list_table_files(synth_root) == files
    info = tables.inspect_tables(files)
    assert (info.dim, info.clip_model, info.num_rows) == (16, "attr-proj", 300)
    with pytest.raises(FileNotFoundError, match="no embedding tables"):
        tables.list_table_files(storage.join(synth_root, "nothing-here"))


def test_mixed_dimensions_and_model_mismatch_are_clear_errors(tmp_path, synth_root):
    other = synthetic_tables.write_synthetic_tables(str(tmp_path / "other"), 10, dim=8)
    files = tables.list_table_files(synth_root) + other
    with pytest.raises(ValueError, match="mix dimensions"):
        tables.inspect_tables(files)
    info = tables.inspect_tables(tables.list_table_files(synth_root))
    tables.check_model_dim(info, 16)
    with pytest.raises(ValueError, match=r"dimension mismatch.*D=16.*clip_dim=512"):
        tables.check_model_dim(info, 512)


def test_corrupt_table_file_is_named(tmp_path, synth_root):
    files = tables.list_table_files(storage.join(synth_root, "embeddings"))
    bad = tmp_path / "part-00009.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match=r"part-00009\.parquet is not a readable Parquet file"):
        tables.inspect_tables([*files, str(bad)])


def test_table_without_caption_column_is_rejected(tmp_path):
    t = pa.table({"key": ["a"], "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0]), 2)})
    uri = str(tmp_path / "part-00000.parquet")
    storage.atomic_write_table(t, uri)
    with pytest.raises(ValueError, match="caption"):
        tables.inspect_tables([uri])


def test_key_hash_split_is_stable_disjoint_and_about_the_right_size():
    keys = [f"k{i}" for i in range(4000)]
    held = tables.Split(part="heldout", heldout_fraction=0.2).mask(keys)
    train = tables.Split(part="train", heldout_fraction=0.2).mask(keys)
    assert not (held & train).any() and (held | train).all()
    assert 0.17 < held.mean() < 0.23
    # A key's side never depends on its neighbours (new shards do not move old rows).
    assert (tables.Split(part="heldout", heldout_fraction=0.2).mask(keys[::7]) == held[::7]).all()
    # Another salt gives another split; the replay sample is seeded and reproducible.
    other = tables.Split(part="heldout", heldout_fraction=0.2, salt="x").mask(keys)
    assert (other != held).mean() > 0.2
    r1 = tables.Split(part="train", sample_fraction=0.3, sample_seed=5).mask(keys)
    r2 = tables.Split(part="train", sample_fraction=0.3, sample_seed=5).mask(keys)
    r3 = tables.Split(part="train", sample_fraction=0.3, sample_seed=6).mask(keys)
    train10 = tables.Split(part="train").mask(keys)
    assert (r1 == r2).all() and (r1 != r3).any() and not (r1 & ~train10).any()
    assert 0.25 < r1.sum() / train10.sum() < 0.35


def test_read_split_in_memory_and_counts(synth_root):
    files = tables.list_table_files(synth_root)
    split = tables.Split(part="heldout", heldout_fraction=0.25)
    held = tables.read_split(files, split)
    assert held.num_rows == tables.count_split(files, split)
    assert held.column("key").to_pylist() == sorted(held.column("key").to_pylist())
    emb = tables.embeddings_numpy(held)
    assert emb.shape == (held.num_rows, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    train_n = tables.count_split(files, tables.Split(part="train", heldout_fraction=0.25))
    assert train_n + held.num_rows == 300


def test_synthetic_embeddings_carry_the_attributes():
    # Same attributes -> near embeddings; a different colour -> far: what makes the set learnable.
    samples = list(syn.generate(200, seed=0, size=16))
    emb = synthetic_tables.attribute_embeddings(samples, 32, noise=0.05)
    same = [(i, j) for i in range(50) for j in range(i + 1, 200) if samples[i].caption == samples[j].caption]
    diff = [(i, j) for i in range(50) for j in range(i + 1, 200)
            if samples[i].attributes.color != samples[j].attributes.color]
    assert same, "expected repeated captions in 200 samples"
    sim = lambda pairs: np.mean([emb[i] @ emb[j] for i, j in pairs])  # noqa: E731
    assert sim(same) > 0.9 > sim(diff) + 0.2


def test_prepare_batch_filters_tokenises_and_pads(synth_root):
    files = tables.list_table_files(synth_root)
    raw = tables.read_split(files, tables.Split(part="all"))
    raw = raw.set_column(1, schemas.CAPTION, pa.array([None] + raw.column(1).to_pylist()[1:]))
    vocab = {w: i + 1 for i, w in enumerate(syn.VOCABULARY)}

    def tokenize(caps):
        ids = [[vocab[w] for w in c.split()] for c in caps]
        t = max(map(len, ids))
        tok = np.array([x + [0] * (t - len(x)) for x in ids])
        return tok, (tok > 0).astype(np.float32)

    prep = tables.PrepareBatch(tables.Split(part="train", heldout_fraction=0.25), tokenize, max_tokens=12)
    out = prep(raw)
    expected = tables.Split(part="train", heldout_fraction=0.25).mask(raw.column("key"))
    expected[0] = False  # null caption dropped
    assert out["tokens"].shape == (expected.sum(), 12) and out["embedding"].shape == (expected.sum(), 16)
    assert (out["mask"].sum(1) == 7).all()  # every synthetic caption has 7 words
    first = raw.filter(pa.array(expected)).column("caption")[0].as_py()
    assert out["tokens"][0, :7].tolist() == [vocab[w] for w in first.split()]
    assert (out["tokens"][:, 7:] == 0).all()


@pytest.mark.integration
def test_stream_tables_over_s3_on_ray(ray_cluster, s3_uri):
    files = synthetic_tables.write_synthetic_tables(s3_uri, 120, shards=2, dim=8)

    def tokenize(caps):
        tok = np.array([[len(w) for w in c.split()] for c in caps])
        return tok, np.ones_like(tok, dtype=np.float32)

    train, replay = tables.Split(part="train", heldout_fraction=0.5), tables.Split(sample_fraction=0.3)
    # Two "epochs" of file 0 (train split) and one of file 1 (a replay sample), in blocks of 16 rows.
    parts = [(files[0], train), (files[1], replay), (files[0], train)]
    ds = tables.stream_tables(parts, tokenize, max_tokens=9, rows_per_block=16)
    rows = ds.take_all()
    expected = 2 * tables.count_split(files[:1], train) + tables.count_split(files[1:], replay)
    assert len(rows) == expected and 0 < tables.count_split(files[1:], replay) < 30
    assert rows[0]["tokens"].shape == (9,) and rows[0]["embedding"].shape == (8,)
    # Exactly those rows, each tokenised once per appearance (tokens here = word lengths, padded to 9).
    captions = (tables.read_split(files[:1], train).column("caption").to_pylist() * 2
                + tables.read_split(files[1:], replay).column("caption").to_pylist())
    want = sorted(tuple(len(w) for w in c.split()) + (0, 0) for c in captions)
    assert sorted(tuple(int(t) for t in r["tokens"]) for r in rows) == want

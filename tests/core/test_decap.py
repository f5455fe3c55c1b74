"""DeCap memory projection: the softmax weights, its limits, batching, dtypes, memory tables and D checks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clipcap_core.decap import (
    DecapMemory,
    ProjectionConfig,
    check_projection,
    load_memory_table,
    memory_table_dim,
    resolve_projection,
)


def _memory(m: int = 50, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(m, d)).astype(np.float32)


def _write_text_table(path, keys, emb, column="text_embedding"):
    d = emb.shape[1]
    table = pa.table({"key": keys, "caption": [f"c {k}" for k in keys],
                      column: pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), d)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_weights_are_a_distribution_peaked_on_the_most_similar_entry():
    mem = _memory()
    query = np.random.default_rng(1).normal(size=(7, 16)).astype(np.float32)
    w = DecapMemory(mem, tau=0.05).weights(query)
    assert w.shape == (7, 50) and bool((w >= 0).all())
    np.testing.assert_allclose(w.sum(-1).numpy(), 1.0, atol=1e-5)
    unit = mem / np.linalg.norm(mem, axis=1, keepdims=True)
    cos = (query / np.linalg.norm(query, axis=1, keepdims=True)) @ unit.T
    assert w.argmax(-1).tolist() == cos.argmax(-1).tolist()
    # a lower temperature sharpens the same ranking
    assert bool((DecapMemory(mem, tau=0.01).weights(query).max(-1).values > w.max(-1).values).all())


def test_tau_to_zero_picks_the_nearest_entry_even_for_far_queries():
    mem = _memory()
    unit = mem / np.linalg.norm(mem, axis=1, keepdims=True)
    query = np.random.default_rng(2).normal(size=(20, 16)).astype(np.float32)  # not near any entry
    nearest = ((query / np.linalg.norm(query, axis=1, keepdims=True)) @ unit.T).argmax(-1)
    out = DecapMemory(mem, tau=1e-6).project(query)
    np.testing.assert_allclose(out, unit[nearest], atol=1e-5)


def test_batched_equals_one_at_a_time_and_chunking_does_not_matter():
    memory = DecapMemory(_memory(m=300), tau=0.01)
    query = np.random.default_rng(3).normal(size=(37, 16)).astype(np.float32)
    whole = memory.project(query)
    single = np.concatenate([memory.project(query[i: i + 1]) for i in range(len(query))])
    np.testing.assert_allclose(whole, single, atol=2e-5)
    np.testing.assert_allclose(memory.project(query, chunk=5), whole, atol=2e-5)
    as_tensor = memory.project(torch.from_numpy(query))
    assert torch.is_tensor(as_tensor) and np.allclose(as_tensor.numpy(), whole, atol=2e-5)
    assert memory.project(np.zeros((0, 16), np.float32)).shape == (0, 16)


def test_memory_in_the_model_dtype_projects_close_to_float32():
    memory = DecapMemory(_memory(), tau=0.01)
    query = torch.from_numpy(np.random.default_rng(4).normal(size=(9, 16)).astype(np.float32))
    low = memory.to("cpu", torch.bfloat16)
    assert low.memory.dtype == torch.bfloat16 and low.tau == memory.tau
    out = low.project(query)
    assert out.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(out.float(), memory.project(query), dim=-1)
    assert bool((cos > 0.98).all()), cos


def test_memory_with_another_dimension_fails_clearly(tmp_path):
    memory = DecapMemory(_memory(d=16))
    with pytest.raises(ValueError, match="D=12 but the DeCap memory has D=16"):
        memory.project(np.zeros((2, 12), np.float32))
    with pytest.raises(ValueError, match=r"memory has D=16 but the model expects clip_dim=24"):
        resolve_projection(ProjectionConfig(), memory, clip_dim=24)
    _write_text_table(tmp_path / "mem" / "part-00000.parquet", ["a", "b"], _memory(m=2, d=8))
    with pytest.raises(ValueError, match=r"D=8 but the model expects clip_dim=16"):
        check_projection(ProjectionConfig(mode="memory", memory=str(tmp_path / "mem")), 16, False)
    with pytest.raises(ValueError, match=r"memory has D=8 but the model expects clip_dim=16"):
        resolve_projection(ProjectionConfig(mode="memory", memory=str(tmp_path / "mem")), None, clip_dim=16)


def test_projection_modes():
    own = DecapMemory(_memory(), tau=0.02)
    assert resolve_projection(ProjectionConfig(), own, 16) is own
    assert resolve_projection(ProjectionConfig(), None, 16) is None
    assert resolve_projection(ProjectionConfig(mode="none"), own, 16) is None
    assert resolve_projection(ProjectionConfig(mode="memory", tau=0.5), own, 16).tau == 0.5
    with pytest.raises(ValueError, match="needs a memory table"):
        resolve_projection(ProjectionConfig(mode="memory"), None, 16)
    with pytest.raises(ValueError, match="needs a memory table"):
        check_projection(ProjectionConfig(mode="memory"), 16, has_own_memory=False)
    with pytest.raises(ValueError, match="mode 'memory'"):
        ProjectionConfig(mode="none", memory="s3://b/m")
    with pytest.raises(ValueError, match="tau"):
        ProjectionConfig(tau=0.0)


def test_memory_table_sample_is_seeded_and_independent_of_the_layout(tmp_path):
    keys = [f"k{i:03d}" for i in range(60)]
    emb = _memory(m=60)
    _write_text_table(tmp_path / "one" / "part-00000.parquet", keys, emb)
    order = np.random.default_rng(5).permutation(60)
    for j, idx in enumerate(np.array_split(order, 3)):  # same rows, shuffled over three files
        _write_text_table(tmp_path / "three" / f"part-{j:05d}.parquet", [keys[i] for i in idx], emb[idx])
    (tmp_path / "three" / "_errors").mkdir()
    _write_text_table(tmp_path / "three" / "_errors" / "part-00000.parquet", ["bad"], _memory(m=1))  # ignored
    full = load_memory_table(str(tmp_path / "three"), tau=0.03)
    assert len(full) == 60 and full.tau == 0.03 and memory_table_dim(str(tmp_path / "three")) == 16

    def rows(mem):
        return {tuple(np.round(r, 5)) for r in mem.memory.numpy()}

    a = load_memory_table(str(tmp_path / "one"), max_rows=10, seed=1)
    b = load_memory_table(str(tmp_path / "three"), max_rows=10, seed=1)
    c = load_memory_table(str(tmp_path / "one"), max_rows=10, seed=2)
    assert len(a) == 10 and rows(a) == rows(b) and rows(a) != rows(c)
    _write_text_table(tmp_path / "img" / "part-00000.parquet", ["a"], _memory(m=1), column="image_embedding")
    with pytest.raises(ValueError, match="not a text-embedding table"):
        load_memory_table(str(tmp_path / "img"))
    with pytest.raises(FileNotFoundError, match="no text-embedding tables"):
        load_memory_table(str(tmp_path / "nothing"))


def test_captioner_projection_modes_on_artifacts(tmp_path):
    from clipcap_core.artifacts import save_model
    from clipcap_core.captioner import Captioner
    from clipcap_core.decoding import generate
    from tests.core.core_helpers import synthetic_embeddings, trained_tiny

    model, tok = trained_tiny()
    _, memory = synthetic_embeddings(60, start=40_000, noise=0.0)
    _, query = synthetic_embeddings(6, start=41_000, noise=0.3)
    projected = DecapMemory(memory, tau=0.01).project(query)
    save_model(model, tok, str(tmp_path / "plain"))  # image-trained: no memory of its own
    _write_text_table(tmp_path / "mem" / "part-00000.parquet", [f"m{i}" for i in range(60)], memory)
    plain = Captioner.from_pretrained(str(tmp_path / "plain"))
    assert plain.decap is None and plain.caption(embeddings=query) == generate(model, query, tok).texts
    with_memory = Captioner.from_pretrained(str(tmp_path / "plain"), projection=ProjectionConfig(
        mode="memory", memory=str(tmp_path / "mem")))
    expected = generate(model, projected, tok).texts
    assert expected != generate(model, query, tok).texts  # the projection changes what is decoded here
    assert with_memory.caption(embeddings=query) == expected
    for options in ({"strategy": "beam", "beam_size": 3, "n": 2}, {"strategy": "sample", "n": 2, "seed": 3}):
        assert with_memory.caption(embeddings=query, **options) == Captioner.from_pretrained(
            str(tmp_path / "plain")).caption(embeddings=projected, **options)
    save_model(model, tok, str(tmp_path / "decap"), decap=DecapMemory(memory))
    assert Captioner.from_pretrained(str(tmp_path / "decap")).caption(embeddings=query) == expected
    raw = Captioner.from_pretrained(str(tmp_path / "decap"), projection=ProjectionConfig(mode="none"))
    assert raw.decap is None and raw.caption(embeddings=query) == generate(model, query, tok).texts
    save_model(model, tok, str(tmp_path / "bad"), decap=DecapMemory(_memory(d=16)))
    with pytest.raises(ValueError, match="memory has D=16 but the model expects clip_dim=128"):
        Captioner.from_pretrained(str(tmp_path / "bad"))

"""Bulk captioning's reliability, without Ray: model checks before any work (corrupt weights named,
weights in the model id, untrained presets refused), unreadable parts not committed, the output layout
(output inside input refused) and tables that pandas, pyarrow, DuckDB, polars and
Hugging Face ``datasets`` read as they are."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pytest

from clipcap_core import uris
from clipcap_core.decoding import DecodeConfig
from pipelines.caption.job import CaptionConfig, prepare
from pipelines.caption.output import PartCommitter, layout, meta_uri, table_uri
from pipelines.io import sources, storage
from tests.pipelines.image_zoo import good_images


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from clipcap_core.artifacts import load_model, save_model

    loaded = load_model("tiny")
    out = tmp_path_factory.mktemp("model") / "tiny-artifact"
    save_model(loaded.model, loaded.tokenizer, str(out))
    return out


@pytest.fixture()
def images(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jpg").write_bytes(good_images()["rgb.jpg"])
    return inp


def _cfg(inp, out, model, **kw) -> CaptionConfig:
    return CaptionConfig(input=str(inp), output=str(out), model=str(model), **kw)


def test_corrupt_weights_are_named_before_any_work_and_leave_no_run_record(saved_tiny, images, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_tiny, broken)
    with open(broken / "mapping.safetensors", "r+b") as f:  # the repro: bytes 8-40 overwritten
        f.seek(8)
        f.write(b"\x00" * 32)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"weights file .*mapping\.safetensors is corrupt"):
        prepare(_cfg(images, out, broken))
    truncated = tmp_path / "truncated"
    shutil.copytree(saved_tiny, truncated)
    data = (truncated / "lm.safetensors").read_bytes()
    (truncated / "lm.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"lm\.safetensors is corrupt: .*truncated"):
        prepare(_cfg(images, out, truncated))
    (truncated / "lm.safetensors").unlink()
    with pytest.raises(ValueError, match=r"lm\.safetensors is missing"):
        prepare(_cfg(images, out, truncated))
    assert not os.path.exists(meta_uri(str(out), "run.json"))
    from clipcap_core.artifacts import load_model

    with pytest.raises(ValueError, match=r"mapping\.safetensors is corrupt"):  # the Python API names it too
        load_model(str(broken))


@pytest.mark.parametrize("weights", ["mapping.safetensors", "lm.safetensors"])
def test_another_models_weights_file_is_named_before_any_work(weights, saved_tiny, images, tmp_path):
    """A model folder holding a well-formed weights file of another model (other CLIP width, other LM) is
    refused by the pre-run check, naming the file, before Ray starts and before anything is written."""
    from dataclasses import replace

    from clipcap_core.artifacts import load_model, save_model
    from clipcap_core.model import build_model
    from clipcap_core.presets import preset_config

    tiny = load_model(str(saved_tiny))
    cfg = preset_config("tiny")
    other_cfg = replace(cfg, clip_dim=cfg.clip_dim * 2, lm=replace(cfg.lm, config={**cfg.lm.config, "n_layer": 1}))
    save_model(build_model(other_cfg, tiny.tokenizer), tiny.tokenizer, str(tmp_path / "other"))
    mixed = tmp_path / "mixed"
    shutil.copytree(saved_tiny, mixed)
    shutil.copy(tmp_path / "other" / weights, mixed / weights)
    with pytest.raises(ValueError, match=rf"{weights} does not fit the model in config.json"):
        prepare(_cfg(images, tmp_path / "out", mixed))
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # nothing written
    from pipelines.cli import main

    assert main(["caption", "--input", str(images), "--output", str(tmp_path / "o2"), "--model", str(mixed)]) == 2


def test_model_id_hashes_the_weights_not_only_config_json(saved_tiny, images, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(saved_tiny, other)
    from safetensors.torch import load_file, save_file

    state = load_file(str(other / "mapping.safetensors"))
    name = sorted(state)[0]
    state[name] = state[name] + 1.0
    save_file(state, str(other / "mapping.safetensors"), metadata={"format": "pt"})
    assert (other / "config.json").read_text() == (saved_tiny / "config.json").read_text()
    a = prepare(_cfg(images, tmp_path / "o1", saved_tiny)).model_id
    b = prepare(_cfg(images, tmp_path / "o2", other)).model_id
    assert a.split("@")[1] != b.split("@")[1]
    assert prepare(_cfg(images, tmp_path / "o3", saved_tiny)).model_id == a  # and it is stable


def test_untrained_preset_is_refused_with_how_to_get_a_model(images, tmp_path, capsys):
    with pytest.raises(ValueError, match="untrained preset.*clipcap train.*import-reference"):
        prepare(_cfg(images, tmp_path / "out", "tiny"))
    from pipelines.cli import main

    code = main(["caption", "--input", str(images), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--model is required" in err and "Traceback" not in err
    assert prepare(_cfg(images, tmp_path / "out", "tiny", allow_untrained=True)).todo  # explicit opt-in works


def test_output_inside_the_input_is_refused(saved_tiny, images):
    with pytest.raises(ValueError, match="inside input"):
        prepare(_cfg(images, images / "captions-run", saved_tiny))
    with pytest.raises(ValueError, match="inside input"):
        prepare(_cfg(images, images, saved_tiny))


def _rows(part_id, members, total):
    """Final-stage rows: members = [(index, key, caption or None, error or None, stage)] + the marker."""
    cols = {n: [] for n in ("part_id", "index", "key", "source", "error", "stage", "total", "captions", "scores")}
    for index, key, cap, err, stage in members + [(-1, "", None, None, None)]:
        for name, v in (("part_id", part_id), ("index", index), ("key", key), ("source", f"src/{key}"),
                        ("error", err), ("stage", stage), ("total", total if index < 0 else -1),
                        ("captions", [cap] if cap else None), ("scores", [-1.0] if cap else None)):
            cols[name].append(v)
    return pa.table(cols)


def test_a_part_whose_archive_could_not_be_read_is_not_committed_then_retried(tmp_path):
    out = str(tmp_path / "out")
    c = PartCommitter(out, "m@1", DecodeConfig())
    half = [(0, "t.tar/a.jpg", "a cap", None, None),
            (1, "t.tar", None, "unreadable archive: ReadError: unexpected end of data", sources.UNIT_STAGE)]
    assert c.add(_rows("t", half, 2)) == []
    assert list(c.failed) == ["t"] and "unexpected end of data" in c.failed["t"]
    assert layout(out).done() == set() and not uris.exists(layout(out).part("t"))
    assert not uris.exists(layout(out).errors("t"))
    retry = PartCommitter(out, "m@1", DecodeConfig())  # the next run, archive repaired
    assert retry.add(_rows("t", [(0, "t.tar/a.jpg", "a cap", None, None), (1, "t.tar/b.jpg", "b", None, None)], 2)) \
        == [("t", 2, 2, 2)]
    assert layout(out).done() == {"t"} and retry.failed == {}


def test_truncated_tar_part_yields_a_unit_stage_row(tmp_path):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("a.jpg", "b.jpg"):
            data = good_images()["rgb.jpg"]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "t.tar").write_bytes(buf.getvalue()[:700])  # cut inside the first member
    cfg = sources.SourceConfig()
    [part] = sources.plan_parts(str(tmp_path / "t.tar"), cfg)
    recs = list(sources.read_part(part, cfg))
    assert recs[-1].stage == sources.UNIT_STAGE and "unreadable archive" in recs[-1].error


def test_tables_read_as_they_are_by_pandas_pyarrow_duckdb_polars_and_datasets(tmp_path):
    """A 0-row part file or bookkeeping files inside the table folder break polars and datasets, so the caption
    folder holds only non-empty part files; bookkeeping lives in _meta/."""
    out = str(tmp_path / "out")
    c = PartCommitter(out, "m@1", DecodeConfig())
    c.add(_rows("p0", [(0, "a.jpg", "one", None, None), (1, "b.jpg", None, "bad", "decode")], 2))
    c.add(_rows("p1", [(0, "c.jpg", "two", None, None)], 1))
    c.add(_rows("p2", [], 0))  # an empty part: no 0-row file
    c.add(_rows("p3", [(0, "d.jpg", None, "bad", "decode")], 1))  # all members failed: no 0-row file
    storage.write_json({"images": 4}, meta_uri(out, "summary.json"))
    storage.write_json({"model": "m@1"}, meta_uri(out, "run.json"))
    table = table_uri(out)
    want = ["a.jpg", "c.jpg"]

    import pandas as pd
    import pyarrow.dataset as ds

    assert sorted(pd.read_parquet(table)["key"]) == want
    assert sorted(pd.read_parquet(out)["key"]) == want  # the whole output folder too: _meta is skipped
    assert sorted(ds.dataset(table, format="parquet").to_table().column("key").to_pylist()) == want
    import duckdb

    rows = duckdb.sql(f"select key from read_parquet('{table}/*.parquet') order by key").fetchall()
    assert [r[0] for r in rows] == want
    import polars as pl

    assert sorted(pl.scan_parquet(table).collect()["key"].to_list()) == want
    import datasets

    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    loaded = datasets.load_dataset("parquet", data_dir=table, split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(loaded["key"]) == want
    loaded = datasets.load_dataset(table, split="train", cache_dir=str(tmp_path / "hf2"))
    assert sorted(loaded["key"]) == want
    assert json.loads((tmp_path / "out/_meta/summary.json").read_text()) == {"images": 4}


def test_rerun_guard_refuses_other_decoding_but_not_speed_only_options(saved_tiny, images, tmp_path):
    out = tmp_path / "out"
    prepare(_cfg(images, out, saved_tiny, decoding=DecodeConfig(max_length=8, batch_size=16)))
    prepare(_cfg(images, out, saved_tiny, decoding=DecodeConfig(max_length=8, batch_size=64)))  # speed only
    with pytest.raises(ValueError, match="different decoding"):
        prepare(_cfg(images, out, saved_tiny, decoding=DecodeConfig(max_length=9)))
    with pytest.raises(ValueError, match="different decoding"):
        prepare(_cfg(images, out, saved_tiny, decoding=DecodeConfig(max_length=8, strategy="beam")))


class _Blocks:
    """What the driver iterates (``Dataset.iter_batches``), here a fixed list of blocks: the driver's own
    bookkeeping is under test, not Ray's."""

    def __init__(self, blocks):
        self.blocks = blocks

    def iter_batches(self, **_kw):
        yield from self.blocks


def test_rows_lost_in_the_pipeline_fail_the_run_naming_the_part(saved_tiny, images, tmp_path, monkeypatch):
    from pipelines.caption import job as caption

    lost_row = _rows("images-00000", [], 1)  # the marker says 1 member, the member row never arrives
    monkeypatch.setattr(caption, "build_dataset", lambda cfg, plan: _Blocks([lost_row]))
    with pytest.raises(RuntimeError, match=r"incomplete part\(s\) \['images-00000'\] \(rows lost\?\)"):
        caption.caption_archive(_cfg(images, tmp_path / "out", saved_tiny))
    assert layout(str(tmp_path / "out")).done() == set()


def test_embed_rows_lost_in_the_pipeline_fail_the_run_naming_the_shard(tmp_path):
    import numpy as np

    from pipelines.embed import stages as st
    from pipelines.embed.job import EmbedConfig, EmbedResult, _drain

    batch = pa.table({st.SHARD: ["00007"], st.INDEX: pa.array([0], pa.int64()), st.TOTAL: pa.array([2], pa.int64()),
                      st.KEY: ["k"], st.CAPTION: ["c"], st.URL: pa.array([None], pa.string()), st.SOURCE: ["s"],
                      st.ERROR: [""], st.UNREAD: [False], "embedding": [np.ones(128, np.float32).tobytes()]})
    cfg = EmbedConfig(input=str(tmp_path), output_root=str(tmp_path / "o"), dataset="d")
    result = EmbedResult(table_uri=cfg.table_uri, shards=1, skipped=0, written=1, rows=0, errors=0, dim=128, wall_s=0)
    with pytest.raises(RuntimeError, match=r"incomplete shard\(s\) \['00007'\] \(rows lost\?\)"):
        _drain(cfg, _Blocks([batch]), [str(tmp_path / "00007.tar")], 128, 0.0, result)
    assert not (tmp_path / "o").exists()


def test_caption_images_names_a_bad_file_and_refuses_a_bomb(saved_tiny, tmp_path, capsys):
    from PIL import Image

    from pipelines.cli import main

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert main(["caption-images", str(empty), "--model", str(saved_tiny)]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: empty file" in err and "BytesIO" not in err and "Traceback" not in err
    big = tmp_path / "big.png"
    Image.new("L", (9000, 8000)).save(big)  # 72 MP: over the 64 MP limit, refused before decoding
    assert main(["caption-images", str(big), "--model", str(saved_tiny)]) == 2
    assert "big.png" in capsys.readouterr().err
    assert main(["caption-images", str(empty), "--model", "tiny"]) == 2
    assert "untrained preset" in capsys.readouterr().err


def test_stages_give_each_key_the_caption_of_its_own_image(trained_model, tmp_path):
    """The callables Ray runs (read+decode, ClipActor, CaptionStage) and the committer, called in-process with a
    *trained* model: each key's caption equals ``Captioner`` on that member's own bytes (with an untrained
    preset, embeddings reversed inside CaptionStage would go unnoticed)."""
    import tarfile

    import pyarrow.parquet as pq

    from clipcap_core import synthetic
    from clipcap_core.captioner import Captioner
    from clipcap_core.encoders import preprocess_spec
    from clipcap_core.imaging import ImageResizer
    from pipelines.caption.stages import CaptionStage, inspect_model, read_decode_part
    from pipelines.clip_actor import ClipActor
    from pipelines.demo.run import write_archive

    archive = str(tmp_path / "imgs.tar")
    write_archive(archive, list(synthetic.generate(6, seed=3, size=48, start=20000)))
    cfg = sources.SourceConfig()
    [part] = sources.plan_parts(archive, cfg)
    info = inspect_model(trained_model)
    clip, cap = ClipActor(info.encoder, threads=1), CaptionStage(trained_model, DecodeConfig(), threads=1)
    out = str(tmp_path / "out")
    committer = PartCommitter(out, info.model_id, DecodeConfig())
    for block in read_decode_part(part, cfg, ImageResizer(preprocess_spec(info.encoder)), block_rows=4):
        committer.add(cap(clip(block)))
    got = {r["key"]: r["caption"] for r in pq.read_table(table_uri(out)).to_pylist()}
    with tarfile.open(archive) as tf:
        members = {f"imgs.tar/{m.name}": tf.extractfile(m).read() for m in tf if m.isfile()}
    captioner = Captioner.from_pretrained(trained_model)
    want = {key: captioner.caption(images=[data])[0] for key, data in members.items()}
    assert got == want
    assert len(set(want.values())) >= 3, f"the model does not tell the images apart: {want}"

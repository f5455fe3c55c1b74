"""Bulk captioning without Ray: stage functions, part commits, config plumbing, job-level checks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core import uris
from clipcap_core.decoding import DecodeConfig
from pipelines.caption.output import PartCommitter, layout
from pipelines.caption.stages import STAGE_SCHEMA, read_decode_part
from pipelines.io import schemas, sources, storage
from tests.pipelines.image_zoo import good_images, write_mixed_input


def _stage_rows(part_id: str, rows: list[tuple[int, str, list[str] | None, str | None]], total: int | None):
    """Final-stage rows: (index, key, captions or None, error or None); a marker when total is given."""
    cols: dict[str, list] = {n: [] for n in ("part_id", "index", "key", "source", "error", "stage", "total",
                                             "captions", "scores")}
    for index, key, caps, err in rows + ([(-1, "", None, None)] if total is not None else []):
        cols["part_id"].append(part_id)
        cols["index"].append(index)
        cols["key"].append(key)
        cols["source"].append("src")
        cols["error"].append(err)
        cols["stage"].append("decode" if err else None)
        cols["total"].append(total if index < 0 else -1)
        cols["captions"].append(caps)
        cols["scores"].append([-1.0 - r for r in range(len(caps))] if caps else None)
    return pa.table(cols)


def test_committer_waits_for_every_row_dedups_retries_and_writes_ranked_rows(tmp_path):
    out = str(tmp_path / "out")
    c = PartCommitter(out, "tiny@abc", DecodeConfig(strategy="beam", n=2))
    assert c.add(_stage_rows("p1", [(1, "b.jpg", ["x b", "y b"], None)], total=None)) == []
    # the marker arrives before the last row; a retried task re-sends row 1
    assert c.add(_stage_rows("p1", [(1, "b.jpg", ["x b", "y b"], None)], total=3)) == []
    assert not uris.exists(layout(out).part("p1"))
    done = c.add(_stage_rows("p1", [(0, "a.jpg", ["x a", "y a"], None), (2, "c.jpg", None, "not an image")], None))
    assert done == [("p1", 3, 2, 4)] and c.pending() == []
    table = pq.read_table(layout(out).part("p1"))
    assert table.schema.remove_metadata() == schemas.CAPTIONS_SCORED_SCHEMA
    assert table.column("key").to_pylist() == ["a.jpg", "a.jpg", "b.jpg", "b.jpg"]
    assert table.column("rank").to_pylist() == [0, 1, 0, 1]
    assert table.column("caption").to_pylist()[:2] == ["x a", "y a"]
    assert set(table.column("model").to_pylist()) == {"tiny@abc"}
    assert schemas.read_metadata(table.schema)[schemas.META_PART] == "p1"
    errors = pq.read_table(layout(out).errors("p1"))
    assert errors.to_pylist() == [{"key": "c.jpg", "source": "src", "stage": "decode", "error": "not an image"}]
    assert c.add(_stage_rows("p1", [(1, "b.jpg", ["x b", "y b"], None)], total=None)) == []  # late copy: dropped
    assert c.pending() == []
    # recommitting the part without errors (an overwrite run) removes the stale errors file
    PartCommitter(out, "tiny@abc", DecodeConfig()).add(_stage_rows("p1", [(0, "a.jpg", ["x a", "y a"], None)], total=1))
    assert not uris.exists(layout(out).errors("p1"))


def test_empty_part_is_marked_done_under_meta_without_a_0_row_part_file(tmp_path):
    out = str(tmp_path / "out")
    c = PartCommitter(out, "m@1", DecodeConfig())
    assert c.add(_stage_rows("p0", [], total=0)) == [("p0", 0, 0, 0)]
    assert c.add(_stage_rows("p1", [(0, "a.jpg", None, "not an image")], total=1)) == [("p1", 1, 0, 0)]
    assert not uris.exists(layout(out).part("p0")) and not uris.exists(layout(out).part("p1"))
    assert uris.exists(layout(out).empty("p0")) and uris.exists(layout(out).errors("p1"))
    assert layout(out).done() == {"p0", "p1"}


@pytest.fixture(scope="module")
def tiny_resizer():
    from clipcap_core.encoders import EncoderConfig, preprocess_spec
    from clipcap_core.imaging import ImageResizer

    return ImageResizer(preprocess_spec(EncoderConfig()))


def test_read_decode_part_emits_pixels_errors_and_a_marker(tmp_path, tiny_resizer):
    expect = write_mixed_input(tmp_path, base_url=None, dim=8, clip_model="tiny")
    cfg = sources.SourceConfig(part_size=100)
    size = tiny_resizer.spec.size
    seen = {}
    for part in sources.plan_parts(str(tmp_path), cfg):
        blocks = list(read_decode_part(part, cfg, tiny_resizer, block_rows=4))
        table = pa.concat_tables(blocks)
        assert table.schema == STAGE_SCHEMA and all(b.num_rows <= 5 for b in blocks)
        marker = table.filter(pa.compute.less(table.column("index"), 0)).to_pylist()
        members = table.filter(pa.compute.greater_equal(table.column("index"), 0)).to_pylist()
        assert len(marker) == 1 and marker[0]["total"] == len(members)
        assert [m["index"] for m in members] == list(range(len(members)))
        for m in members:
            ok = m["error"] is None
            if ok:
                assert len(m["pixels"]) == size * size * 3 or len(m["embedding"]) == 8 * 4
            seen.setdefault(m["key"], ok)
    assert seen == expect


def test_cli_flags_fill_the_nested_config(tmp_path):
    from clipcap_core.configs import ConfigError
    from pipelines.cli import caption_config as config_from_args
    from pipelines.cli import command_parser

    parser = command_parser("caption")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("input: in\noutput: out\nmodel: m\nresources: {clip_actors: 3}\ndecoding: {beam_size: 4}\n")
    args = parser.parse_args(["--config", str(cfg_file), "--strategy", "beam", "--num-captions", "2",
                              "--gpus-per-actor", "0.5", "--part-size", "10", "--overwrite"])
    cfg = config_from_args(args)
    assert (cfg.input, cfg.output, cfg.overwrite) == ("in", "out", True)
    assert (cfg.decoding.strategy, cfg.decoding.n, cfg.decoding.beam_size) == ("beam", 2, 4)
    assert (cfg.resources.clip_actors, cfg.resources.gpus_per_actor, cfg.source.part_size) == (3, 0.5, 10)
    with pytest.raises(ConfigError, match="greedy"):
        config_from_args(parser.parse_args(["--input", "i", "--output", "o", "--model", "m", "--num-captions", "2"]))
    with pytest.raises(ConfigError, match="input"):
        config_from_args(parser.parse_args(["--output", "o", "--model", "m"]))
    with pytest.raises(ConfigError, match="--model is required.*clipcap train"):
        config_from_args(parser.parse_args(["--input", "i", "--output", "o"]))


# --- job-level faults: clear errors before any work -------------------------------------------------------------
def _emb_table(path, dim: int, clip_model: str = "tiny") -> None:
    meta = schemas.embedding_metadata(clip_model=clip_model, clip_pretrained=None, dim=dim, dtype="float32",
                                      preprocess="test")
    emb = np.zeros((2, dim), np.float32)
    pq.write_table(pa.table({"key": ["a", "b"], "caption": [None, None], "url": [None, None],
                             "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim)},
                            schema=schemas.with_metadata(schemas.embedding_schema(dim), meta)), path)


def _cfg(inp, out, **kw):
    from pipelines.caption.job import CaptionConfig

    kw.setdefault("model", "tiny")
    kw.setdefault("allow_untrained", True)
    return CaptionConfig(input=str(inp), output=str(out), **kw)


def test_job_level_faults_raise_before_any_work(tmp_path):
    from pipelines.caption.job import prepare

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(good_images()["rgb.jpg"])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="cannot use model"):
        prepare(_cfg(tmp_path / "in", out, model=str(tmp_path / "no-model")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(_cfg(tmp_path / "missing", out))
    with pytest.raises(OSError, match="not writable"):
        prepare(_cfg(tmp_path / "in", "s3x://bad/out"))
    from clipcap_core.presets import preset_config

    dim = preset_config("tiny").clip_dim
    _emb_table(tmp_path / "emb_wrong.parquet", dim + 8)
    with pytest.raises(ValueError, match=f"dimension mismatch.*D={dim + 8}.*clip_dim={dim}"):
        prepare(_cfg(tmp_path / "emb_wrong.parquet", out))
    _emb_table(tmp_path / "emb_other.parquet", dim, clip_model="ViT-B-32")
    with pytest.raises(ValueError, match="made with CLIP 'ViT-B-32'"):
        prepare(_cfg(tmp_path / "emb_other.parquet", out))
    assert not out.exists() or not any(out.rglob("*.parquet")) and not any(out.rglob("*.json"))


def test_rerun_is_refused_when_the_model_or_input_changed_and_overwrite_clears(tmp_path):
    from pipelines.caption.job import prepare

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(good_images()["rgb.jpg"])
    out = tmp_path / "out"
    plan = prepare(_cfg(tmp_path / "in", out))
    assert [p.part_id for p in plan.todo] == ["images-00000"]
    PartCommitter(str(out), plan.model_id, DecodeConfig()).add(
        _stage_rows("images-00000", [(0, "a.jpg", ["x"], None)], total=1))
    assert prepare(_cfg(tmp_path / "in", out)).todo == []  # done parts are skipped
    with pytest.raises(ValueError, match="different model"):
        prepare(_cfg(tmp_path / "in", out, model="tiny-transformer"))
    (tmp_path / "in" / "b.jpg").write_bytes(good_images()["rgb.jpg"])
    with pytest.raises(ValueError, match="plan_digest"):
        prepare(_cfg(tmp_path / "in", out))
    again = prepare(_cfg(tmp_path / "in", out, overwrite=True))
    assert [p.part_id for p in again.todo] == ["images-00000"] and not list(out.rglob("part-*.parquet"))


def test_underscore_files_are_captioned_and_skipped_files_are_counted_in_the_summary(tmp_path):
    from pipelines.caption.job import caption_archive, prepare

    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "_meta").mkdir(parents=True)
    for rel in ("_DSC0001.JPG", "b.jpg", ".DS_Store", "_meta/run.json"):
        (inp / rel).write_bytes(good_images()["rgb.jpg"])
    plan = prepare(_cfg(inp, out))
    assert [f.rel for p in plan.parts for f in p.files] == ["_DSC0001.JPG", "b.jpg"]
    PartCommitter(str(out), plan.model_id, DecodeConfig()).add(
        _stage_rows("images-00000", [(0, "_DSC0001.JPG", ["x"], None), (1, "b.jpg", ["y"], None)], total=2))
    summary = caption_archive(_cfg(inp, out))  # every part done: no Ray needed
    assert (summary.files_skipped, summary.files_skipped_first) == (2, [".DS_Store", "_meta/run.json"])
    assert storage.read_json(storage.join(str(out), "_meta/summary.json"))["files_skipped"] == 2


def test_cli_reports_job_level_faults_in_one_line(tmp_path, capsys):
    from pipelines.cli import main

    code = main(["caption", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--model", "tiny",
                 "--allow-untrained"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_caption_pools_fit_the_cluster_or_fail_clearly():
    from pipelines.caption.job import ResourceOptions
    from pipelines.runtime import ClusterShape

    big, two = ClusterShape(16.0, 0.0, (16.0,)), ClusterShape(2.0, 0.0, (2.0,))
    res = ResourceOptions(stages="split", clip_actors=1, caption_actors=2, cpus_per_actor=2.0, read_cpus=1.0,
                          torch_threads=3)
    clip, cap = res.pools(True, big)
    assert (clip.actors, cap.actors, clip.cpus_per_actor, cap.torch_threads) == (1, 2, 2.0, 3)
    clip, cap = res.pools(True, two)  # 3 actors x 2 CPUs + 1 read CPU > 2: reservations scaled, threads kept
    assert 3 * cap.cpus_per_actor + cap.read_cpus == pytest.approx(2.0) and cap.torch_threads == 3
    # both pools together (not each alone) fit the cluster, with one read task beside them
    assert clip.actors * clip.cpus_per_actor + cap.actors * cap.cpus_per_actor + cap.read_cpus == pytest.approx(2.0)
    clip, cap = res.pools(False, big)  # embedding tables: no CLIP pool at all
    assert clip is None and cap.actors == 2
    # the default on one CPU node: the fused single-thread actor per core, as concurrent batches of one actor
    clip, cap = ResourceOptions().pools(True, two)
    assert clip is None and (cap.actors, cap.calls_per_actor, cap.torch_threads, cap.cpus_per_actor,
                             cap.read_cpus) == (1, 2, 1, 1.0, 1.0)
    clip, cap = ResourceOptions().pools(True, ClusterShape(8.0, 0.0, (4.0, 4.0)))  # two nodes: an actor per core
    assert (cap.actors, cap.calls_per_actor) == (8, 1)
    clip, cap = ResourceOptions(caption_actors=2).pools(True, two)  # an explicit count is kept as actors
    assert (cap.actors, cap.calls_per_actor) == (2, 1)
    clip, cap = ResourceOptions(stages="split").pools(True, two)  # two pools split the cores
    assert clip.torch_threads == cap.torch_threads == 1
    with pytest.raises(ValueError, match="GPU"):
        ResourceOptions(gpus_per_actor=1.0).pools(True, ClusterShape(8.0, 0.0, (8.0,)))
    with pytest.raises(ValueError, match=">= 0"):
        ResourceOptions(caption_actors=-1)


@pytest.mark.parametrize("strategy,n", [("greedy", 1), ("beam", 2), ("sample", 3)])
def test_caption_stage_gives_n_ranked_captions_per_embedding(strategy, n):
    from clipcap_core.presets import preset_config
    from pipelines.caption.stages import CaptionStage

    dim = preset_config("tiny").clip_dim
    stage = CaptionStage("tiny", DecodeConfig(strategy=strategy, n=n, beam_size=3, max_length=6), threads=1)
    emb = np.random.default_rng(0).standard_normal((2, dim)).astype(np.float32)
    table = pa.table({"key": ["a", "err", "b"], "error": [None, "bad", None],
                      "embedding": [emb[0].tobytes(), b"", emb[1].tobytes()]})
    out = stage(table).to_pylist()
    assert [len(r["captions"] or []) for r in out] == [n, 0, n]
    assert out[1]["captions"] is None and out[1]["error"] == "bad"
    for r in (out[0], out[2]):
        assert all(isinstance(c, str) for c in r["captions"]) and len(r["scores"]) == n
        if strategy == "beam":
            assert r["scores"] == sorted(r["scores"], reverse=True)


def _done_run(tmp_path, names: list[str], captions: dict[str, list[str]]) -> list[str]:
    """A caption run whose only part is already committed (beam, 2 captions): the CLI then needs no Ray."""
    from pipelines.caption.job import prepare

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for name in names:
        (inp / name).write_bytes(good_images()["rgb.jpg"])
    beam = DecodeConfig(strategy="beam", n=2, beam_size=2)
    plan = prepare(_cfg(inp, out, decoding=beam))
    rows = [(i, name, captions.get(name, [f"{name} one", f"{name} two"]), None) for i, name in enumerate(sorted(names))]
    PartCommitter(str(out), plan.model_id, beam).add(_stage_rows("images-00000", rows, total=len(names)))
    return ["caption", "--input", str(inp), "--output", str(out), "--model", "tiny", "--allow-untrained",
            "--strategy", "beam", "--num-captions", "2", "--beam-size", "2"]


def test_cli_shows_the_rank0_captions_of_a_small_run_sorted_by_key(tmp_path, capsys):
    from pipelines.cli import main

    argv = _done_run(tmp_path, ["c.jpg", "a.jpg", "b.jpg"], {"b.jpg": ["b\tone\nline", "b two"]})
    assert main(argv) == 0  # default: every caption of a run of at most 20 images
    assert capsys.readouterr().out.splitlines()[-3:] == ["a.jpg\ta.jpg one", "b.jpg\tb one line", "c.jpg\tc.jpg one"]
    assert main([*argv, "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-2:] == ["a.jpg\ta.jpg one", "b.jpg\tb one line"] and "c.jpg\t" not in out
    assert main([*argv, "--show", "0"]) == 0 and "\t" not in capsys.readouterr().out
    assert main([*argv, "--show", "-1"]) == 2 and "--show must be >= 0" in capsys.readouterr().err


def test_cli_shows_no_captions_of_a_larger_run_unless_asked(tmp_path, capsys):
    from pipelines.cli import main

    argv = _done_run(tmp_path, [f"{i:02d}.jpg" for i in range(21)], {})
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "\t" not in captured.out and "21 images captioned" in captured.err and "--show K" in captured.err
    assert main([*argv, "--show", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-3:] == [f"{i:02d}.jpg\t{i:02d}.jpg one" for i in range(3)]

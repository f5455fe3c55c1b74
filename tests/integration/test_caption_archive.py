"""Bulk captioning on the real local Ray head and S3 server with a trained tiny model: every input kind with
bad members, reruns, a run killed midway, and each key's caption is the one of its own image."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core import uris
from pipelines.caption.job import CaptionConfig, ResourceOptions, caption_archive
from pipelines.caption.output import meta_uri, table_uri
from pipelines.io import storage
from pipelines.io.sources import SourceConfig
from tests.pipelines.image_zoo import DUP_ERROR_KEYS, write_mixed_input

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# Small parts and batches so that parts commit one after another (the killed-run test needs a window);
# fractional CPUs so the read tasks and both actor pools fit the 2-CPU test cluster.
PART_SIZE = 3
FLAGS = {"clip_batch_size": 4, "caption_batch_size": 4, "decode_block_rows": 4, "read_cpus": 0.25,
         "cpus_per_actor": 0.5}


def _config(inp: str, out: str, model: str, **resources: object) -> CaptionConfig:
    # the URL rows point at the local HTTP server on 127.0.0.1: a private host, fetched only with the opt-in
    return CaptionConfig(input=inp, output=out, model=model,
                         source=SourceConfig(part_size=PART_SIZE, allow_private_urls=True),
                         resources=ResourceOptions(**{**FLAGS, **resources}), progress_interval_s=2.0)


def _read_dir(uri: str) -> pa.Table | None:
    fs, path = uris.filesystem(uri)
    fs.invalidate_cache()
    files = storage.list_files(uri, ".parquet")
    tables = []
    for f in files:
        with fs.open(uris.filesystem(f)[1], "rb") as fh:
            tables.append(pq.read_table(fh).replace_schema_metadata(None))
    return pa.concat_tables(tables) if tables else None


def _canonical(out: str) -> tuple[list[tuple], list[tuple]]:
    caps, errs = _read_dir(table_uri(out)), _read_dir(meta_uri(out, "errors"))
    cap_rows = sorted((r["key"], r["rank"], r["caption"], round(r["score"], 3), r["model"]) for r in caps.to_pylist())
    err_rows = sorted((r["key"], r["source"], r["stage"], r["error"]) for r in errs.to_pylist())
    return cap_rows, err_rows


def _committed(out: str) -> list[str]:
    """Part files now under ``out`` (listing races the run's own write probe: vanished prefix = none yet)."""
    fs, _ = uris.filesystem(out)
    fs.invalidate_cache()
    try:
        return storage.list_files(table_uri(out), ".parquet")
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def mixed_on_s3(s3_server, http_server, tmp_path_factory):
    """The every-kind input (URL rows served by the local HTTP server), uploaded to the S3 server."""
    sub = f"caption-{uuid.uuid4().hex[:8]}"
    local = Path(http_server.root) / sub
    from clipcap_core.presets import preset_config

    dim = preset_config("tiny").clip_dim
    expect = write_mixed_input(local, base_url=f"{http_server.base_url}/{sub}", dim=dim, clip_model="tiny")
    prefix = f"s3://clipcap/{sub}"
    fs, base = uris.filesystem(prefix)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{base}/input/{p.relative_to(local).as_posix()}", p.read_bytes())
    return f"{prefix}/input", prefix, expect


@pytest.fixture(scope="module")
def first_run(ray_cluster, mixed_on_s3, trained_model):
    inp, prefix, expect = mixed_on_s3
    out = f"{prefix}/captions/full"
    return out, caption_archive(_config(inp, out, trained_model))


# Inputs that cannot be read (a truncated tar, a broken zip, a broken Parquet file): their parts are not
# committed (an outage or a half-copied file must not become "done"); the run exits 4 naming them.
UNREADABLE = ("archives/broken.zip", "archives/cut.tar", "tables/broken.parquet")


def _committed_expect(expect: dict[str, bool]) -> dict[str, bool]:
    return {k: ok for k, ok in expect.items() if not k.startswith(UNREADABLE)}


def test_every_kind_is_captioned_and_every_bad_member_is_an_error_row(first_run, mixed_on_s3):
    out, summary = first_run
    _, _, expect_all = mixed_on_s3
    expect = _committed_expect(expect_all)
    caps, errs = _read_dir(table_uri(out)), _read_dir(meta_uri(out, "errors"))
    members = len(expect) + len(DUP_ERROR_KEYS)
    assert caps.num_rows + errs.num_rows == members
    cap_keys = caps.column("key").to_pylist()
    assert len(cap_keys) == len(set(cap_keys))  # unique
    assert set(cap_keys) == {k for k, ok in expect.items() if ok}
    assert set(errs.column("key").to_pylist()) == {k for k, ok in expect.items() if not ok} | set(DUP_ERROR_KEYS)
    assert all(c.strip() for c in caps.column("caption").to_pylist())  # a trained model says something
    assert set(caps.column("model").to_pylist()) == {summary.model} and "@" in summary.model
    assert (summary.images, summary.captions, summary.errors) == (members, caps.num_rows, errs.num_rows)
    assert summary.parts_done == summary.parts_total - len(UNREADABLE) > 10 and summary.parts_skipped == 0
    assert sorted(why.split(": ", 1)[0].rsplit("/input/", 1)[1] for why in summary.parts_failed.values()) \
        == sorted(UNREADABLE) and summary.exit_code == 4
    assert set(summary.stage_seconds) == set(summary.stage_cpu_seconds) == {"read", "clip", "caption"}
    stages = dict(zip(errs.column("key").to_pylist(), errs.column("stage").to_pylist(), strict=False))
    assert stages["tables/urls.parquet/#1"] == "fetch" and stages["images/bad/bomb.png"] == "decode"
    assert storage.read_json(meta_uri(out, "summary.json"))["images"] == members


def test_rerun_adds_nothing(first_run, mixed_on_s3, trained_model):
    out, _ = first_run
    inp, _, _ = mixed_on_s3
    before = _canonical(out)
    files_before = storage.list_files(table_uri(out), ".parquet")
    again = caption_archive(_config(inp, out, trained_model))
    # only the unreadable parts are tried again (and fail again)
    assert again.parts_done == 0 and again.images == 0 and again.parts_skipped == again.parts_total - len(UNREADABLE)
    assert len(again.parts_failed) == len(UNREADABLE) and again.exit_code == 4
    assert storage.list_files(table_uri(out), ".parquet") == files_before
    assert _canonical(out) == before


@pytest.mark.slow  # `make test-slow`: out of `make test`, which must stay well under 20 min on 2 cores
def test_run_killed_midway_then_rerun_equals_an_uninterrupted_run(first_run, mixed_on_s3, ray_cluster,
                                                                   trained_model):
    full_out, summary = first_run
    inp, prefix, _ = mixed_on_s3
    out = f"{prefix}/captions/killed"
    cmd = [sys.executable, "-m", "pipelines.cli", "caption", "--input", inp, "--output", out,
           "--model", trained_model, "--part-size", str(PART_SIZE), "--ray-address", ray_cluster["gcs"],
           "--allow-private-urls"]
    for name, value in FLAGS.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed: list[str] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            committed = _committed(out)
            if committed:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run, without any chance to clean up
        proc.wait()
    assert committed, f"no part committed before the kill: {proc.stderr.read().decode()[-2000:]}"
    at_kill = _committed(out)
    assert 0 < len(at_kill) < summary.parts_total, "the run was not interrupted midway"
    rerun = caption_archive(_config(inp, out, trained_model))
    assert rerun.parts_skipped == len(at_kill)
    assert rerun.parts_done == summary.parts_total - len(UNREADABLE) - len(at_kill)
    assert _canonical(out) == _canonical(full_out)


@pytest.mark.parametrize("stages", ["fused", "split"])
def test_each_key_gets_the_caption_of_its_own_image(ray_cluster, s3_uri, trained_model, stages):
    """Every key gets its own image's caption (embeddings reversed in CaptionStage would land captions on other
    keys). Both layouts: CLIP + captioner in one actor (the default; CLIP batches of 3 inside caption batches of 4,
    so the fused actor's slicing is exercised) and a CLIP pool feeding a captioning pool."""
    import io
    import tarfile

    from clipcap_core import synthetic
    from clipcap_core.captioner import Captioner
    from pipelines.demo.run import write_archive

    samples = list(synthetic.generate(8, seed=3, size=48, start=20000))
    archive, out = f"{s3_uri}/in/imgs-{stages}.tar", f"{s3_uri}/out-{stages}"
    write_archive(archive, samples)
    summary = caption_archive(_config(archive, out, trained_model, stages=stages, clip_batch_size=3))
    rows = _read_dir(table_uri(out)).to_pylist()
    got = {r["key"]: r["caption"] for r in rows}
    fs, path = uris.filesystem(archive)
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tf:
        members = {f"imgs-{stages}.tar/{m.name}": tf.extractfile(m).read() for m in tf if m.isfile()}
    captioner = Captioner.from_pretrained(trained_model)
    want = {key: captioner.caption(images=[data])[0] for key, data in members.items()}
    assert summary.images == len(samples) and got == want
    assert len(set(want.values())) >= 3, f"the model does not tell the images apart: {want}"
    # CLIPScore of each row: its own image against its own caption (the fused actor reuses its CLIP for the text)
    from clipcap_core.metrics import ClipScorer

    keys = list(members)
    scores = ClipScorer(captioner.encoder).score(captioner.embed_images([members[k] for k in keys]),
                                                 [want[k] for k in keys]).clip_score
    by_key = {r["key"]: r["clip_score"] for r in rows}
    assert [by_key[k] for k in keys] == pytest.approx(scores.tolist(), abs=1e-4)


def test_demo_step_captions_heldout_synthetic_images(ray_cluster, s3_uri, trained_model):
    from clipcap_core import synthetic
    from pipelines.demo.run import caption_heldout

    samples = list(synthetic.generate(6, seed=1, size=48, start=5000))
    lines: list[str] = []
    report = caption_heldout(s3_uri, trained_model, samples, show=3, echo=lines.append,
                             resources=ResourceOptions(**FLAGS))
    assert report["images"] == 6 and report["errors"] == 0 and 0.0 <= report["exact_match"] <= 1.0
    assert sum("true: " in line for line in lines) == 3 and lines[-1].startswith("exact match")
    assert samples[0].caption in "\n".join(lines)

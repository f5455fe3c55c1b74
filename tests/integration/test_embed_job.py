"""jobs/embed_cc3m.py end to end: `ray job submit` to the real local Ray head, URL list served over HTTP,
img2dataset (Ray distributor) and embedding tables on the local S3 server; reruns, a killed run, job faults."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core import synthetic, uris
from pipelines.io import schemas, storage

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
N_GOOD = 40
JOB_FLAGS = ["--dataset", "syn", "--clip", "tiny", "--shard-size", "16", "--image-size", "64", "--resize-mode",
             "no", "--encode-format", "png", "--threads", "4", "--batch-size", "16", "--torch-threads", "1",
             "--allow-private-urls"]  # the test HTTP server is on 127.0.0.1


def _table(uri: str) -> pa.Table:
    fs, _ = uris.filesystem(uri)
    fs.invalidate_cache()
    return pa.concat_tables([pq.read_table(f) for f in storage.list_files(uri, ".parquet")])


def _etags(uri: str) -> dict[str, str]:
    fs, path = uris.filesystem(uri)
    fs.invalidate_cache()
    return {p: fs.info(p)["ETag"] for p in fs.find(path)}


def submit(cluster: dict, s3_env: dict, args: list[str]) -> tuple[str, str]:
    """``ray job submit`` the embed job; returns (final status, driver logs)."""
    from ray.job_submission import JobSubmissionClient

    runtime_env = {"env_vars": {**s3_env, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"},
                   "excludes": [".git", ".venv", "data", "**/__pycache__", ".pytest_cache", "benchmarks/results"]}
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", cluster["dashboard"],
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
           sys.executable, "jobs/embed_cc3m.py", *args]
    env = cluster["env"]  # the head's token (our local heads keep token auth on)
    for _ in range(30):  # a fresh head's job agent comes up some seconds after the dashboard
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(2)
    match = re.search(r"raysubmit_\w+", proc.stdout + proc.stderr)
    assert match, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = JobSubmissionClient(cluster["dashboard"])
    return str(client.get_job_status(match.group(0))), client.get_job_logs(match.group(0))


def _result(logs: str) -> dict:
    line = next(x for x in logs.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def url_list(http_server) -> Path:
    """40 synthetic images, a 404 and a non-image, as CC3M's headerless caption<TAB>url TSV over HTTP."""
    folder = http_server.root / f"job-{uuid.uuid4().hex[:6]}"
    base = f"{http_server.base_url}/{folder.name}"
    tsv = synthetic.write_url_list(folder, N_GOOD, base, seed=21)
    (folder / "images" / "readme.png").write_text("plain text, not an image")
    with open(tsv, "a") as f:
        f.write(f"gone\t{base}/images/gone.png\ntext file\t{base}/images/readme.png\n")
    return tsv


@pytest.fixture(scope="module")
def submitted(ray_cluster, s3_server, url_list):
    root = f"s3://clipcap/embed-job-{uuid.uuid4().hex[:8]}"
    args = ["--input", str(url_list), "--output", root, *JOB_FLAGS]
    status, logs = submit(ray_cluster, s3_server.env(), args)
    assert status == "SUCCEEDED", logs[-4000:]
    return root, args, logs


def test_submitted_job_writes_the_embedding_table(submitted):
    root, _, logs = submitted
    result = _result(logs)
    assert result["download"]["successes"] == N_GOOD and result["download"]["count"] == N_GOOD + 2
    table_uri = storage.join(root, "embeddings", "syn", "tiny")
    table = _table(table_uri)
    assert table.num_rows == result["embed"]["rows"] == N_GOOD
    assert schemas.validate_embedding_schema(table.schema) == 128
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == len(keys)
    emb = np.asarray(table.column("image_embedding").combine_chunks().flatten()).reshape(-1, 128)
    assert np.isfinite(emb).all()
    assert sorted(table.column("caption").to_pylist()) == sorted(s.caption for s in synthetic.generate(N_GOOD, seed=21))
    errors = _table(storage.join(root, "_meta", "embeddings", "syn", "tiny", "errors")).to_pylist()
    assert sorted(e["stage"] for e in errors) == ["download", "download"]
    assert len(storage.list_files(storage.join(root, "raw", "syn"), ".tar")) == 3  # 42 URLs / 16 per shard


def test_resubmitted_job_writes_nothing_new(submitted, ray_cluster, s3_server):
    root, args, _ = submitted
    before = _etags(root)
    status, logs = submit(ray_cluster, s3_server.env(), args)
    assert status == "SUCCEEDED", logs[-4000:]
    result = _result(logs)
    assert result["embed"]["written"] == 0 and result["embed"]["skipped"] == 3
    assert _etags(root) == before


@pytest.mark.slow  # `make test-slow`: out of `make test`, which must stay well under 20 min on 2 cores
def test_killed_run_then_rerun_has_no_duplicates(ray_cluster, s3_server, tmp_path):
    """SIGKILL the job driver after its first committed shard; the rerun commits the rest exactly once."""
    from clipcap_core.encoders import EncoderConfig
    from pipelines.embed.job import EmbedConfig, EmbedResources, run_embed
    from tests.pipelines.test_embed import good_samples, write_shard

    raw = tmp_path / "raw"  # a small first shard, then two large ones: a window to kill the run midway
    raw.mkdir()
    sizes = {"00000": 4, "00001": 120, "00002": 120}
    start = 0
    for name, n in sizes.items():
        write_shard(raw / f"{name}.tar", good_samples(n, start))
        start += n
    out = f"s3://clipcap/embed-killed-{uuid.uuid4().hex[:8]}"
    table_uri = storage.join(out, "embeddings", "syn", "tiny")
    flags = ["--skip-download", "--raw", str(raw), "--output", out, "--dataset", "syn", "--clip", "tiny",
             "--batch-size", "4", "--torch-threads", "1", "--ray-address", ray_cluster["gcs"]]
    proc = subprocess.Popen([sys.executable, "jobs/embed_cc3m.py", *flags], cwd=ROOT, env=dict(os.environ),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not committed:
            committed = _parts(table_uri)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run, without any chance to clean up
        proc.wait()
    assert committed and proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    at_kill = _parts(table_uri)
    assert 0 < len(at_kill) < 3, "the run was not interrupted midway"
    cfg = EmbedConfig(input=str(raw), output_root=out, dataset="syn", encoder=EncoderConfig(model_name="tiny"),
                      resources=EmbedResources(batch_size=32, torch_threads=1))
    rerun = run_embed(cfg)
    assert rerun.skipped == len(at_kill) and rerun.written == 3 - len(at_kill)
    keys = _table(table_uri).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == sum(sizes.values())


def _parts(table_uri: str) -> list[str]:
    fs, _ = uris.filesystem(table_uri)
    fs.invalidate_cache()
    try:
        return storage.list_files(table_uri, ".parquet")
    except FileNotFoundError:
        return []


def _run_job(argv: list[str], capsys) -> tuple[int, str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("embed_cc3m_job", ROOT / "jobs" / "embed_cc3m.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    rc = module.main(argv)
    return rc, capsys.readouterr().err


def test_job_faults_fail_before_any_work(url_list, s3_server, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--input", str(url_list), "--output", str(out), *JOB_FLAGS]
    rc, err = _run_job([*base, "--clip", "ViT-Nope"], capsys)
    assert rc == 2 and "unknown CLIP model name 'ViT-Nope'" in err
    bad_list = tmp_path / "list.csv"
    bad_list.write_text("link,caption\nhttp://127.0.0.1:9/a.png,a\n")
    rc, err = _run_job(["--input", str(bad_list), "--output", str(out), *JOB_FLAGS], capsys)
    assert rc == 2 and "no column(s) ['url']" in err
    assert not (out / "raw").exists() and not (out / "embeddings").exists()
    rc, err = _run_job(["--input", str(url_list), "--output", "s3://no-such-bucket-clipcap/x", *JOB_FLAGS],
                       capsys)
    assert rc == 2 and "not writable" in err

"""Fault tests (marked ``faults``): S3 that fails a fraction of its requests and is restarted mid-job.

The embed command runs end to end in its own process and its own local Ray instance, whose workers inherit the
proxy endpoint, so *every* S3 request (input listing, shard reads in the decode tasks, part commits, the
write probe) goes through ``FlakyProxy``: every 7th request is answered ``503 SlowDown`` and the proxy is
restarted (down 1 s) once the first shard is committed. The table must hold exactly the expected rows.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core import synthetic, uris
from pipelines.io import storage
from tests.faults.cluster_driver import short_ray_tmp
from tests.faults.flaky_proxy import FlakyProxy

pytestmark = [pytest.mark.integration, pytest.mark.faults]
ROOT = Path(__file__).resolve().parents[2]
SHARDS, PER_SHARD = 4, 6


def _shard(samples) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            png = io.BytesIO()
            s.image.save(png, format="PNG")
            for ext, data in (("png", png.getvalue()), ("txt", s.caption.encode()),
                              ("json", json.dumps({"key": s.key}).encode())):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_embed_through_flaky_restarted_s3_gives_every_row_once(s3_server, tmp_path):
    prefix = f"s3://clipcap/faults-{uuid.uuid4().hex[:8]}"
    fs, base = uris.filesystem(prefix)
    keys = []
    for i in range(SHARDS):
        samples = list(synthetic.generate(PER_SHARD, seed=5, size=32, start=i * PER_SHARD))
        keys += [s.key for s in samples]
        fs.pipe_file(f"{base}/raw/{i:05d}.tar", _shard(samples))
    proxy = FlakyProxy(s3_server.endpoint, fail_every=7).start()
    with short_ray_tmp() as (ray_tmp, _killed):  # tmp_path is too deep for Ray's socket paths
        out, returncode, mid_job = _run_embed(prefix, proxy, fs, ray_tmp)
    assert returncode == 0, out[-4000:]
    assert mid_job and proxy.restarts == 1 and proxy.failed >= 3, (proxy.failed, proxy.forwarded)
    print(f"flaky S3: {proxy.failed} injected 503s, {proxy.forwarded} forwarded, {proxy.restarts} restart(s)")
    fs.invalidate_cache()
    table = f"{prefix}/out/embeddings/f/tiny"
    files = storage.list_files(table, ".parquet")
    got = pa.concat_tables([pq.read_table(fs.open(uris.filesystem(f)[1], "rb")) for f in files])
    assert len(files) == SHARDS and sorted(got.column("key").to_pylist()) == sorted(keys)  # 0 lost, 0 duplicated


def _run_embed(prefix: str, proxy: FlakyProxy, fs, ray_tmp: str) -> tuple[str, int, bool]:
    """``clipcap embed`` through the proxy in its own process; the proxy restarts once the first shard is in."""
    env = dict(os.environ, AWS_ENDPOINT_URL=proxy.endpoint, AWS_ENDPOINT_URL_S3=proxy.endpoint,
               RAY_TMPDIR=ray_tmp, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "embed", "--input", f"{prefix}/raw", "--output",
           f"{prefix}/out", "--dataset", "f", "--batch-size", "4", "--torch-threads", "1", "--ray-address", "local"]
    table = f"{prefix}/out/embeddings/f/tiny"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mid_job = False
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            fs.invalidate_cache()
            try:  # straight from moto, not through the proxy
                committed = len(storage.list_files(table, ".parquet"))
            except FileNotFoundError:  # the run's write probe may remove the prefix it made
                committed = 0
            if committed:
                mid_job = proc.poll() is None and committed < SHARDS  # the job still had shards to do
                proxy.restart(down_s=1.0)
                break
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.stop()
    return out, proc.returncode, mid_job

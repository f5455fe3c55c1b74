"""The local services the project starts for itself: S3 server, Ray head with jobs API, HTTP server."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage

pytestmark = pytest.mark.integration


def test_s3_server_round_trips_parquet_through_fsspec_and_pyarrow(s3_uri):
    table = pa.table({"key": ["a", "b"], "x": [1, 2]})
    uri = storage.join(s3_uri, "t/part-00000.parquet")
    storage.atomic_write_table(table, uri)
    assert pq.read_table(uri).equals(table)  # pyarrow's own S3 filesystem via from_uri
    assert storage.list_files(storage.join(s3_uri, "t"), ".parquet") == [uri]


def test_check_writable_names_missing_bucket(s3_server):
    with pytest.raises(OSError, match="not writable"):
        storage.check_writable("s3://no-such-bucket-xyz/out")


def test_ray_head_runs_tasks_and_exposes_jobs_api(ray_cluster):
    import ray

    @ray.remote
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    with urllib.request.urlopen(ray_cluster["dashboard"] + "/api/version", timeout=10) as r:
        assert "ray_version" in json.loads(r.read())


def test_http_server_serves_files(http_server):
    Path(http_server.root, "hello.txt").write_text("hi")
    with urllib.request.urlopen(http_server.base_url + "/hello.txt", timeout=5) as r:
        assert r.read() == b"hi"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(http_server.base_url + "/missing.txt", timeout=5)


def test_ray_head_script_rejects_unknown_option():
    script = Path(__file__).resolve().parents[2] / "infra" / "local" / "ray_head.sh"
    proc = subprocess.run([str(script), "start", "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option" in proc.stderr

"""Session fixtures: the real local services, started by the project's own infra scripts once per session.

- ``s3_server``: moto's S3 server on 127.0.0.1 (``infra.local.s3``) with bucket ``clipcap``; the AWS env
  variables point every client (s3fs, pyarrow, Ray, img2dataset) at it for the whole session.
- ``ray_cluster``: a Ray head started with ``infra/local/ray_head.sh`` (dashboard + jobs API on 127.0.0.1),
  connected to with ``ray.init(address=...)``; yields the dashboard URL for ``ray job submit``.
- ``http_server``: a static HTTP server on 127.0.0.1 (``infra.local.http``) over a temp folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def s3_server():
    from infra.local import s3

    server = s3.start(buckets=("clipcap",))
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        s3.stop(server.port)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_uri(s3_server, request):
    """A fresh ``s3://clipcap/<test-name>`` prefix on the local S3 server."""
    import uuid

    return f"s3://clipcap/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """A real local Ray head (started by infra/local/ray_head.sh) with the jobs API; yields its addresses."""
    import ray

    from infra.local.s3 import free_port

    temp_dir = str(tmp_path_factory.mktemp("ray"))
    gcs_port, dash_port = free_port(), free_port()
    env = dict(os.environ, RAY_TMPDIR=temp_dir)
    script = ROOT / "infra" / "local" / "ray_head.sh"
    subprocess.run(
        [str(script), "start", "--num-cpus", "2", "--port", str(gcs_port), "--dashboard-port", str(dash_port),
         "--temp-dir", temp_dir],
        check=True, env=env, capture_output=True,
    )
    gcs = f"127.0.0.1:{gcs_port}"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address=gcs, log_to_driver=False, runtime_env={"env_vars": dict(s3_server.env())})
    try:
        yield {"gcs": gcs, "dashboard": f"http://127.0.0.1:{dash_port}", "temp_dir": temp_dir}
    finally:
        ray.shutdown()
        subprocess.run([str(script), "stop", "--temp-dir", temp_dir], env=env, capture_output=True)


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    from infra.local import http

    root = tmp_path_factory.mktemp("http-root")
    server = http.start(root)
    server.root = root  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """URI of a tiny ClipCap model trained for seconds on synthetic images (its captions follow the image)."""
    from tests.pipelines.trained_model import train_tiny_artifact

    return train_tiny_artifact(str(tmp_path_factory.mktemp("trained") / "model"))

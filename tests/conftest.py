"""Session fixtures: the real local services, started by the project's own infra scripts once per session.

- ``s3_server``: moto's S3 server on 127.0.0.1 (``infra.local.s3``) with bucket ``clipcap``; the AWS env
  variables point every client (s3fs, pyarrow, Ray, img2dataset) at it for the whole session.
- ``ray_cluster``: a Ray head started with ``infra/local/ray_head.sh`` (every port on 127.0.0.1, token auth on),
  connected to with ``ray.init(address=...)``; yields the dashboard URL and the client env for ``ray job submit``.
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
    """A real local Ray head (started by infra/local/ray_head.sh: loopback only, token auth on), connected to
    with ``ray.init(address=...)``. Yields its addresses and ``env``, the client variables (token path, auth
    mode, loopback mode, RAY_ADDRESS / RAY_API_SERVER_ADDRESS) for subprocesses such as ``ray job submit``.
    The auth and loopback variables are also set in this process for the session (restored afterwards)."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state

    from infra.local import ray_head
    from infra.local.s3 import free_port

    temp_dir = str(tmp_path_factory.mktemp("ray"))
    gcs_port, dash_port = free_port(), free_port()
    script = ROOT / "infra" / "local" / "ray_head.sh"
    proc = subprocess.run(
        [str(script), "start", "--num-cpus", "2", "--port", str(gcs_port), "--dashboard-port", str(dash_port),
         "--temp-dir", temp_dir],
        env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ray_head.sh start failed: {proc.stderr[-3000:]}")
    client = ray_head.client_env(temp_dir)
    session_vars = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    old = {k: os.environ.get(k) for k in session_vars}
    os.environ.update({k: client[k] for k in session_vars})
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import: without it ray.init() resolves 127.0.0.1 to the
    # machine's address, where this loopback-only head is not listening.
    old_cluster, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    # Ray caches the auth mode and token at import; refresh them as Ray's own tests do.
    reset_auth_token_state()
    gcs = client["RAY_ADDRESS"]
    try:
        ray.init(address=gcs, log_to_driver=False, runtime_env={"env_vars": dict(s3_server.env())})
        yield {"gcs": gcs, "dashboard": client["RAY_API_SERVER_ADDRESS"], "temp_dir": temp_dir,
               "env": dict(os.environ, **client)}
    finally:
        ray.shutdown()
        subprocess.run([str(script), "stop", "--temp-dir", temp_dir], env=dict(os.environ, PYTHON=sys.executable),
                       capture_output=True)
        ray_constants.ENABLE_RAY_CLUSTER = old_cluster
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()


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

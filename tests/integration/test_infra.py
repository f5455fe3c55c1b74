"""The local services the project starts for itself: S3 server, Ray head with jobs API, HTTP server; and what
keeps them closed: token auth, loopback-only ports, scoped stops, busy ports refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.io import storage

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
    req = urllib.request.Request(ray_cluster["dashboard"] + "/api/version", headers=_auth(ray_cluster))
    with urllib.request.urlopen(req, timeout=10) as r:
        assert "ray_version" in json.loads(r.read())


def test_http_server_serves_files(http_server):
    Path(http_server.root, "hello.txt").write_text("hi")
    with urllib.request.urlopen(http_server.base_url + "/hello.txt", timeout=5) as r:
        assert r.read() == b"hi"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(http_server.base_url + "/missing.txt", timeout=5)


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "local" / "ray_head.sh"


def _auth(cluster: dict) -> dict[str, str]:
    return {"Authorization": "Bearer " + Path(cluster["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()}


def _post_job(url: str, entrypoint: str, headers: dict[str, str]) -> int:
    body = json.dumps({"entrypoint": entrypoint}).encode()
    req = urllib.request.Request(url + "/api/jobs/", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_ray_head_script_rejects_unknown_option():
    proc = subprocess.run([str(SCRIPT), "start", "--bogus"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def test_jobs_api_refuses_a_job_without_token_and_runs_one_with_it(ray_cluster, tmp_path):
    """POST /api/jobs/ without a token, to the dashboard and to the dashboard agent (which serves the same
    API): refused, and the command never ran. The same job with the head's token runs."""
    marker = tmp_path / "ran"
    entry = f"{sys.executable} -c \"open('{marker}', 'w').write('x')\""
    agent = f"http://127.0.0.1:{ray_cluster['env']['CLIPCAP_RAY_AGENT_PORT']}"
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster["dashboard"])  # RAY_AUTH_MODE=token + token path from the env
    # the session's head may already hold jobs of earlier tests: the refused POSTs must add none
    before = {j.submission_id for j in client.list_jobs() if j.type.name == "SUBMISSION"}
    for url in (ray_cluster["dashboard"], agent):
        assert _post_job(url, entry, {}) == 401
        assert _post_job(url, entry, {"Authorization": "Bearer not-the-token"}) == 403
    after = {j.submission_id for j in client.list_jobs() if j.type.name == "SUBMISSION"}
    assert not marker.exists() and after == before
    job = client.submit_job(entrypoint=entry)
    for _ in range(240):
        if client.get_job_status(job) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(0.5)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED and marker.read_text() == "x"


def _listening_sockets(pids: set[int]) -> list[str]:
    """Local addresses (hex, from /proc/net/tcp*) of the TCP sockets in LISTEN state held by ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:
                out.append(f[1])
    return out


def _is_loopback(hex_addr: str) -> bool:
    ip = hex_addr.split(":")[0]
    if len(ip) == 8:  # IPv4, little-endian: 0100007F = 127.0.0.1
        return ip.endswith("7F")
    return ip in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


def test_every_port_of_the_head_listens_on_loopback_only(ray_cluster):
    from infra.local import ray_head

    pids = set(ray_head._ours(ray_cluster["temp_dir"]))
    addrs = _listening_sockets(pids)
    assert len(addrs) >= 6, addrs  # GCS, raylet x2, dashboard, agent (HTTP + gRPC), runtime-env agent, ...
    assert [a for a in addrs if not _is_loopback(a)] == []


def test_ray_head_refuses_a_busy_port_before_starting(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([str(SCRIPT), "start", "--port", str(port), "--temp-dir", str(tmp_path / "r")],
                              capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 3 and f"GCS port {port} on 127.0.0.1 is busy" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing started, nothing written


def _fake_ray_process(logs: Path) -> subprocess.Popen:
    """A process that looks like a Ray daemon of the head in ``logs``' temp dir (stdout in its session)."""
    logs.mkdir(parents=True)
    out = open(logs / "raylet.out", "wb")
    return subprocess.Popen(["sleep", "300"], stdout=out, start_new_session=True)


def test_stop_signals_only_the_processes_of_its_own_temp_dir(tmp_path):
    from infra.local import ray_head

    mine = _fake_ray_process(tmp_path / "mine" / "session_1" / "logs")
    other = _fake_ray_process(tmp_path / "other" / "session_1" / "logs")
    try:
        assert ray_head.stop(str(tmp_path / "mine"), grace_s=5) == 1
        assert mine.wait(timeout=10) is not None
        assert other.poll() is None  # another head's daemon: untouched
    finally:
        for p in (mine, other):
            p.kill()


def test_s3_script_refuses_a_busy_port_and_keeps_the_running_server(s3_server, tmp_path):
    env = dict(os.environ, CLIPCAP_RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-m", "infra.local.s3", "start", "--port", str(s3_server.port)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and f"port {s3_server.port} on 127.0.0.1 is busy" in proc.stderr
    stop = subprocess.run([sys.executable, "-m", "infra.local.s3", "stop", "--port", str(s3_server.port)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "no local S3 server of ours" in stop.stdout
    urllib.request.urlopen(s3_server.endpoint + "/moto-api/", timeout=5).read()  # still up


def test_s3_run_dir_refuses_a_symlink(tmp_path, monkeypatch):
    from infra.local import s3

    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setattr(s3, "PID_DIR", tmp_path / "run")
    with pytest.raises(RuntimeError, match="no symlink"):
        s3.run_dir()

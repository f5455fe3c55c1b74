"""A local S3-compatible object store (moto's server mode) on 127.0.0.1.

    python -m infra.local.s3 start --port 9000 --bucket clipcap   # prints the env vars to export
    python -m infra.local.s3 stop --port 9000

Everything that talks to S3 here (s3fs, pyarrow via ``from_uri``, Ray Data, Ray Train, img2dataset) picks
the endpoint up from ``AWS_ENDPOINT_URL`` plus any credentials (moto accepts any value).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PID_DIR = Path(os.environ.get("CLIPCAP_RUN_DIR", "/tmp/clipcap-run"))


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    port: int
    pid: int

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point every client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_up(endpoint: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).read()
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"local S3 server at {endpoint} did not come up within {timeout:.0f}s")


def start(port: int | None = None, buckets: tuple[str, ...] = ("clipcap",), log_path: str | None = None) -> S3Server:
    """Start moto_server on 127.0.0.1 in the background and create ``buckets``."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe) if exe.exists() else "moto_server", "-H", "127.0.0.1", "-p", str(port)]
    log = open(log_path or os.devnull, "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", port=port, pid=proc.pid)
    try:
        _wait_up(server.endpoint)
    except RuntimeError:
        proc.kill()
        raise
    PID_DIR.mkdir(parents=True, exist_ok=True)
    (PID_DIR / f"s3-{port}.pid").write_text(str(proc.pid))
    for bucket in buckets:
        create_bucket(server, bucket)
    return server


def create_bucket(server: S3Server, bucket: str) -> None:
    import boto3

    env = server.env()
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=bucket)


def stop(port: int) -> bool:
    pid_file = PID_DIR / f"s3-{port}.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    pid_file.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", action="append", default=None, help="bucket to create (repeatable)")
    args = parser.parse_args(argv)
    if args.action == "stop":
        print("stopped" if stop(args.port) else f"no local S3 server recorded on port {args.port}")
        return 0
    server = start(args.port, tuple(args.bucket or ["clipcap"]), log_path=str(PID_DIR / f"s3-{args.port}.log"))
    print(f"# local S3 server up (pid {server.pid}); buckets: {', '.join(args.bucket or ['clipcap'])}")
    for key, value in server.env().items():
        print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A local S3-compatible object store (moto's server mode) on 127.0.0.1.

    python -m infra.local.s3 start --port 9000 --bucket clipcap   # prints the env vars to export
    python -m infra.local.s3 stop --port 9000

Everything that talks to S3 here (s3fs, pyarrow via ``from_uri``, Ray Data, Ray Train, img2dataset) picks
the endpoint up from ``AWS_ENDPOINT_URL`` plus any credentials (moto accepts any value).

A busy port is refused before anything starts (a second ``start`` on one port must not report success and
overwrite the PID file, or ``stop`` would then stop nothing). PID and log files live in a per-user 0700 folder
(``CLIPCAP_RUN_DIR``, default ``/tmp/clipcap-run-<uid>``), refused when it is a symlink or not ours, and are
opened without following symlinks; ``stop`` signals the recorded process group only when its leader is still
the ``moto_server`` on that port (a recycled PID is left alone).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PID_DIR = Path(os.environ.get("CLIPCAP_RUN_DIR", f"/tmp/clipcap-run-{os.getuid()}"))


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


def check_port_free(port: int) -> None:
    with socket.socket() as s:
        # SO_REUSEADDR: connections of a server stopped a moment ago (TIME_WAIT) do not make the port busy;
        # a socket still listening on it does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise RuntimeError(f"port {port} on 127.0.0.1 is busy ({exc.strerror}): stop what uses it "
                               f"(`python -m infra.local.s3 stop --port {port}` if it is ours) or pick another") from None


def run_dir() -> Path:
    """The private folder for PID / log files: created 0700, refused if a symlink or someone else's."""
    PID_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(PID_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{PID_DIR} must be a directory owned by you with mode 0700 (no symlink)")
    return PID_DIR


def _open_private(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CREAT, 0o600)


def start(port: int | None = None, buckets: tuple[str, ...] = ("clipcap",), log_path: str | None = None) -> S3Server:
    """Start moto_server on 127.0.0.1 in the background and create ``buckets`` (a busy port is an error)."""
    port = port or free_port()
    check_port_free(port)
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe) if exe.exists() else "moto_server", "-H", "127.0.0.1", "-p", str(port)]
    log = os.fdopen(_open_private(Path(log_path), os.O_WRONLY | os.O_APPEND), "ab") if log_path \
        else open(os.devnull, "ab")
    with log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", port=port, pid=proc.pid)
    try:
        _wait_up(server.endpoint)
    except RuntimeError:
        proc.kill()
        raise
    pid_fd = _open_private(run_dir() / f"s3-{port}.pid", os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(pid_fd, "w") as f:
        f.write(str(proc.pid))
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


def _is_our_server(pid: int, port: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"moto_server" in a for a in argv) and str(port).encode() in argv


def stop(port: int) -> bool:
    """Stop the server this module started on ``port`` (True if one was recorded and still running)."""
    pid_file = PID_DIR / f"s3-{port}.pid"
    if pid_file.is_symlink() or not pid_file.is_file():
        return False
    pid = int(pid_file.read_text().strip() or 0)
    pid_file.unlink(missing_ok=True)
    if not pid or not _is_our_server(pid, port):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(50):  # wait until it is gone, so the port is free when we return
        if not _is_our_server(pid, port):
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", action="append", default=None, help="bucket to create (repeatable)")
    args = parser.parse_args(argv)
    if args.action == "stop":
        print("# stopped" if stop(args.port) else f"# no local S3 server of ours running on port {args.port}")
        return 0
    try:
        server = start(args.port, tuple(args.bucket or ["clipcap"]), log_path=str(run_dir() / f"s3-{args.port}.log"))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(f"# local S3 server up (pid {server.pid}); buckets: {', '.join(args.bucket or ['clipcap'])}")
    for key, value in server.env().items():
        print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's local-infrastructure lines work as written: the fenced block of that section is
run line by line in one bash (after `make setup`, which the test environment already is), with free ports and a
private temp dir swapped in so parallel sessions do not collide. Afterwards nothing of it is left running."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from infra.local import ray_head
from infra.local.s3 import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def readme_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Local infrastructure", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_local_infrastructure_lines_run_as_written(tmp_path):
    lines = readme_lines()
    assert lines[0].startswith("make setup") and lines[1] == "source .venv/bin/activate                             # ray, python and clipcap of the project on PATH"
    s3_port = free_port()
    script = [f"source {sys.prefix}/bin/activate"]  # the venv `make setup` made (here: the test's own)
    script += [line.replace("--port 9000", f"--port {s3_port}") for line in lines[2:]]
    # Short: Ray's socket paths under the temp dir must stay within AF_UNIX's 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="cc-ray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(RAY_TMPDIR=str(temp), CLIPCAP_RAY_PORT=str(free_port()), CLIPCAP_DASHBOARD_PORT=str(free_port()),
               CLIPCAP_RUN_DIR=str(tmp_path / "run"), PATH=os.environ["PATH"])
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + "\n".join(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[:3000] + "\n...\n" + out[-3000:]
    assert "cluster CPUs: 2.0" in out and "succeeded" in out
    assert re.search(r"buckets: \[.*'clipcap'.*\]", out), out[-2000:]
    # Nothing of the head or the S3 server is left: no process logging into the temp dir, ports free (a process
    # that `ray stop` signalled may take a moment to exit on a loaded machine).
    deadline = time.monotonic() + 20
    while ray_head._ours(str(temp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_head._ours(str(temp)) == []
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", s3_port))
    shutil.rmtree(temp, ignore_errors=True)


def test_readme_head_line_fails_visibly_when_the_start_fails(tmp_path):
    """The README's `eval "$(infra/local/ray_head.sh start ...)"` line on a busy port: the eval itself exits
    non-zero with the reason on stderr, so a script stops and a person sees it (an empty eval returns 0). No Ray
    starts: the busy port is refused first."""
    line = readme_lines()[2]
    assert line.startswith('eval "$(infra/local/ray_head.sh start')
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env.update(PYTHON=sys.executable, RAY_TMPDIR=str(tmp_path / "ray"), CLIPCAP_RAY_PORT=str(port))
        proc = subprocess.run(["bash", "-c", f'{line}\necho "eval exit: $?"\necho "RAY_ADDRESS=${{RAY_ADDRESS:-}}"'],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        strict = subprocess.run(["bash", "-c", f"set -euo pipefail\n{line}\necho reached"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
    assert "eval exit: 3" in proc.stdout and "RAY_ADDRESS=\n" in proc.stdout, proc.stdout + proc.stderr
    assert f"GCS port {port} on 127.0.0.1 is busy" in proc.stderr
    assert strict.returncode == 3 and "reached" not in strict.stdout, strict.stdout + strict.stderr

"""What an operator sees of a long command (``pipelines.console``): our progress line and one summary; Ray's own
progress and messages in the job's log file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import brief
from pipelines.console import Progress

ROOT = Path(__file__).resolve().parents[2]


def test_progress_off_a_terminal_prints_one_plain_line_per_interval():
    stream = io.StringIO()
    with Progress("caption", 4, unit="parts", rows="images", interval_s=0.0, stream=stream) as p:
        p.update(1, 10, 2)
        p.update(1, 10, 0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[-1].startswith("caption: 2/4 parts, 20 images, ") and ", 2 error rows, ETA " in lines[-1]
    quiet = io.StringIO()
    with Progress("caption", 4, interval_s=3600, stream=quiet) as p:
        p.update(1, 10, 0)
    assert quiet.getvalue() == ""


def test_brief_summary_is_the_scalar_fields_wrapped():
    text = brief({"output": "o", "images": 32, "errors": 0, "untrained": False, "stage_seconds": {"a": 1},
                  "seconds": 1.23456}, width=30)
    assert text.splitlines()[0].startswith("output: o, images: 32")
    assert "errors" not in text and "stage_seconds" not in text and "1.23" in text


@pytest.mark.integration
def test_caption_stderr_is_our_lines_only_and_ray_goes_to_the_log(tmp_path):
    """A small caption run off a terminal: a few lines of ours on stderr, no Ray progress block or core worker
    line, the summary printed once; Ray's output is in the log file whose path was printed."""
    from clipcap_core import synthetic
    from tests.pipelines.trained_model import train_tiny_artifact

    images = tmp_path / "images"
    images.mkdir()
    for i, s in enumerate(synthetic.generate(8, seed=1, size=48)):
        s.image.save(images / f"{i:03d}.png")
    model = train_tiny_artifact(str(tmp_path / "model"), epochs=2)
    env = {**os.environ, "RAY_ADDRESS": "", "CLIPCAP_LOG_DIR": str(tmp_path / "logs")}
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "caption", "--input", str(images), "--output",
                          str(tmp_path / "out"), "--model", model, "--show", "0"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    err = out.stderr.splitlines()
    assert len(err) <= 3, out.stderr
    assert [line for line in err if not line.startswith(("clipcap caption: ", "caption: "))] == [], out.stderr
    assert "logging_progress" not in out.stderr and "core_worker" not in out.stderr
    assert (out.stdout + out.stderr).count('"parts_total"') == 1  # the summary, once
    assert json.loads(out.stdout)["images"] == 8
    logs = list((tmp_path / "logs").glob("clipcap-caption-*.log"))
    assert len(logs) == 1 and out.stderr.count(str(logs[0])) == 1
    assert "Started a local Ray instance" in logs[0].read_text()


def test_watch_advances_from_absolute_counts_and_never_moves_back():
    """A job whose work runs elsewhere (Ray Train workers, img2dataset) is shown from its own tally: the last
    read lands on the line, a replayed count (a restarted attempt) does not move it back, and a failing read is
    skipped rather than failing the job."""
    from pipelines.console import watch

    reads = iter([(3, 48, 0, "loss 1.0"), RuntimeError("board gone"), (2, 32, 0, "loss 0.9"), (10, 160, 0, "loss 0.1")])

    def read():
        got = next(reads, (10, 160, 0, "loss 0.1"))
        if isinstance(got, Exception):
            raise got
        return got

    stream = io.StringIO()
    progress = Progress("train", 10, unit="steps", rows="samples", interval_s=0.0, stream=stream, count_errors=False)
    with watch(progress, read, interval_s=0.01):
        import time

        time.sleep(0.2)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("train: 3/10 steps, 48 samples, ") and ", loss 1.0, ETA " in lines[0]
    assert lines[-1].startswith("train: 10/10 steps, 160 samples, ") and "loss 0.1" in lines[-1]
    assert "error rows" not in lines[-1]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == sorted(int(line.split()[1].split("/")[0])
                                                                           for line in lines)


@pytest.mark.integration
def test_train_shows_one_progress_line_and_logs_each_worker_line_once(tmp_path):
    """``clipcap train`` off a terminal: progress lines of ours (steps from the workers' board, loss) on stderr,
    no worker line there; each worker line exactly once in the job log, without colour codes (Ray Train's patched
    ``print`` doubled every line, and Ray's prefix wrapped each in colour codes)."""
    from pipelines.demo import synthetic_tables

    synthetic_tables.write_synthetic_tables(str(tmp_path / "tables"), 200, shards=2, dim=24)
    env = {**os.environ, "RAY_ADDRESS": "", "CLIPCAP_LOG_DIR": str(tmp_path / "logs"), "CLIPCAP_PROGRESS_EVERY_S": "0"}
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--input", str(tmp_path / "tables"),
                          "--output", str(tmp_path / "out"), "--model", "tiny", "--epochs", "2"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    ours = [line for line in out.stderr.splitlines() if line.startswith("train: ")]
    assert ours and ours[-1].startswith("train: ") and " loss " in ours[-1], out.stderr
    total = ours[-1].split()[1]
    assert total.split("/")[0] == total.split("/")[1], ours  # the last read saw the last step
    assert "[clipcap train]" not in out.stderr and "\x1b[" not in out.stderr
    log = next((tmp_path / "logs").glob("clipcap-train-*.log")).read_text()
    worker = [line for line in log.splitlines() if "[clipcap train]" in line]
    assert any(" epoch 2/2 done: " in line for line in worker), log[-3000:]
    assert len(worker) == len(set(worker)) and not any("\x1b[" in line for line in worker)

"""One run at a time per output (``pipelines.lease``): a second run is refused before any work, naming the
first; a stale lease is taken over with a warning, ``--force-unlock`` takes a live one; racing runs get one
winner; a run whose lease was taken commits no further unit. On local disk and on the local S3 server."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from clipcap_core import uris
from pipelines import stopping
from pipelines.caption import job as caption_job
from pipelines.cli import main
from pipelines.committer import UnitCommitter
from pipelines.embed.job import EmbedConfig
from pipelines.embed.text import EmbedTextConfig
from pipelines.io import storage
from pipelines.lease import Lease, LeaseHeld, LeaseLost
from tests.pipelines.test_caption_reliability import _Blocks
from tests.pipelines.test_embed import good_samples, write_shard
from tests.pipelines.test_stopping import _caption_args, _images, _two_parts

KINDS = ["local", pytest.param("s3", marks=pytest.mark.integration)]


@pytest.fixture(params=KINDS)
def root(request, tmp_path) -> str:
    return request.getfixturevalue("s3_uri") if request.param == "s3" else str(tmp_path / "out")


def _stamp(uri: str, seconds_ago: float) -> None:
    """Backdate the lease file's renewal, as a run killed that long ago left it."""
    held = storage.read_json(uri)
    held["renewed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - seconds_ago))
    storage.write_json(held, uri)


def test_a_second_run_is_refused_naming_the_first_until_released_stale_or_forced(root, caplog):
    uri = storage.join(root, "_meta", "lease.json")
    first = Lease(uri, run="run-1")
    first.acquire()
    with pytest.raises(LeaseHeld) as refused:
        Lease(uri, run="run-2").acquire()
    message = str(refused.value)
    assert refused.value.exit_code == 2
    assert f"host {socket.gethostname()}, pid {os.getpid()}, run run-1, since " in message, message
    assert "--force-unlock" in message
    Lease(uri, run="run-2").release()  # not its lease: it stays
    assert storage.read_json(uri)["run"] == "run-1"
    _stamp(uri, 3600)  # run-1 died an hour ago
    Lease(uri, run="run-3").acquire()
    assert storage.read_json(uri)["run"] == "run-3" and "not renewed for 360" in caplog.text
    Lease(uri, run="run-4", force=True).acquire()  # live, but forced
    assert storage.read_json(uri)["run"] == "run-4" and "(forced)" in caplog.text
    Lease(uri, run="run-4").release()
    assert not uris.exists(uri)


def test_of_runs_starting_at_once_exactly_one_holds_the_lease(root):
    uri = storage.join(root, "_meta", "lease.json")
    storage.check_writable(root)
    start, won, refused = threading.Barrier(6), [], []

    def run(i: int) -> None:
        start.wait()
        try:
            Lease(uri, run=f"run-{i}").acquire()
            won.append(i)
        except LeaseHeld:
            refused.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5, (won, refused)
    assert storage.read_json(uri)["run"] == f"run-{won[0]}"


def test_the_heartbeat_renews_the_lease_and_finds_it_taken_over(root):
    uri = storage.join(root, "_meta", "lease.json")
    with Lease(uri, run="run-1", renew_every_s=0.2) as first:
        started = storage.read_json(uri)
        time.sleep(1.0)
        renewed = storage.read_json(uri)
        assert renewed["run"] == "run-1" and renewed["renewed_at"] > started["renewed_at"]
        assert renewed["started_at"] == started["started_at"]
        Lease(uri, run="run-2", force=True).acquire()
        for _ in range(50):
            if first.lost is not None:
                break
            time.sleep(0.1)
        with pytest.raises(LeaseLost, match="taken by host .* run run-2"):
            first.check()
    assert storage.read_json(uri)["run"] == "run-2"  # the first run's exit leaves the new owner's lease


def test_a_lease_whose_process_was_killed_is_taken_at_once_and_only_in_its_own_pid_space(tmp_path, caplog):
    """A driver killed with SIGKILL (or by the OOM killer) leaves a fresh lease: a rerun on the same host takes it
    at once instead of waiting 120 s for it to go stale. A lease of the same pid from another pid space (another
    container or boot) is not judged by our process table: refused as live."""
    import subprocess
    import sys

    uri = str(tmp_path / "_meta" / "lease.json")
    code = f"from pipelines.lease import Lease; Lease({uri!r}, run='killed').acquire(); print('held', flush=True)"
    holder = subprocess.Popen([sys.executable, "-c", code + "; import time; time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeld, match="run killed"):
        Lease(uri, run="rerun").acquire()  # alive: refused
    holder.kill()
    holder.wait()
    owner = json.loads(Path(uri).read_text())
    Path(uri).write_text(json.dumps({**owner, "pid_space": "another-container"}))
    with pytest.raises(LeaseHeld, match="run killed"):
        Lease(uri, run="rerun").acquire()  # dead here, but its pid is not ours to judge
    Path(uri).write_text(json.dumps(owner))
    rerun = Lease(uri, run="rerun")
    rerun.acquire()
    assert storage.read_json(uri)["run"] == "rerun"
    assert f"its process {owner['pid']} on this host is gone" in caplog.text
    rerun.release()


def test_a_committer_whose_lease_is_lost_commits_no_further_unit(tmp_path):
    class Units(UnitCommitter):
        def commit(self, unit, rows):
            return unit

    def lost() -> None:
        raise LeaseLost("the lease of this run was taken by host h, pid 1")

    committer = Units(unit="u", index="i", total="t")
    block = pa.table({"u": ["p0"], "i": [0], "t": [1]})
    assert committer.add(block) == ["p0"]
    committer.guard = lost
    with pytest.raises(stopping.CommitFailed, match="part p1 not committed: LeaseLost: .* taken by host h"):
        committer.add(block.set_column(0, "u", pa.array(["p1"])))
    assert committer.committed == ["p0"]


# --- the commands -------------------------------------------------------------------------------------------
def _refused(capsys, code: int, first: Lease) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"pid {os.getpid()}, run {first.owner.run}, since {first.owner.started_at}" in err, err
    assert "--force-unlock" in err and "Traceback" not in err
    return err


def test_a_second_caption_run_exits_2_before_any_work_and_force_unlock_takes_over(trained_model, tmp_path,
                                                                                  monkeypatch, capsys):
    inp, out = _images(tmp_path / "in", 4), tmp_path / "out"
    first = Lease(str(out / "_meta" / "lease.json"))
    first.acquire()
    in_flight = out / "_meta" / "tmp" / "_tmp.first-run.part-images-00000.parquet"  # the first run writing
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"PAR1")
    _refused(capsys, main(_caption_args(inp, out, trained_model)), first)
    assert in_flight.exists() and not (out / "captions").exists() and not (out / "_meta" / "run.json").exists()
    monkeypatch.setattr(caption_job, "build_dataset", lambda cfg, plan: _Blocks(_two_parts()))
    assert main(_caption_args(inp, out, trained_model) + ["--force-unlock"]) == 0
    assert sorted(os.listdir(out / "captions")) == ["part-images-00000.parquet", "part-images-00001.parquet"]
    assert not in_flight.exists() and not (out / "_meta" / "lease.json").exists()


def test_a_second_embed_run_exits_2_before_any_work(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "00000.tar", good_samples(2, 0))
    cfg = EmbedConfig(input=str(tmp_path / "in"), output_root=str(tmp_path / "out"), dataset="d")
    first = Lease(storage.join(cfg.meta_uri, "lease.json"))
    first.acquire()
    code = main(["embed", "--input", cfg.input, "--output", cfg.output_root, "--dataset", "d"])
    _refused(capsys, code, first)
    assert not list(Path(cfg.output_root).rglob("*.parquet"))


def test_a_second_embed_text_run_exits_2_before_any_work(tmp_path, capsys):
    (tmp_path / "captions.txt").write_text("a dog\na cat\n")
    cfg = EmbedTextConfig(input=str(tmp_path / "captions.txt"), output_root=str(tmp_path / "out"), dataset="d")
    first = Lease(storage.join(cfg.meta_uri, "lease.json"))
    first.acquire()
    code = main(["embed-text", "--input", cfg.input, "--output", cfg.output_root, "--dataset", "d"])
    _refused(capsys, code, first)
    assert not list(Path(cfg.output_root).rglob("*.parquet")) and not Path(cfg.meta_uri, "run.json").exists()
    assert json.loads(Path(cfg.meta_uri, "lease.json").read_text())["run"] == first.owner.run

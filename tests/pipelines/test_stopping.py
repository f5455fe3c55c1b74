"""Stopping part-way (``pipelines.stopping``): SIGTERM / Ctrl-C and an output that fails mid-job end a run
with one line naming the committed units and their exit code; a table folder never holds a half-written or
temporary file, whatever stops the writer. Unit tests feed the driver fixed blocks (no Ray); the marked test
stops a real ``clipcap caption`` process."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from clipcap_core import synthetic
from clipcap_core.decoding import DecodeConfig
from pipelines import stopping
from pipelines.caption import job as caption_job
from pipelines.caption.output import PartCommitter, layout, meta_uri, table_uri
from pipelines.cli import main
from pipelines.embed import job as embed_output
from pipelines.embed import stages as st
from pipelines.embed.job import EmbedConfig, EmbedResult, _drain
from pipelines.io import storage
from tests.pipelines.test_caption_reliability import _Blocks, _rows

ROOT = Path(__file__).resolve().parents[2]


def _images(folder: Path, n: int, size: int = 32) -> Path:
    folder.mkdir(parents=True)
    for s in synthetic.generate(n, seed=5, size=size, start=30000):
        s.image.save(folder / f"{s.key}.png")
    return folder


def _temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("_tmp.*")]


def _watch(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[list[str]]:
    """What ``folder`` holds each time a Parquet file has just been written (before its rename)."""
    seen: list[list[str]] = []
    real = storage.pq.write_table

    def write(table, where, **kw):
        real(table, where, **kw)
        seen.append(sorted(os.listdir(folder)) if folder.is_dir() else [])

    monkeypatch.setattr(storage.pq, "write_table", write)
    return seen


# --- temporaries live outside the table folder ----------------------------------------------------------------
def test_a_caption_part_being_written_is_never_in_the_table_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen = _watch(monkeypatch, out / "captions")
    c = PartCommitter(str(out), "m@1", DecodeConfig())
    c.add(_rows("p0", [(0, "a.jpg", "one", None, None), (1, "b.jpg", None, "bad", "decode")], 2))
    c.add(_rows("p1", [(0, "c.jpg", "two", None, None)], 1))
    assert seen == [[], [], ["part-p0.parquet"]]  # p0's errors file, p0's part file, p1's part file
    assert sorted(os.listdir(out / "captions")) == ["part-p0.parquet", "part-p1.parquet"]
    assert _temporaries(out) == []


def test_an_embedding_shard_being_written_is_never_in_the_table_folder(tmp_path, monkeypatch):
    cfg = EmbedConfig(input=str(tmp_path / "in"), output_root=str(tmp_path / "out"), dataset="d")
    table = Path(cfg.table_uri)
    seen = _watch(monkeypatch, table)
    rows = pa.table({st.KEY: ["k0", "k1"], st.CAPTION: ["a", "b"], st.URL: pa.array([None, None], pa.string()),
                     st.SOURCE: ["s0", "s1"], st.ERROR: [None, "bad image"],
                     "embedding": [np.ones(4, np.float32).tobytes(), b""]})
    embed_output.commit_shard(cfg, str(tmp_path / "in" / "00000.tar"), rows, 4)
    assert seen == [[], []] and os.listdir(table) == ["part-00000.parquet"]  # errors file, then part file
    assert _temporaries(tmp_path / "out") == []


def test_stale_temporaries_of_a_killed_run_are_removed_from_the_tmp_folders(tmp_path):
    out, cfg = tmp_path / "out", EmbedConfig(input="in", output_root=str(tmp_path / "emb"), dataset="d")
    for stale in (Path(meta_uri(str(out), "tmp")) / "_tmp.dead.part-p9.parquet",
                  Path(table_uri(str(out))) / "_tmp.old.part-p8.parquet",
                  Path(cfg.units.dir("tmp")) / "_tmp.dead.part-00009.parquet"):
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(b"")
    layout(str(out)).remove_temporaries()
    assert cfg.units.remove_temporaries() == 1
    assert _temporaries(tmp_path) == []


# --- a signal or a failing output stops the driver with one line -----------------------------------------------
class _Unhandled(Exception):
    """A stop signal the command under test did not handle (it would otherwise end pytest itself)."""


@pytest.fixture()
def unhandled_signals_fail():
    """SIGINT / SIGTERM outside a command's own handling fail the test instead of stopping the session."""

    def fail(signum, _frame):
        raise _Unhandled(signal.Signals(signum).name)

    previous = {s: signal.signal(s, fail) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield fail
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _caption_args(inp: Path, out: Path, model: str) -> list[str]:
    return ["caption", "--input", str(inp), "--output", str(out), "--model", model, "--part-size", "2"]


def _two_parts() -> list:
    return [_rows("images-00000", [(0, "a.png", "one", None, None), (1, "b.png", "two", None, None)], 2),
            _rows("images-00001", [(0, "c.png", "three", None, None), (1, "d.png", "four", None, None)], 2)]


class _SignalAfterFirst(_Blocks):
    """The driver's stream, with a stop signal (default: Ctrl-C) after the first block."""

    def __init__(self, blocks: list, signum: int = signal.SIGINT):
        super().__init__(blocks)
        self.signum = signum

    def iter_batches(self, **_kw):
        yield self.blocks[0]
        os.kill(os.getpid(), self.signum)
        yield from self.blocks[1:]


def test_ctrl_c_between_parts_exits_130_with_one_line_and_no_traceback(trained_model, tmp_path, monkeypatch,
                                                                       capsys, unhandled_signals_fail):
    monkeypatch.setattr(caption_job, "build_dataset", lambda cfg, plan: _SignalAfterFirst(_two_parts()))
    out = tmp_path / "out"
    code = main(_caption_args(_images(tmp_path / "in", 4), out, trained_model))
    err = capsys.readouterr().err
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "stopped: 1 of 2 parts committed; rerun resumes"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert os.listdir(out / "captions") == ["part-images-00000.parquet"]
    assert signal.getsignal(signal.SIGINT) is unhandled_signals_fail  # the handler before the command is back


def _shard_rows(shard: str) -> pa.Table:
    """One embedded row of ``shard`` (a shard of one sample), as the actors return it."""
    return pa.table({st.SHARD: [shard], st.INDEX: pa.array([0], pa.int64()), st.TOTAL: pa.array([1], pa.int64()),
                     st.KEY: [f"k{shard}"], st.CAPTION: ["c"], st.URL: pa.array([None], pa.string()),
                     st.SOURCE: ["s"], st.ERROR: [""], st.UNREAD: [False],
                     "embedding": [np.ones(4, np.float32).tobytes()]})


def test_sigterm_in_an_embed_run_names_the_shards_committed(tmp_path, unhandled_signals_fail):
    cfg = EmbedConfig(input=str(tmp_path), output_root=str(tmp_path / "o"), dataset="d")
    result = EmbedResult(table_uri=cfg.table_uri, shards=3, skipped=1, written=2, rows=0, errors=0, dim=4, wall_s=0)
    stream = _SignalAfterFirst([_shard_rows("00001"), _shard_rows("00002")], signal.SIGTERM)
    with stopping.on_signals(), pytest.raises(stopping.Interrupted) as stop:
        _drain(cfg, stream, [str(tmp_path / "00001.tar"), str(tmp_path / "00002.tar")], 4, 0.0, result)
    assert stop.value.line("clipcap embed") == "stopped: 2 of 3 shards committed; rerun resumes"
    assert stop.value.exit_code == 143 and os.listdir(cfg.table_uri) == ["part-00001.parquet"]


def test_sigterm_during_a_commit_waits_until_the_part_is_written(trained_model, tmp_path, monkeypatch, capsys,
                                                                unhandled_signals_fail):
    real = storage.pq.write_table

    def write_then_signal(table, where, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the part file is being written
        real(table, where, **kw)

    monkeypatch.setattr(storage.pq, "write_table", write_then_signal)
    monkeypatch.setattr(caption_job, "build_dataset", lambda cfg, plan: _Blocks(_two_parts()))
    out = tmp_path / "out"
    code = main(_caption_args(_images(tmp_path / "in", 4), out, trained_model))
    err = capsys.readouterr().err
    assert code == 143 and err.strip().splitlines()[-1] == "stopped: 1 of 2 parts committed; rerun resumes"
    assert duckdb.sql(f"select count(*) from '{out}/captions/*.parquet'").fetchall() == [(2,)]
    assert _temporaries(out) == []


def test_a_full_disk_mid_job_exits_4_naming_the_part_and_leaves_nothing_half_written(trained_model, tmp_path,
                                                                                     monkeypatch, capsys):
    real, writes = storage.pq.write_table, []

    def fill_disk(table, where, **kw):
        writes.append(1)
        if len(writes) == 2:  # the second part: some bytes, then the disk is full
            where.write(b"PAR1" + b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(table, where, **kw)

    monkeypatch.setattr(storage.pq, "write_table", fill_disk)
    monkeypatch.setattr(caption_job, "build_dataset", lambda cfg, plan: _Blocks(_two_parts()))
    out = tmp_path / "out"
    code = main(_caption_args(_images(tmp_path / "in", 4), out, trained_model))
    err = capsys.readouterr().err
    assert code == 4, err
    assert re.search(r"part images-00001 not committed: OSError: .*No space left on device; "
                     r"1 of 2 parts committed; rerun resumes", err), err
    assert "Traceback" not in err
    assert os.listdir(out / "captions") == ["part-images-00000.parquet"]
    assert _temporaries(out) == []


# --- a real driver process --------------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


SMALL_CAPTION = ["--part-size", "4", "--caption-batch-size", "4", "--clip-batch-size", "4", "--decode-block-rows", "4"]


@contextmanager
def _cli_process(*args: str, log: Path | None = None) -> Iterator[subprocess.Popen]:
    """A ``clipcap`` driver with a local Ray of its own (stderr piped, or to ``log``); stopped on the way out if
    still running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    err = subprocess.PIPE if log is None else log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE if log is None else subprocess.DEVNULL, stderr=err)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        if log is not None:
            err.close()


def _caption_process(inp: Path, out: Path, model: str) -> contextlib.AbstractContextManager[subprocess.Popen]:
    return _cli_process("caption", "--input", str(inp), "--output", str(out), "--model", model, *SMALL_CAPTION)


@pytest.mark.integration
def test_sigterm_stops_a_caption_run_cleanly_and_a_rerun_completes_it(trained_model, ray_cluster, tmp_path):
    inp, out = _images(tmp_path / "in", 400), tmp_path / "out"
    with _caption_process(inp, out, trained_model) as proc:  # killed if the test fails before its end
        while not list((out / "captions").glob("part-*.parquet")) and proc.poll() is None:
            time.sleep(0.05)
        workers = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("stopped")]
    assert len(stops) == 1 and "Traceback" not in err, err[-3000:]
    done = int(re.fullmatch(r"stopped: (\d+) of 100 parts committed; rerun resumes", stops[0]).group(1))
    assert 1 <= done < 100
    assert not [p for p in os.listdir(out / "captions") if not p.startswith("part-")]
    assert duckdb.sql(f"select count(*) from '{out}/captions/*.parquet'").fetchall() == [(4 * done,)]
    time.sleep(1)
    assert not [pid for pid in workers if _alive(pid)], "Ray processes outlived the driver"
    # the rerun, in this process on the session's cluster (a second local Ray start buys nothing here)
    from pipelines.cli import main

    small = ["--part-size", "4", "--caption-batch-size", "4", "--clip-batch-size", "4", "--decode-block-rows", "4"]
    assert main(["caption", "--input", str(inp), "--output", str(out), "--model", trained_model, *small]) == 0
    rows = duckdb.sql(f"select count(*), count(distinct key) from '{out}/captions/*.parquet'").fetchall()[0]
    assert rows == (400, 400)


@pytest.mark.integration
def test_sigterm_while_ray_starts_stops_the_command_once_ray_is_up(tmp_path):
    """Ray's SIGTERM handler (``sys.exit``) is not installed by ``ray.init`` under ``on_signals``: a signal while
    Ray starts stops the command with 143 and its one line, after a whole start (then a clean shutdown)."""
    code = ("import os, signal, sys, threading\nfrom pipelines import runtime, stopping\n"
            "def call():\n    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
            "    runtime.ensure_ray(num_cpus=1)\n    print('not stopped', flush=True)\n    return 0\n"
            "sys.exit(stopping.run(call, 'probe'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 143, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "stopped by SIGTERM" and "not stopped" not in done.stdout


# --- SIGTERM at several points of a real run; three readers on what it left; a rerun completes it --------------
POINTS = {"start-up": 0, "first-unit": 1, "half": 8}  # SIGTERM once this many units are committed (0: started)


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within 300 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)


def _second_run_is_refused(first: subprocess.Popen, args: list[str], log: Path) -> None:
    """The same command started while ``first`` runs (paused, so it commits nothing meanwhile) exits 2 before
    any work, naming the first run's host and pid."""
    first.send_signal(signal.SIGSTOP)
    try:
        with _cli_process(*args, log=log) as second:
            second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    err = log.read_text()
    assert second.returncode == 2 and f"host {socket.gethostname()}, pid {first.pid}, run " in err, err[-3000:]
    assert "--force-unlock" in err and "Traceback" not in err


def _stop_at(point: str, args: list[str], table: Path, started: Callable[[], bool], log: Path) -> int:
    """Run ``clipcap *args``, SIGTERM it at ``point`` (start-up: once ``started()``, before any unit); check the
    exit code and its one line; the units committed."""
    def parts() -> int:
        return len(list(table.glob("part-*.parquet")))

    with _cli_process(*args, log=log) as proc:
        if POINTS[point]:
            _wait_for(proc, lambda: parts() >= POINTS[point], f"{POINTS[point]} committed unit(s)", log)
            if point == "first-unit":
                _second_run_is_refused(proc, args, log.with_name("second.log"))
        else:
            _wait_for(proc, started, "the start", log)
            assert not parts()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    err = log.read_text()
    stops = [line for line in err.splitlines() if line.startswith("stopped")]
    assert proc.returncode == 143 and len(stops) == 1 and "Traceback" not in err, err[-3000:]
    done = re.fullmatch(r"stopped: (\d+) of 16 \w+s committed; rerun resumes|stopped by SIGTERM", stops[0])
    assert done, stops
    assert int(done.group(1) or 0) == parts() and parts() < 16 and (parts() >= 1) == (point != "start-up")
    assert not [p.name for p in table.glob("*") if not p.name.startswith("part-")]  # no temporary, nothing else
    return parts()


def _keys_three_ways(table: Path, hf_cache: Path) -> list[str]:
    """The keys of the table folder as DuckDB, polars and Hugging Face ``datasets`` read them (each equal to the
    keys of its committed part files, duplicates kept); [] when no part is committed yet."""
    import datasets
    import polars as pl
    import pyarrow.parquet as pq

    files = sorted(table.glob("*.parquet"))
    committed = sorted(k for f in files for k in pq.read_table(f, columns=["key"]).column("key").to_pylist())
    if not files:
        return []
    glob = f"{table}/*.parquet"
    by_duckdb = sorted(k for (k,) in duckdb.sql(f"select key from '{glob}'").fetchall())
    by_polars = sorted(pl.read_parquet(glob, columns=["key"])["key"].to_list())
    loaded = datasets.load_dataset("parquet", data_files=glob, split="train", cache_dir=str(hf_cache))
    assert by_duckdb == committed and by_polars == committed and sorted(loaded["key"]) == committed
    return committed


@pytest.fixture()
def hf_offline(tmp_path, monkeypatch) -> Path:
    """Hugging Face ``datasets`` offline, its cache under ``tmp_path``."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    return tmp_path / "hf"


def _stop_read_rerun(point: str, args: list[str], table: Path, started: Callable[[], bool], keys: list[str],
                     tmp_path: Path, hf: Path) -> None:
    """SIGTERM at ``point``; the three readers agree on the committed rows; the rerun leaves the rows ``keys``."""
    done = _stop_at(point, args, table, started, tmp_path / "stopped.log")
    assert len(set(_keys_three_ways(table, hf / "stopped"))) == 4 * done
    with _cli_process(*args, log=tmp_path / "rerun.log") as again:
        again.communicate(timeout=180)
    assert again.returncode == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert _keys_three_ways(table, hf / "rerun") == sorted(keys)  # a clean run's rows: none twice, none missing


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("point", list(POINTS))
def test_sigterm_at_any_point_of_a_caption_run_leaves_a_table_three_readers_agree_on(point, trained_model,
                                                                                      tmp_path, hf_offline):
    inp, out = _images(tmp_path / "in", 64), tmp_path / "out"
    args = ["caption", "--input", str(inp), "--output", str(out), "--model", trained_model, *SMALL_CAPTION]
    keys = [p.name for p in inp.iterdir()]
    # start-up: the run record is written (planning done, under the lease), Ray not yet started
    _stop_read_rerun(point, args, out / "captions", (out / "_meta" / "run.json").exists, keys, tmp_path, hf_offline)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("point", list(POINTS))
def test_sigterm_at_any_point_of_an_embed_run_leaves_a_table_three_readers_agree_on(point, tmp_path, hf_offline):
    from tests.pipelines.test_embed import good_samples, write_shard

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    keys = []
    for i in range(16):
        samples = good_samples(4, 4 * i)
        write_shard(inp / f"{i:05d}.tar", samples)
        keys += [key for key, _ in samples]
    args = ["embed", "--input", str(inp), "--output", str(out), "--dataset", "d", "--batch-size", "4"]
    table = Path(EmbedConfig(input=str(inp), output_root=str(out), dataset="d").table_uri)
    # start-up: the table folder is made (the output checked writable), Ray not yet started
    _stop_read_rerun(point, args, table, table.exists, keys, tmp_path, hf_offline)

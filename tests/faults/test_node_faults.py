"""Fault tests (marked ``faults``): a worker node of a real multi-node Ray cluster dies mid-job.

Each ``node_kill_*.py`` driver runs in its own process with its own 3-node cluster (``cluster_driver``: a head
without CPUs + 2 worker nodes, not the session's head) and takes a busy worker node down (its raylet and every
worker process on it) once the job has committed its first unit: embed and caption must end with exactly the
expected rows (0 lost, 0 duplicated), whether Ray recovered within the run or the rerun resumed from the committed
units; train must restart and resume from the checkpoint Ray Train had registered. A failed assertion says whose
half failed: "harness missed" (no kill, or a process of the node lived on) or the product's.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.faults.cluster_driver import run_driver
from tests.faults.test_s3_faults import _shard

pytestmark = [pytest.mark.integration, pytest.mark.faults]
SHARDS, PER_SHARD = 4, 8
# caption commits a part only when its last row is back, and with 4 parts of 8 images all 4 can land in the
# same second, leaving the killer no moment with a part committed and the job still running.
# 12 parts spread the commits over the run. Embed likewise: with 4 shards its actors could finish every shard
# before the first commit, so the kill landed on idle nodes (nothing in flight to lose or redo).
CAPTION_SHARDS = EMBED_SHARDS = 12


def _write_shards(raw, seed: int, shards: int = SHARDS) -> list[str]:
    from clipcap_core import synthetic

    raw.mkdir()
    keys = []
    for i in range(shards):
        samples = list(synthetic.generate(PER_SHARD, seed=seed, size=32, start=i * PER_SHARD))
        keys += [s.key for s in samples]
        (raw / f"{i:05d}.tar").write_bytes(_shard(samples))
    return keys


def _assert_node_down(kill: dict, report: dict) -> None:
    """The harness's half: the kill happened and every process of the killed node is gone (a worker process left
    running would let the job go on as if nothing happened)."""
    assert kill["killed"], ("harness missed: no node was killed while the job ran", report)
    assert kill["sigkilled_worker_pids"] and not kill["survivors"], \
        ("harness missed: processes of the killed node still ran", report)


def test_worker_node_killed_during_embed_loses_and_duplicates_nothing(tmp_path):
    keys = _write_shards(tmp_path / "raw", seed=6, shards=EMBED_SHARDS)
    report, tail = run_driver("node_kill_embed.py", [str(tmp_path / "raw"), str(tmp_path / "out")])
    print("node-kill embed:", report)
    kill = report["kill"]
    _assert_node_down(kill, report)
    # the kill happened while the job ran, with shards still to do, on a node that was running work
    assert kill["killed"] and 1 <= kill["probe_at_kill"] < EMBED_SHARDS and kill["cpu_in_use_on_killed_node"] > 0, \
        report
    assert report["nodes_alive"] == 2, report  # head + the surviving worker node
    got = pq.read_table(str(tmp_path / "out/embeddings/f/tiny")).column("key").to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == sorted(keys), report  # 0 lost, 0 duplicated


def test_worker_node_killed_during_caption_loses_and_duplicates_nothing(tmp_path):
    from pipelines.caption.output import meta_uri, table_uri

    raw = tmp_path / "raw"
    keys = _write_shards(raw, seed=8, shards=CAPTION_SHARDS)
    for i in range(CAPTION_SHARDS):  # an img2dataset sidecar: each .tar is a webdataset shard (samples grouped by key)
        (raw / f"{i:05d}_stats.json").write_text("{}")
    out = tmp_path / "captions"
    report, tail = run_driver("node_kill_caption.py", [str(raw), str(out)])
    print("node-kill caption:", report)
    kill = report["kill"]
    _assert_node_down(kill, report)
    assert kill["killed"] and 1 <= kill["probe_at_kill"] < CAPTION_SHARDS and kill["cpu_in_use_on_killed_node"] > 0, \
        report
    assert report["nodes_alive"] == 2 and report["results"][-1]["exit_code"] == 0, report
    got = pq.read_table(table_uri(str(out))).column("key").to_pylist()
    expect = [f"{i:05d}.tar/{k}" for i in range(CAPTION_SHARDS) for k in keys[i * PER_SHARD:(i + 1) * PER_SHARD]]
    assert len(got) == len(set(got)) and sorted(got) == sorted(expect), (report, got[:3])  # 0 lost, 0 duplicated
    errors = Path(meta_uri(str(out), "errors"))
    assert sum(pq.read_table(f).num_rows for f in errors.glob("*.parquet")) == 0, report  # no member failed


def test_worker_node_killed_during_train_resumes_from_its_checkpoint(tmp_path):
    from pipelines.demo import synthetic_tables

    synthetic_tables.write_synthetic_tables(str(tmp_path / "data"), 600, shards=2, dim=32)
    report, tail = run_driver("node_kill_train.py", [str(tmp_path / "data/embeddings"), str(tmp_path / "runs")])
    print("node-kill train:", report)
    kill, total = report["kill"], report["total_steps"]
    _assert_node_down(kill, report)
    # the harness's half: a training worker ran on the killed node, once Ray Train had registered a checkpoint
    # (the restore point), well before the end
    assert kill["targets_on_node"] and not kill["targets_survived"], \
        ("harness missed: no training worker ran on the killed node", report)
    at_kill, gone = kill["probe_at_kill"], kill["probe_when_gone"]
    assert 0 < at_kill["registered"] < total, ("harness missed: no registered checkpoint at the kill", report)
    assert report["nodes_alive"] == 2, report
    # the product's half: Ray Train restarted the worker group (2 actors per attempt), which resumed from a
    # checkpoint registered by the kill (nothing later: the node's workers died with it) and trained to the end
    assert report["train_worker_actors"] >= 4, ("product did not restart the worker group", report)
    resumes = report["resumes"]
    assert resumes and all(at_kill["registered"] <= r["step"] <= gone["stored"] for r in resumes), \
        ("product did not resume from the checkpoint registered at the kill", report)
    assert report["epochs"][-1] == total and report["artifact_step"] == total, report
    assert report["steps_logged"] == sorted(set(report["steps_logged"])), report  # no step logged twice

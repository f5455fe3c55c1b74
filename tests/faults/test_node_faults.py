"""Fault test (marked ``faults``): a worker node of a real multi-node Ray cluster dies during embed.

``node_kill_embed.py`` runs in its own process (its own 3-node cluster, not the session's head): the table
must end with exactly the expected rows, 0 lost and 0 duplicated, whether Ray recovered within the run or the
rerun resumed from the committed shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.faults.test_s3_faults import _shard

pytestmark = [pytest.mark.integration, pytest.mark.faults]
ROOT = Path(__file__).resolve().parents[2]
SHARDS, PER_SHARD = 4, 8


def test_worker_node_killed_during_embed_loses_and_duplicates_nothing(tmp_path):
    from clipcap_core import synthetic

    raw = tmp_path / "raw"
    raw.mkdir()
    keys = []
    for i in range(SHARDS):
        samples = list(synthetic.generate(PER_SHARD, seed=6, size=32, start=i * PER_SHARD))
        keys += [s.key for s in samples]
        (raw / f"{i:05d}.tar").write_bytes(_shard(samples))
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path / "ray"), PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests/faults/node_kill_embed.py"), str(raw),
                           str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("FAULT-RESULT ")), None)
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(line.removeprefix("FAULT-RESULT "))
    assert report["node_killed_mid_run"] and report["nodes_alive"] == 2, report
    got = pq.read_table(str(tmp_path / "out/embeddings/f/tiny")).column("key").to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == sorted(keys), report  # 0 lost, 0 duplicated
    print("node-kill fault:", report)

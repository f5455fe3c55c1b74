"""Run by ``test_node_faults.py`` in its own process: embed on a real 3-node Ray cluster on this machine (a head
without CPUs + 2 worker nodes, each its own raylet and resources, via ``ray.cluster_utils.Cluster``), remove the
busiest worker node (its raylet and every worker process on it die) once the first shard is committed, and rerun
whatever the first run did not finish. Prints one JSON line: runs, the kill, error of the first run.

    python tests/faults/node_kill_embed.py <input dir> <output root>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(inp: str, out: str) -> int:
    import ray

    from pipelines.embed.job import EmbedConfig, EmbedResources, run_embed
    from pipelines.io import storage
    from tests.faults.cluster_driver import (
        NodeKiller,
        alive_nodes,
        hold_driver_until_kill,
        run_until_done,
        start_cluster,
    )

    cluster, nodes = start_cluster()
    try:
        cfg = EmbedConfig(input=inp, output_root=out, dataset="f",
                          resources=EmbedResources(batch_size=4, torch_threads=1, cpus_per_actor=0.5,
                                                   decode_cpus=0.5, decode_memory_mb=256))

        def committed() -> int:
            return len(storage.list_files(cfg.table_uri, ".parquet"))

        killer = NodeKiller(cluster, nodes, lambda: committed() >= 1, probe=committed).start()
        with hold_driver_until_kill(killer):
            runs, first_error, results = run_until_done(
                lambda: run_embed(cfg),
                lambda r: {"shards": r.shards, "skipped": r.skipped, "written": r.written, "rows": r.rows,
                           "failed": len(r.failed)},
                lambda r: not r.failed)
        kill = killer.stop()
        print("FAULT-RESULT " + json.dumps({"runs": runs, "kill": kill, "first_error": first_error,
                                            "results": results, "nodes_alive": alive_nodes(expect=2)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

"""Run by ``test_node_faults.py`` in its own process: embed on a real 3-node Ray cluster on this machine (a head
without CPUs + 2 worker nodes, each its own raylet and resources, via ``ray.cluster_utils.Cluster``), remove a
worker node (its raylet and every worker process on it die) once the first shard is committed, and rerun
whatever the first run did not finish. Prints one JSON line: runs, node_killed_mid_run, error of the first run.

    python tests/faults/node_kill_embed.py <input dir> <output root>
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(inp: str, out: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from pipelines import storage
    from pipelines.embed import EmbedConfig, EmbedResources, run_embed

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    cfg = EmbedConfig(input=inp, output_root=out, dataset="f",
                      resources=EmbedResources(batch_size=4, torch_threads=1, cpus_per_actor=0.5, decode_cpus=0.5,
                                               decode_memory_mb=256))
    state = {"killed_mid_run": False}
    done = threading.Event()

    def killer() -> None:
        while not done.is_set():
            if storage.list_files(cfg.table_uri, ".parquet"):
                state["killed_mid_run"] = not done.is_set()
                cluster.remove_node(workers[0], allow_graceful=False)
                return
            time.sleep(0.1)

    threading.Thread(target=killer, daemon=True).start()
    runs, first_error = 0, None
    for _ in range(3):
        runs += 1
        try:
            result = run_embed(cfg)
        except Exception as exc:  # noqa: BLE001 - a lost node may fail the run: the next run resumes
            first_error = first_error or f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        if not result.failed:
            break
    done.set()
    print("FAULT-RESULT " + json.dumps({"runs": runs, "node_killed_mid_run": state["killed_mid_run"],
                                        "first_error": first_error, "nodes_alive":
                                        sum(1 for n in ray.nodes() if n["Alive"])}), flush=True)
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main(sys.argv[1], sys.argv[2]))

"""Run by ``test_node_faults.py`` in its own process: ``caption_archive`` over webdataset shards on a real
3-node Ray cluster (``cluster_driver.start_cluster``), the busiest worker node removed (raylet + every worker
process on it SIGKILLed) once the first part is committed, and a rerun of whatever the first run did not finish.
The untrained ``tiny`` preset (captions are not checked here, only which keys got rows). Prints one JSON line.

    python tests/faults/node_kill_caption.py <input dir> <output dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(inp: str, out: str) -> int:
    import ray

    from pipelines.caption.job import CaptionConfig, ResourceOptions, caption_archive
    from pipelines.caption.output import table_uri
    from pipelines.io import storage
    from pipelines.io.sources import SourceConfig
    from tests.faults.cluster_driver import (
        NodeKiller,
        alive_nodes,
        hold_driver_until_kill,
        run_until_done,
        start_cluster,
    )

    cluster, nodes = start_cluster()
    try:
        # 0.25 CPU per actor and read task: the whole job still fits the surviving 1-CPU node after the kill
        cfg = CaptionConfig(input=inp, output=out, model="tiny", allow_untrained=True, source=SourceConfig(),
                            resources=ResourceOptions(clip_batch_size=4, caption_batch_size=4, decode_block_rows=4,
                                                      read_cpus=0.25, cpus_per_actor=0.25, torch_threads=1,
                                                      read_memory_mb=256),
                            clip_score=False, progress_interval_s=2.0)

        def committed() -> int:
            return len(storage.list_files(table_uri(out), ".parquet"))

        killer = NodeKiller(cluster, nodes, lambda: committed() >= 1, probe=committed).start()
        with hold_driver_until_kill(killer):
            runs, first_error, results = run_until_done(
                lambda: caption_archive(cfg),
                lambda s: {"parts_total": s.parts_total, "skipped": s.parts_skipped, "done": s.parts_done,
                           "images": s.images, "errors": s.errors, "failed": len(s.parts_failed),
                           "exit_code": s.exit_code},
                lambda s: s.exit_code == 0)
        kill = killer.stop()
        print("FAULT-RESULT " + json.dumps({"runs": runs, "kill": kill, "first_error": first_error,
                                            "results": results, "nodes_alive": alive_nodes(expect=2)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

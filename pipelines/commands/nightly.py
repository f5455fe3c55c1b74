"""``clipcap nightly``: one nightly retraining run (``pipelines.train.nightly.run_nightly``).

    clipcap nightly --input s3://b/embeddings/cc3m/ViT-B-32-openai --state s3://b/nightly/cc3m \
        --initial-model s3://b/models/cc3m-mlp --workers 2 --gpu --metric cider --tolerance 0.02
    clipcap nightly --state s3://b/nightly/cc3m --status        # print the pointer and the decision history

Safe to run at any time: a no-op when no new shard arrived; the production pointer (``<state>/production.json``)
moves only when the candidate is not worse than production on the fixed held-out set. Exit code 0 for
promoted / no-op, 3 when the candidate was refused (so schedulers can alert on it).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipelines.commands import common, flags, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "nightly retraining on fresh embedding shards + guarded promotion"

CONFIG = "pipelines.train.nightly:NightlyConfig"  # its fields are the flags (pipelines.commands.flags)
REFUSED_EXIT = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "the command's config")
    flags.add(p, CONFIG)
    p.add_argument("--status", action="store_true", help="print the pointer and history of --state and exit")
    common.add_ray_address(p)


def config_from_args(args: argparse.Namespace) -> Any:
    return options.from_args(args, CONFIG)


def run(args: argparse.Namespace) -> int:
    from pipelines.train import nightly

    if args.status:
        if not args.state:
            raise ValueError("--status needs --state")
        print(json.dumps({"production": nightly.read_pointer(args.state),
                          "history": nightly.read_history(args.state)}, indent=2, default=str))
        return 0
    cfg = config_from_args(args)
    common.init_ray(args.ray_address)
    result = nightly.run_nightly(cfg)
    print(json.dumps({"decision": result.decision, "reason": result.reason, "run": result.run,
                      "new_shards": list(result.new_shards), "candidate": result.candidate,
                      "candidate_metrics": result.candidate_metrics,
                      "production_metrics": result.production_metrics, "production": result.pointer},
                     indent=2, default=str))
    return REFUSED_EXIT if result.decision == "refused" else 0

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

from pipelines.commands import common, options
from pipelines.commands.train import FIELDS as TRAIN_FIELDS
from pipelines.commands.train import add_common_arguments

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "nightly retraining on fresh embedding shards + guarded promotion"

_FIELDS: dict[str, tuple[str, str]] = {
    **{k: v for k, v in TRAIN_FIELDS.items() if v[0] in ("train", "scale", "run")},
    "input": ("", "tables"), "state": ("", "state"), "initial_model": ("", "initial_model"),
    "replay_ratio": ("", "replay_ratio"), "heldout_fraction": ("", "heldout_fraction"),
    "heldout_max": ("", "heldout_max"), "metric": ("", "metric"), "tolerance": ("", "tolerance"),
    "eval_gpus": ("", "eval_num_gpus"),
}
REFUSED_EXIT = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--input", nargs="+", help="embedding table folders to watch for new shards")
    common.old_spellings(p, {"--tables": "--input"})
    p.add_argument("--state", help="state folder: manifest, held-out set, production pointer, history")
    p.add_argument("--initial-model", help="preset or artifact URI used while nothing is in production")
    p.add_argument("--replay-ratio", type=float, help="replayed older rows per new row (seeded sample)")
    p.add_argument("--heldout-fraction", type=float,
        help='fraction of keys held out (frozen on the first run)')
    p.add_argument("--heldout-max", type=int, help="rows frozen into the held-out set on the first run")
    p.add_argument("--metric", choices=["cider", "bleu4", "exact_match", "clip_score", "val_loss"],
        help='held-out metric that decides promotion')
    p.add_argument("--tolerance", type=float, help="how much worse (absolute) a candidate may be and still promote")
    p.add_argument("--eval-gpus", type=float, help="GPUs for the evaluation task")
    p.add_argument("--status", action="store_true", help="print the pointer and history of --state and exit")


def config_from_args(args: argparse.Namespace) -> Any:
    from pipelines.train.nightly import NightlyConfig

    return options.build(NightlyConfig, options.collect(args, _FIELDS), _FIELDS)


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

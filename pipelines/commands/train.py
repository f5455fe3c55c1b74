"""``clipcap train``: train a ClipCap model on embedding tables with Ray Train (``pipelines.train.job``).

    clipcap train --input s3://b/embeddings/cc3m/ViT-B-32-openai --output s3://b/runs --name cc3m-mlp \
        --model clipcap-mlp --workers 4 --gpu --epochs 10
    clipcap train --config train.yaml --set train.lr=1e-4 --set run.checkpoint_every=200
    clipcap train --decoder decap --input s3://b/text-embeddings/corpus/ViT-B-32-openai --output s3://b/runs \
        --name corpus-decap --noise-std 0.1 --memory-size 50000          # text only (DeCap); see pipelines.train.decap

``--mapping``/``--prefix-length``/``--freeze-lm`` go into ``model_overrides``. Re-running with the same
``--output`` and ``--name`` resumes.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, flags, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "train a ClipCap model on embedding tables (Ray Train)"
CONFIG = "pipelines.train.job:TrainJobConfig"  # its fields are the flags (pipelines.commands.flags)
# preset overrides: flag dest -> dotted ModelConfig key under model_overrides (a dict, not a dataclass)
_MODEL_FLAGS = {"mapping": "mapping.kind", "prefix_length": "mapping.prefix_length", "freeze_lm": "lm.freeze"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "the command's config")
    flags.add(p, CONFIG)
    g = p.add_argument_group("preset overrides (model_overrides)")
    g.add_argument("--mapping", choices=["mlp", "transformer"], help="mapping network")
    g.add_argument("--prefix-length", type=int, help="prefix length k")
    g.add_argument("--freeze-lm", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze (or tune) the language model")
    common.add_ray_address(p)


def config_from_args(args: argparse.Namespace) -> Any:
    """A validated TrainJobConfig from ``--config``, flags and ``--set`` (in that order of precedence)."""
    overrides = {key: getattr(args, dest) for dest, key in _MODEL_FLAGS.items() if getattr(args, dest, None) is not None}
    return options.from_args(args, CONFIG, extra={"model_overrides": overrides} if overrides else None)


def run(args: argparse.Namespace) -> int:
    from pipelines.train.job import run_training

    cfg = config_from_args(args)  # config errors before any Ray process starts
    common.init_ray(args.ray_address)
    result = run_training(cfg)
    common.print_result(None, {"artifact": result.artifact, "run_dir": result.run_dir, "metrics": result.metrics,
                               "dropped_rows": result.input_errors, "health": result.health})
    return 0

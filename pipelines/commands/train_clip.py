"""``clipcap train-clip``: contrastive CLIP training / fine-tuning on webdataset shards with Ray Train.

    clipcap train-clip --input s3://b/raw/mydomain --output s3://b/clip-runs --name vitb32-mydomain \
        --clip ViT-B-32 --clip-pretrained openai --lock-image --lr 1e-5 --epochs 3 --workers 8 --gpu --precision bf16
    clipcap train-clip --input data/raw/synthetic --output data/clip-runs --name tiny --clip tiny --from-scratch

Re-running with the same ``--output`` and ``--name`` resumes from the latest checkpoint. Prints the weights
file, which ``clipcap embed`` / ``train-clip`` / ``eval-clip`` take as ``--clip-pretrained``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, flags, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "train or fine-tune CLIP contrastively (Ray Train)"

CONFIG = "pipelines.clip.job:ClipTrainJobConfig"  # its fields are the flags (pipelines.commands.flags)


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "ClipTrainJobConfig", "train.beta2=0.95")
    flags.add(p, CONFIG)
    common.add_ray_address(p)


def config_from_args(args: argparse.Namespace) -> Any:
    return options.from_args(args, CONFIG)


def run(args: argparse.Namespace) -> int:
    from pipelines.clip.job import plan, run_clip_training

    cfg = config_from_args(args)
    plan(cfg)  # model, weights and shards checked before Ray starts
    common.init_ray(args.ray_address)
    result = run_clip_training(cfg)
    common.print_result(None, {"weights": result.weights, "model_dir": result.model_dir, "run_dir": result.run_dir,
                               "metrics": result.metrics})
    return 0

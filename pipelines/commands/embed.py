"""``clipcap embed``: webdataset shards -> CLIP embedding tables (``pipelines.embed.job``).

    clipcap embed --input s3://bucket/cc3m/raw --output s3://bucket/clipcap --dataset cc3m \
        --clip ViT-B-32 --clip-pretrained openai --num-actors 4 --gpus-per-actor 1 --batch-size 256
    clipcap embed --config embed.yaml                # YAML/JSON with EmbedConfig fields; flags win

Output: ``<output>/embeddings/<dataset>/<clip-tag>/part-<shard>.parquet`` (errors table under
``<output>/_meta/embeddings/...``); a rerun skips finished shards and retries shards that could not be read.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, flags, options

# SIGTERM / Ctrl-C: stop committing, say how many shards are committed, exit 143 / 130 (pipelines.stopping)
STOP_ON_SIGNALS = True
JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "embed webdataset shards with CLIP into Parquet tables"
CONFIG = "pipelines.embed.job:EmbedConfig"  # its fields are the flags (pipelines.commands.flags)
_JOB_FIELDS = ("input", "output", "dataset", "force_unlock")  # the flags of this command, not of the CLIP and pool


def add_options(p: argparse.ArgumentParser) -> None:
    """Model and resource options shared by ``clipcap embed`` and ``jobs/embed_cc3m.py``."""
    flags.add(p, CONFIG, skip=_JOB_FIELDS, title="embed (CLIP)")


def options_from_args(args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flags given, as a nested EmbedConfig mapping."""
    return options.flags(args, flags.fields(CONFIG), skip=skip)


def config_from_args(args: argparse.Namespace) -> Any:
    return options.from_args(args, CONFIG)


def run(args: argparse.Namespace) -> int:
    from pipelines.embed.job import run_embed

    result = run_embed(config_from_args(args), ray_address=args.ray_address)
    common.print_result(result.describe(), result.to_dict())
    common.print_not_done(result.failed, "clipcap embed: shard not done (rerun to retry): {name}: {why}")
    return result.exit_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "EmbedConfig", "resources.batch_size=128")
    flags.add(p, CONFIG)
    common.add_ray_address(p, common.RAY_ADDRESS_HEAD_HELP)

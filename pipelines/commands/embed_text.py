"""``clipcap embed-text``: a caption corpus -> CLIP text-embedding tables (``pipelines.embed.text``).

    clipcap embed-text --input s3://bucket/corpus/captions.txt --output s3://bucket/clipcap --dataset corpus \
        --clip ViT-B-32 --clip-pretrained openai --num-actors 2 --gpus-per-actor 1
    clipcap embed-text --input data/raw/synthetic --output data --dataset synthetic    # img2dataset shards
    clipcap embed-text --input captions.csv --caption-col text --key-col id ...            # csv/tsv/jsonl/parquet

Output: ``<output>/text-embeddings/<dataset>/<clip-tag>/part-<id>.parquet`` (key, caption, text_embedding)
+ ``_errors/``; a rerun skips finished parts. Train a text-only (DeCap) captioner on it with
``clipcap train --decoder decap --input <that folder>``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, flags, options

# SIGTERM / Ctrl-C: stop committing, say how many parts are committed, exit 143 / 130 (pipelines.stopping)
STOP_ON_SIGNALS = True
JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "embed a caption corpus with the CLIP text tower into Parquet"

CONFIG = "pipelines.embed.text:EmbedTextConfig"  # its fields are the flags (pipelines.commands.flags)


def config_from_args(args: argparse.Namespace) -> Any:
    return options.from_args(args, CONFIG)


def run(args: argparse.Namespace) -> int:
    from pipelines.embed.text import run_embed_text

    result = run_embed_text(config_from_args(args), ray_address=args.ray_address)
    common.print_result(result.describe(), result.to_dict())
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "EmbedTextConfig", "resources.batch_size=256")
    flags.add(p, CONFIG)
    common.add_ray_address(p, common.RAY_ADDRESS_HEAD_HELP)

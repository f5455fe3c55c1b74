"""``clipcap embed``: webdataset shards -> CLIP embedding tables (``pipelines.embed.job``).

    clipcap embed --input s3://bucket/cc3m/raw --output s3://bucket/clipcap --dataset cc3m \
        --clip ViT-B-32 --clip-pretrained openai --num-actors 4 --gpus-per-actor 1 --batch-size 256
    clipcap embed --config embed.yaml                # YAML/JSON with EmbedConfig fields; flags win

Output: ``<output>/embeddings/<dataset>/<clip-tag>/part-<shard>.parquet`` (errors table under
``<output>/_meta/embeddings/...``); a rerun skips finished shards and retries shards that could not be read.
Exit code: 0 all shards done, 4 some shards could not be read (named on stderr) or the output failed part-way,
5 none done, 2 bad config, 143 / 130 stopped by SIGTERM / Ctrl-C (a rerun resumes).
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, options

# SIGTERM / Ctrl-C: stop committing, say how many shards are committed, exit 143 / 130 (pipelines.stopping)
STOP_ON_SIGNALS = True
JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "embed webdataset shards with CLIP into Parquet tables"
# flag dest -> (EmbedConfig section or "" for the top level, field name)
FIELDS: dict[str, tuple[str, str]] = {
    "input": ("", "input"), "output": ("", "output_root"), "dataset": ("", "dataset"),
    "dtype": ("", "dtype"), "precision": ("", "precision"), "text_embeddings": ("", "text_embeddings"),
    "force_unlock": ("", "force_unlock"),
    "clip": ("encoder", "model_name"), "clip_pretrained": ("encoder", "pretrained"),
    "num_actors": ("resources", "num_actors"), "cpus_per_actor": ("resources", "cpus_per_actor"),
    "gpus_per_actor": ("resources", "gpus_per_actor"), "torch_threads": ("resources", "torch_threads"),
    "batch_size": ("resources", "batch_size"), "decode_cpus": ("resources", "decode_cpus"),
    "decode_memory_mb": ("resources", "decode_memory_mb"),
}


def add_options(p: argparse.ArgumentParser) -> None:
    """Model and resource options shared by ``clipcap embed`` and ``jobs/embed_cc3m.py``."""
    common.add_flags(p.add_argument_group("embed (CLIP)"), """
        --clip              str     open_clip model name (default: tiny), e.g. ViT-B-32
        --clip-pretrained   str     open_clip tag (openai, laion2b_s34b_b79k...), local file or s3:// URI
        --dtype             float32|float16  stored embedding dtype
        --precision         auto|fp32|fp16|bf16  auto: fp16 autocast on GPU
        --text-embeddings   switch  also embed the captions
        --batch-size        int     images per CLIP forward
        --num-actors        int     CLIP actors, one model each (default: one per GPU; on CPU one per core,
                                    up to 8 per node, and on one node those as concurrent batches of one actor)
        --cpus-per-actor    float   Ray CPUs reserved per CLIP actor (default 1; not a thread cap)
        --gpus-per-actor    float   default: 1 when the cluster has GPUs
        --torch-threads     int     torch threads per CPU actor (default: the node's cores / its actors)
        --decode-cpus       float   CPUs per decode task (default 1)
        --decode-memory-mb  int     memory per decode task (a shard is read whole)
    """)
    common.old_spellings(p, {"--model": "--clip", "--pretrained": "--clip-pretrained"})


def options_from_args(args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flags given, as a nested EmbedConfig mapping."""
    return options.flags(args, FIELDS, skip=skip)


def config_from_args(args: argparse.Namespace) -> Any:
    from pipelines.embed.job import EmbedConfig

    return options.build(EmbedConfig, options.collect(args, FIELDS), FIELDS)


def run(args: argparse.Namespace) -> int:
    from pipelines.embed.job import run_embed

    result = run_embed(config_from_args(args), ray_address=args.ray_address)
    common.print_result(result.describe(), result.to_dict())
    common.print_not_done(result.failed, "clipcap embed: shard not done (rerun to retry): {name}: {why}")
    return result.exit_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "EmbedConfig", "resources.batch_size=128")
    common.add_flags(p, """
        --input         str     img2dataset output folder (webdataset .tar shards)
        --output        str     storage root; tables go to <output>/embeddings/<dataset>/<clip-tag>/
        --dataset       str     dataset name in the output path
        --force-unlock  switch  take the table's lease (_meta/.../lease.json) even from a run that looks alive
    """)
    common.old_spellings(p, {"--output-root": "--output"})
    common.add_ray_address(p, common.RAY_ADDRESS_HEAD_HELP)
    add_options(p)

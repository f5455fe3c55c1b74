"""``clipcap embed``: webdataset shards -> CLIP embedding tables (``pipelines.embed``).

    clipcap embed --input s3://bucket/cc3m/raw --output-root s3://bucket/clipcap --dataset cc3m \
        --model ViT-B-32 --pretrained openai --num-actors 4 --gpus-per-actor 1 --batch-size 256
    clipcap embed --config embed.yaml                # YAML/JSON with EmbedConfig fields; flags win

Output: ``<output-root>/embeddings/<dataset>/<clip-tag>/part-<shard>.parquet`` (errors table under
``<output-root>/_meta/embeddings/...``); a rerun skips finished shards and retries shards that could not be read.
Exit code: 0 all shards done, 4 some shards could not be read (named on stderr), 5 none done, 2 bad config.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipelines.commands import options

# flag dest -> (EmbedConfig section or "" for the top level, field name)
FIELDS: dict[str, tuple[str, str]] = {
    "input": ("", "input"), "output_root": ("", "output_root"), "dataset": ("", "dataset"),
    "dtype": ("", "dtype"), "precision": ("", "precision"), "text_embeddings": ("", "text_embeddings"),
    "model": ("encoder", "model_name"), "pretrained": ("encoder", "pretrained"),
    "num_actors": ("resources", "num_actors"), "cpus_per_actor": ("resources", "cpus_per_actor"),
    "gpus_per_actor": ("resources", "gpus_per_actor"), "torch_threads": ("resources", "torch_threads"),
    "batch_size": ("resources", "batch_size"), "decode_cpus": ("resources", "decode_cpus"),
    "decode_memory_mb": ("resources", "decode_memory_mb"),
}


def add_options(p: argparse.ArgumentParser) -> None:
    """Model and resource options shared by ``clipcap embed`` and ``jobs/embed_cc3m.py``."""
    g = p.add_argument_group("embed (CLIP)")
    g.add_argument("--model", help="open_clip model name (default: tiny), e.g. ViT-B-32")
    g.add_argument("--pretrained", help="open_clip tag (openai, laion2b_s34b_b79k...), local file or s3:// URI")
    g.add_argument("--dtype", choices=["float32", "float16"], help="stored embedding dtype")
    g.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 autocast on GPU")
    g.add_argument("--text-embeddings", action="store_true", default=None, help="also embed the captions")
    g.add_argument("--batch-size", type=int, help='images per CLIP forward')
    g.add_argument("--num-actors", type=int, help="CLIP actors, one model each (default: one per GPU, or per CPU node)")
    g.add_argument("--cpus-per-actor", type=float, help="Ray CPUs reserved per CLIP actor (default 1; not a thread cap)")
    g.add_argument("--gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs")
    g.add_argument("--torch-threads", type=int,
                   help="torch threads per CPU actor (default: the node's cores / its actors)")
    g.add_argument("--decode-cpus", type=float, help="CPUs per decode task (default 1)")
    g.add_argument("--decode-memory-mb", type=int, help="memory per decode task (a shard is read whole)")


def options_from_args(args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flags given, as a nested EmbedConfig mapping."""
    return options.flags(args, FIELDS, skip=skip)


def config_from_args(args: argparse.Namespace) -> Any:
    from pipelines.embed import EmbedConfig

    return options.build(EmbedConfig, options.collect(args, FIELDS))


def run(args: argparse.Namespace) -> int:
    from pipelines.embed import run_embed

    result = run_embed(config_from_args(args), ray_address=args.ray_address)
    print(result.describe())
    print(json.dumps(result.to_dict(), indent=2))
    for uri, why in sorted(result.failed.items()):
        print(f"clipcap embed: shard not done (rerun to retry): {uri}: {why}", file=sys.stderr)
    return result.exit_code


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("embed", help="embed webdataset shards with CLIP into Parquet tables",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_config_arguments(p, "EmbedConfig", "resources.batch_size=128")
    p.add_argument("--input", help="img2dataset output folder (webdataset .tar shards)")
    p.add_argument("--output-root", help="storage root; tables go to <root>/embeddings/<dataset>/<clip-tag>/")
    p.add_argument("--dataset", help="dataset name in the output path")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, a running local head, "
                   "else a new local instance)")
    add_options(p)
    p.set_defaults(func=run)

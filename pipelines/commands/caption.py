"""``clipcap caption``: bulk-caption image archives into caption tables (``pipelines.caption``).

    clipcap caption --input s3://bucket/archives --output s3://bucket/captions/run1 --model s3://bucket/models/m1
    clipcap caption --config caption.yaml --overwrite          # YAML/JSON with CaptionConfig fields; flags win

Flags map onto ``CaptionConfig`` (``--strategy``/``--num-captions``/... onto ``decoding``, ``--format``/
``--part-size``/... onto ``source``, ``--stages``/``--gpus-per-actor``/... onto ``resources``);
``--set KEY=VALUE`` reaches any other key.
Output: ``<output>/captions/part-*.parquet`` (the caption table) and ``<output>/_meta/`` (errors table, run
record, summary). Exit code: 0 every part done, 4 some parts could not be read (named on stderr; a rerun
retries them), 5 none done, 2 a bad config, input, output or model (before any work).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipelines.commands import options
from pipelines.commands.caption_images import add_projection_arguments

# flag dest -> (config section or "" for the top level, field name)
_FIELDS: dict[str, tuple[str, str]] = {
    "input": ("", "input"), "output": ("", "output"), "model": ("", "model"), "overwrite": ("", "overwrite"),
    "rerank": ("", "rerank"), "clip_score": ("", "clip_score"),
    "allow_untrained": ("", "allow_untrained"),
    "format": ("source", "format"), "part_size": ("source", "part_size"), "max_pixels": ("source", "max_pixels"),
    "image_column": ("source", "image_column"), "url_column": ("source", "url_column"),
    "key_column": ("source", "key_column"), "allow_private_urls": ("source", "allow_private_urls"),
    "allow_object_store_urls": ("source", "allow_object_store_urls"),
    "strategy": ("decoding", "strategy"), "num_captions": ("decoding", "n"), "beam_size": ("decoding", "beam_size"),
    "max_length": ("decoding", "max_length"), "temperature": ("decoding", "temperature"),
    "top_p": ("decoding", "top_p"), "top_k": ("decoding", "top_k"), "stop_token": ("decoding", "stop_token"),
    "seed": ("decoding", "seed"),
    "decode_block_rows": ("resources", "decode_block_rows"), "clip_batch_size": ("resources", "clip_batch_size"),
    "caption_batch_size": ("resources", "caption_batch_size"), "clip_actors": ("resources", "clip_actors"),
    "caption_actors": ("resources", "caption_actors"), "stages": ("resources", "stages"), "read_cpus": ("resources", "read_cpus"),
    "cpus_per_actor": ("resources", "cpus_per_actor"), "torch_threads": ("resources", "torch_threads"), "gpus_per_actor": ("resources", "gpus_per_actor"),
    "precision": ("resources", "precision"), "jpeg_draft": ("resources", "jpeg_draft"),
    "projection": ("projection", "mode"), "memory": ("projection", "memory"),
    "memory_size": ("projection", "memory_size"), "tau": ("projection", "tau"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "CaptionConfig", "decoding.top_k=40")
    p.add_argument("--input", help="directory, archive or Parquet file URI (local, s3://, ...)")
    p.add_argument("--output", help="caption table directory URI")
    p.add_argument("--model", help="trained model artifact URI (required; `clipcap train` or "
                   "`clipcap import-reference` makes one)")
    p.add_argument("--allow-untrained", action="store_true", default=None,
                   help="accept an untrained preset as --model (random captions: wiring tests, benchmarks)")
    p.add_argument("--overwrite", action="store_true", default=None, help="redo every part of the output")
    p.add_argument("--format", choices=["auto", "images", "tar", "zip", "webdataset", "parquet", "embeddings"],
                   help="input format (default auto: by file extension)")
    p.add_argument("--part-size", type=int, help="loose images (or Parquet rows) per output part")
    p.add_argument("--max-pixels", type=int, help="decompression-bomb limit per image")
    p.add_argument("--image-column", help="Parquet input: column with the encoded image bytes")
    p.add_argument("--url-column", help="Parquet input: column with image URLs (fetched when no bytes)")
    p.add_argument("--key-column", help="Parquet input: column with the row key (default: row position)")
    p.add_argument("--strategy", choices=["greedy", "beam", "reference-beam", "sample"],
                   help="decoding strategy (default greedy)")
    p.add_argument("--allow-private-urls", action="store_true", default=None,
                   help="URL inputs: fetch private / loopback / link-local hosts too (refused by default)")
    p.add_argument("--allow-object-store-urls", action="store_true", default=None,
                   help="URL inputs: fetch s3:// / gs:// URLs with this job's credentials (refused by default)")
    p.add_argument("--num-captions", type=int, help="captions per image (beam / sample)")
    p.add_argument("--rerank", choices=["none", "clip"], help="clip: rank each image's captions by CLIP similarity")
    p.add_argument("--no-clip-score", dest="clip_score", action="store_false", default=None,
                   help="skip the clip_score column (saves the CLIP text forward per caption)")
    p.add_argument("--beam-size", type=int, help="beams per image (beam / reference-beam)")
    p.add_argument("--max-length", type=int, help="new tokens at most")
    p.add_argument("--temperature", type=float, help="sampling temperature (sample)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (sample)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (sample)")
    p.add_argument("--stop-token", help='e.g. "." (the authors\' models stop there)')
    p.add_argument("--seed", type=int, help="sampling seed (sample)")
    p.add_argument("--decode-block-rows", type=int, help="rows per block out of the decode tasks")
    p.add_argument("--clip-batch-size", type=int, help="images per CLIP forward")
    p.add_argument("--caption-batch-size", type=int, help="embeddings per decoding batch")
    p.add_argument("--stages", choices=["auto", "fused", "split"],
                   help="fused (auto): CLIP + captioner in one actor; split: a CLIP pool feeding a captioning pool")
    p.add_argument("--clip-actors", type=int, help="split stages: CLIP actors (default: sized from the cluster)")
    p.add_argument("--caption-actors", type=int,
                   help="captioning (or fused) actors, one model each (default: one per GPU, or per CPU node)")
    p.add_argument("--read-cpus", type=float, help="CPUs per read/decode task (default 1)")
    p.add_argument("--cpus-per-actor", type=float, help="Ray CPUs reserved per actor (default 1; not a thread cap)")
    p.add_argument("--torch-threads", type=int, help="torch threads per actor (default: the node's cores / its actors)")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default: 1 when the cluster has GPUs)")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on GPU, fp32 on CPU")
    p.add_argument("--jpeg-draft", action="store_true", default=None,
                   help="faster JPEG decoding by DCT scaling (pixels differ slightly)")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    add_projection_arguments(p)


def config_from_args(args: argparse.Namespace) -> Any:
    """Build a validated CaptionConfig from ``--config``, flags and ``--set`` (unknown keys / bad types fail)."""
    from clipcap_core.configs import ConfigError
    from pipelines.caption import CaptionConfig

    data = options.collect(args, _FIELDS)
    if not data.get("model"):
        from pipelines.caption_stages import UNTRAINED_HINT

        raise ConfigError("--model is required: " + UNTRAINED_HINT.format(uri="(none)").split("; ", 1)[1])
    return options.build(CaptionConfig, data)


def run(args: argparse.Namespace) -> int:
    from pipelines.caption import caption_archive

    cfg = config_from_args(args)
    if args.ray_address:
        from pipelines import runtime

        runtime.ensure_ray(args.ray_address)
    # otherwise Ray Data connects when the pipeline starts (RAY_ADDRESS, or a local instance): job-level
    # faults are reported before any Ray process starts
    summary = caption_archive(cfg)
    print(json.dumps(summary.as_dict(), indent=2))
    for part, why in sorted(summary.parts_failed.items()):
        print(f"clipcap caption: part {part} not done (rerun to retry): {why}", file=sys.stderr)
    return summary.exit_code


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("caption", help="bulk-caption image archives into caption tables",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)

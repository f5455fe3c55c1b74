"""``clipcap download``: URL list -> webdataset shards with img2dataset (``pipelines.download.job``).

    clipcap download --input cc3m/Train_GCC-training.tsv --output s3://bucket/cc3m/raw \
        --processes 16 --threads 64 --image-size 256
    clipcap download --config download.yaml          # YAML/JSON with DownloadConfig fields; flags win

A headerless TSV (CC3M) is detected from its first row; ``--no-header --columns caption,url`` says so explicitly.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "download a URL list into webdataset shards (img2dataset)"
# flag dest -> DownloadConfig field
FIELDS = {k: ("", v) for k, v in {
    "input": "url_list", "output": "output", "input_format": "input_format", "header": "header",
    "columns": "columns", "url_col": "url_col", "caption_col": "caption_col", "image_size": "image_size",
    "resize_mode": "resize_mode", "resize_only_if_bigger": "resize_only_if_bigger",
    "encode_format": "encode_format", "encode_quality": "encode_quality", "min_image_size": "min_image_size",
    "processes": "processes_count", "threads": "thread_count", "shard_size": "number_sample_per_shard",
    "distributor": "distributor", "timeout": "timeout", "retries": "retries", "incremental": "incremental",
    "allow_private_urls": "allow_private_urls",
}.items()}


def add_options(p: argparse.ArgumentParser) -> None:
    """img2dataset options shared by ``clipcap download`` and ``jobs/embed_cc3m.py``."""
    g = p.add_argument_group("download (img2dataset)")
    common.add_flags(g, "--input-format  auto|tsv|csv|parquet|jsonl  URL list format (default auto: from the file name)")
    g.add_argument("--header", dest="header", action="store_true", default=None, help="tsv/csv has a header row")
    g.add_argument("--no-header", dest="header", action="store_false", help="tsv/csv has no header (CC3M)")
    g.add_argument("--columns", type=lambda s: s.split(","), help="column names of a headerless file "
                   "(default caption,url)")
    common.add_flags(g, """
        --url-col           str     column with the image URLs (default url)
        --caption-col       str     column with the captions (default caption)
        --image-size        int     side of the stored images in pixels (default 256)
        --resize-mode       no|border|keep_ratio|keep_ratio_largest|center_crop
                                    img2dataset resize mode (default keep_ratio)
        --resize-only-if-bigger  switch  never upscale small images
        --encode-format     jpg|png|webp  stored image format (default jpg)
        --encode-quality    int     jpg/webp quality 0-100 or png compression 0-9
        --min-image-size    int     drop images smaller than this many pixels per side
        --processes         int     img2dataset processes
        --threads           int     download threads per process
        --shard-size        int     samples per shard
        --distributor       multiprocessing|ray  img2dataset distributor (ray: one task per shard on the cluster)
        --timeout           int     seconds per URL before it counts as failed (retried on the next run)
        --retries           int     img2dataset retries per URL within a run
        --allow-private-urls  switch  download from private / loopback / link-local hosts too (trusted internal
                                    lists only)
    """)
    g.add_argument("--overwrite", dest="incremental", action="store_false", default=None,
                   help="delete the output folder first (default: incremental, finished shards are skipped)")


def options_from_args(args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return options.flags(args, FIELDS, skip=skip)


def config_from_args(args: argparse.Namespace) -> Any:
    from pipelines.download.job import DownloadConfig

    return options.build(DownloadConfig, options.collect(args, FIELDS), FIELDS)


def run(args: argparse.Namespace) -> int:
    from pipelines.download.job import run_download, summary_json

    summary = run_download(config_from_args(args), ray_address=args.ray_address)
    common.print_result(summary.describe(), summary_json(summary))
    return summary.exit_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "DownloadConfig", "timeout=20")
    common.add_flags(p, """
        --input         str     URL list: tsv / csv / parquet / jsonl file (or folder of them), any fsspec URI
        --output        str     shard folder URI (local, s3://, ...)
    """)
    common.old_spellings(p, {"--url-list": "--input"})
    common.add_ray_address(p, "with --distributor ray (default: RAY_ADDRESS or a local instance)")
    add_options(p)

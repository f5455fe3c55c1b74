"""``clipcap download``: URL list -> webdataset shards with img2dataset (``pipelines.download.job``).

    clipcap download --input cc3m/Train_GCC-training.tsv --output s3://bucket/cc3m/raw \
        --processes 16 --threads 64 --image-size 256
    clipcap download --config download.yaml          # YAML/JSON with DownloadConfig fields; flags win

A headerless TSV (CC3M) is detected from its first row; ``--no-header --columns caption,url`` says so explicitly.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, flags, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "download a URL list into webdataset shards (img2dataset)"
CONFIG = "pipelines.download.job:DownloadConfig"  # its fields are the flags (pipelines.commands.flags)


def add_options(p: argparse.ArgumentParser) -> None:
    """img2dataset options shared by ``clipcap download`` and ``jobs/embed_cc3m.py``."""
    flags.add(p, CONFIG, skip=("input", "output"), title="download (img2dataset)")


def options_from_args(args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return options.flags(args, flags.fields(CONFIG), skip=skip)


def config_from_args(args: argparse.Namespace) -> Any:
    return options.from_args(args, CONFIG)


def run(args: argparse.Namespace) -> int:
    from pipelines.download.job import run_download, summary_json

    summary = run_download(config_from_args(args), ray_address=args.ray_address)
    common.print_result(summary.describe(), summary_json(summary))
    return summary.exit_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "DownloadConfig", "timeout=20")
    flags.add(p, CONFIG)
    common.add_ray_address(p, "with --distributor ray (default: RAY_ADDRESS or a local instance)")

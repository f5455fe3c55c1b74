"""``clipcap caption``: bulk-caption image archives into caption tables (``pipelines.caption.job``).

    clipcap caption --input s3://bucket/archives --output s3://bucket/captions/run1 --model s3://bucket/models/m1
    clipcap caption --config caption.yaml --overwrite          # YAML/JSON with CaptionConfig fields; flags win

Output: ``<output>/captions/part-*.parquet`` (the caption table) and ``<output>/_meta/`` (errors table, run
record, summary). After the summary, ``--show K`` prints ``key<TAB>caption`` for the first K images by key
(rank-0 captions of the committed table; by default all of them when there are at most ``SHOW_ALL_UP_TO``).
A rerun resumes; parts that could not be read are named on stderr and retried (exit codes: ``clipcap --help``).
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, flags, options

# SIGTERM / Ctrl-C: stop committing, say how many parts are committed, exit 143 / 130 (pipelines.stopping)
STOP_ON_SIGNALS = True
JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "bulk-caption image archives into caption tables"
SHOW_ALL_UP_TO = 20  # without --show, a run of at most this many images prints every caption
CONFIG = "pipelines.caption.job:CaptionConfig"  # its fields are the flags (pipelines.commands.flags)


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "CaptionConfig", "decoding.top_k=40")
    flags.add(p, CONFIG)
    p.add_argument("--show", type=int, metavar="K",
                   help=f"print key<TAB>caption for the first K images by key after the run (default: all when "
                        f"there are at most {SHOW_ALL_UP_TO}; 0: none)")
    common.add_ray_address(p)


def config_from_args(args: argparse.Namespace) -> Any:
    """Build a validated CaptionConfig from ``--config``, flags and ``--set`` (unknown keys / bad types fail)."""
    from clipcap_core.configs import ConfigError
    from pipelines.caption.job import CaptionConfig

    data = options.collect(args, flags.fields(CONFIG))
    if not data.get("model"):
        from pipelines.caption.stages import UNTRAINED_HINT

        raise ConfigError("--model is required: " + UNTRAINED_HINT.format(uri="(none)").split("; ", 1)[1])
    return options.build(CaptionConfig, data, flags.fields(CONFIG))


def run(args: argparse.Namespace) -> int:
    from pipelines.caption.job import caption_archive

    cfg = config_from_args(args)
    if args.show is not None and args.show < 0:
        from clipcap_core.configs import ConfigError

        raise ConfigError(f"--show must be >= 0 (0 prints no captions), got {args.show}")
    common.init_ray(args.ray_address)  # job-level faults are reported before any Ray process starts
    summary = caption_archive(cfg)
    common.print_result(None, summary.as_dict())
    common.print_not_done(summary.parts_failed, "clipcap caption: part {name} not done (rerun to retry): {why}")
    show_captions(cfg.output, args.show)
    return summary.exit_code


def show_captions(output: str, show: int | None) -> None:
    """Print ``key<TAB>caption`` lines of the first ``show`` images (None: all of at most ``SHOW_ALL_UP_TO``), so a
    small run's captions are seen without opening Parquet; a larger run gets a hint on stderr instead."""
    from pipelines.caption.output import table_uri, top_captions
    from pipelines.console import terminal

    if show == 0:
        return
    rows = top_captions(output)
    if show is None and len(rows) > SHOW_ALL_UP_TO:
        print(f"clipcap caption: {len(rows)} images captioned in {table_uri(output)}; --show K prints the first K",
              file=terminal())
        return
    for key, caption in rows[:show]:
        print(f"{key}\t{' '.join((caption or '').split())}")

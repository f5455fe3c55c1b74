"""Ray job: one nightly retraining run (``pipelines.nightly.run_nightly``), scheduled by cron / KubeRay.

    ray job submit --working-dir . -- python jobs/nightly_retrain.py \
        --tables s3://b/embeddings/cc3m/ViT-B-32-openai --state s3://b/nightly/cc3m \
        --initial-model s3://b/models/cc3m-mlp --workers 2 --gpu --metric cider --tolerance 0.02

Same flags as ``clipcap nightly``. Exit code 0: promoted or nothing new; 3: candidate refused; 2: job error.
Schedules: ``infra/kuberay/cronjob-nightly.yaml`` (Kubernetes), ``infra/cluster/nightly.cron`` (plain cluster).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir


def build_parser() -> argparse.ArgumentParser:
    from pipelines.commands.nightly import add_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipelines.commands.nightly import run

    args = build_parser().parse_args(argv)
    from pipelines.urlsafety import setup_logging

    setup_logging()  # URLs (signed query strings) redacted in every log record
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as exc:  # job-level faults (config, lock held, ...): one line
        print(f"nightly_retrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

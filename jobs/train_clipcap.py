"""Ray job: train a ClipCap model on embedding tables with Ray Train (``pipelines.train.run_training``).

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}' -- \
        python jobs/train_clipcap.py --tables s3://b/embeddings/cc3m/ViT-B-32-openai --output s3://b/runs \
        --name cc3m-mlp --model clipcap-mlp --workers 4 --gpu

Same flags as ``clipcap train`` (``--config FILE`` for a YAML / JSON TrainJobConfig, ``--set key=value``).
Re-submitting with the same ``--output`` and ``--name`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir


def build_parser() -> argparse.ArgumentParser:
    from pipelines.commands.train import add_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipelines.commands.train import run

    args = build_parser().parse_args(argv)
    from pipelines.urlsafety import setup_logging

    setup_logging()  # URLs (signed query strings) redacted in every log record
    try:
        return run(args)
    except (ValueError, OSError) as exc:  # job-level faults (config, tables, dimension mismatch): one clear line
        print(f"train_clipcap: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Ray job: contrastive CLIP training / fine-tuning on webdataset shards with Ray Train (``pipelines.clip_train``).

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}' -- \
        python jobs/train_clip.py --shards s3://b/raw/mydomain --output s3://b/clip-runs \
        --name vitb32-mydomain --model ViT-B-32 --pretrained openai --lr 1e-5 --workers 4 --gpu

Same flags as ``clipcap train-clip`` (``--config FILE`` for a YAML / JSON ClipTrainJobConfig, ``--set key=value``).
Re-submitting with the same ``--output`` and ``--name`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir


def build_parser() -> argparse.ArgumentParser:
    from pipelines.commands.train_clip import add_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipelines.commands.train_clip import run

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as exc:  # job-level faults (config, tables, dimension mismatch): one clear line
        print(f"train_clip: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

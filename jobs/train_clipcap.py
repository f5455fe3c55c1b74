"""Ray job: train a ClipCap model on embedding tables with Ray Train (``pipelines.train.job.run_training``).

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}' -- \
        python jobs/train_clipcap.py --input s3://b/embeddings/cc3m/ViT-B-32-openai --output s3://b/runs \
        --name cc3m-mlp --model clipcap-mlp --workers 4 --gpu

Same flags as ``clipcap train`` (``--config FILE`` for a YAML / JSON TrainJobConfig, ``--set key=value``).
Re-submitting with the same ``--output`` and ``--name`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.cli import command_parser
from pipelines.cli import main as clipcap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir
COMMAND = "train"  # this job is `clipcap train` (same flags, logging, redaction and exit codes)


def build_parser() -> argparse.ArgumentParser:
    return command_parser(COMMAND)


def main(argv: list[str] | None = None) -> int:
    return clipcap([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

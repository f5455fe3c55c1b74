"""Ray job: one nightly retraining run (``pipelines.train.nightly.run_nightly``), scheduled by cron / KubeRay.

    ray job submit --working-dir . -- python jobs/nightly_retrain.py \
        --input s3://b/embeddings/cc3m/ViT-B-32-openai --state s3://b/nightly/cc3m \
        --initial-model s3://b/models/cc3m-mlp --workers 2 --gpu --metric cider --tolerance 0.02

Same flags as ``clipcap nightly``. Exit code 0: promoted or nothing new; 3: candidate refused; 2: job error.
Schedules: ``infra/kuberay/cronjob-nightly.yaml`` (Kubernetes), ``infra/cluster/nightly.cron`` (plain cluster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.cli import command_parser
from pipelines.cli import main as clipcap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir
COMMAND = "nightly"  # this job is `clipcap nightly` (same flags, logging, redaction and exit codes)


def build_parser() -> argparse.ArgumentParser:
    return command_parser(COMMAND)


def main(argv: list[str] | None = None) -> int:
    return clipcap([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

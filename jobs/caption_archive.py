"""Ray job: bulk-caption an image archive into caption tables (``pipelines.caption.job.caption_archive``).

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}' -- \
        python jobs/caption_archive.py --input s3://b/archives --output s3://b/captions/run1 --model s3://b/models/m1

Same flags as ``clipcap caption`` (``--config FILE`` for a YAML / JSON CaptionConfig).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.cli import command_parser
from pipelines.cli import main as clipcap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir
COMMAND = "caption"  # this job is `clipcap caption` (same flags, logging, redaction and exit codes)


def build_parser() -> argparse.ArgumentParser:
    return command_parser(COMMAND)


def main(argv: list[str] | None = None) -> int:
    return clipcap([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

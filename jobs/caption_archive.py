"""Ray job: bulk-caption an image archive into caption tables (``pipelines.caption.caption_archive``).

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}' -- \
        python jobs/caption_archive.py --input s3://b/archives --output s3://b/captions/run1 --model s3://b/models/m1

Same flags as ``clipcap caption`` (``--config FILE`` for a YAML / JSON CaptionConfig).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipelines.commands.caption import add_arguments, run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    from pipelines.urlsafety import setup_logging

    setup_logging()  # URLs (signed query strings) redacted in every log record
    try:
        return run(parser.parse_args(argv))
    except (ValueError, OSError) as exc:  # job-level faults: one clear line
        print(f"caption_archive: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

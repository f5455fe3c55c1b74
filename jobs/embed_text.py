"""Ray job: embed a caption corpus with the CLIP text tower into text-embedding tables (``clipcap embed-text``).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/embed_text.py --input s3://bucket/corpus/captions.txt --output s3://bucket/clipcap \
            --dataset corpus --clip ViT-B-32 --clip-pretrained openai

Same flags as ``clipcap embed-text``; tables go to <output>/text-embeddings/<dataset>/<clip-tag>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipelines.cli import Parser
from pipelines.commands.embed_text import add_arguments, config_from_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working dir


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # lazy: pandas ~0.55 s to import (python -X importtime)
    from pipelines.embed.text import run_embed_text

    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        result = run_embed_text(config_from_args(args), ray_address=args.ray_address)
    except (ValueError, OSError) as exc:  # job-level faults: one clear line, before any work
        print(f"embed_text: error: {exc}", file=sys.stderr)
        return 2
    print(result.describe())
    print("RESULT " + json.dumps(result.to_dict(), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

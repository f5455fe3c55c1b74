"""``clipcap report``: one self-contained HTML report of a captioning run (``pipelines.report``).

    clipcap report --captions s3://b/captions/run1 --evaluation ./eval/run1 --run s3://b/runs/cc3m-mlp \\
                   --out report.html

The gallery samples a few parts of the caption table (never the whole table); images come from the input
recorded in the table's ``_run.json`` (or ``--images``); the model card and prefix interpretation from the
model recorded in the table (or ``--model``).
"""

from __future__ import annotations

import argparse
from typing import Any

_FIELDS = ("captions", "out", "evaluation", "run", "model", "images", "sample", "max_parts", "interpret",
           "thumb_px", "seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--captions", required=True, help="caption table folder URI")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--evaluation", help="folder written by clipcap evaluate (metric table, per-image scores)")
    p.add_argument("--run", help="training run folder with history.json (training curves)")
    p.add_argument("--model", help="model artifact (default: the one recorded in the caption table)")
    p.add_argument("--images", help="the captioned images (default: the input in the table's _run.json)")
    p.add_argument("--sample", type=int, help="images in the gallery (default 24)")
    p.add_argument("--max-parts", type=int, help="caption parts read at most (default 4)")
    p.add_argument("--interpret", type=int, help="images with prefix interpretation (default 4)")
    p.add_argument("--thumb-px", type=int, help="thumbnail size (default 160)")
    p.add_argument("--seed", type=int, help="seed of the sampled parts and images")


def run(args: argparse.Namespace) -> int:
    from clipcap_core.configs import from_dict
    from pipelines.report import ReportConfig, build_report

    cfg = from_dict(ReportConfig, {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None})
    print(build_report(cfg))
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="write a self-contained HTML report of a captioning run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)

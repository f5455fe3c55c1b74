"""``clipcap report``: one self-contained HTML report of a captioning run (``pipelines.report``).

    clipcap report --input s3://b/captions/run1 --evaluation ./eval/run1 --run s3://b/runs/cc3m-mlp \\
                   --output report.html

The page opens with what went wrong (captions matching no reference, empty or looping captions, the lowest
CLIPScores). The gallery samples a few parts of the caption table (never the whole table); images come from the input
recorded in the table's ``_run.json`` (or ``--images``); the model card and prefix interpretation from the
model recorded in the table (or ``--model``).
"""

from __future__ import annotations

import argparse

from pipelines.commands import common

HELP = "write a self-contained HTML report of a captioning run"

_FIELDS = ("evaluation", "run", "model", "images", "sample", "max_parts", "interpret",
           "thumb_px", "seed", "order", "failures", "studies")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="caption table folder URI (required)")
    p.add_argument("--output", help="the HTML file to write (required)")
    common.old_spellings(p, {"--captions": "--input", "--out": "--output"})
    common.add_flags(p, """
        --evaluation    str     folder written by clipcap evaluate (metric table, per-image scores)
        --run           str     training run folder with history.json (training curves)
        --model         str     model artifact (default: the one recorded in the caption table)
        --images        str     the captioned images (default: the input in the table's _run.json)
        --sample        int     images in the gallery (default 24)
        --max-parts     int     caption parts read at most (default 4)
        --interpret     int     images with prefix interpretation (default 4)
        --thumb-px      int     thumbnail size (default 160)
        --seed          int     seed of the sampled parts and images
        --order         worst|key  gallery order (default worst: flagged and lowest-scoring first; the page
                                can switch)
        --failures      int     rows listed per kind of failure (default 50; all are counted)
    """)
    p.add_argument("--studies", nargs="+", help="clipcap study output folders (<output>/<name>/): their tables and "
                   "plots in a Studies section")


def run(args: argparse.Namespace) -> int:
    from clipcap_core.configs import from_dict
    from pipelines.report import ReportConfig, build_report

    common.require(args, "input", "output")
    data = {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None}
    data["studies"] = tuple(data.get("studies") or ())
    cfg = from_dict(ReportConfig, {"captions": args.input, "out": args.output, **data})
    print(build_report(cfg))
    return 0

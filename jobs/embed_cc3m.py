"""Ray job: download an image-text URL list with img2dataset, then embed it with CLIP into Parquet tables.

With no arguments it runs the embedded default (a seeded synthetic captioned-image set served over local HTTP,
the `tiny` CLIP preset, output under ./data/ of the checkout) and says so. Real use (CC3M on S3, ViT-B-32):

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "...", "NO_ALBUMENTATIONS_UPDATE": "1"}}' -- \
        python jobs/embed_cc3m.py --input s3://bucket/cc3m/Train_GCC-training.tsv \
            --output s3://bucket/clipcap --dataset cc3m --clip ViT-B-32 --clip-pretrained openai \
            --processes 16 --threads 64 --batch-size 256

Tables: <output>/embeddings/<dataset>/<clip-tag>/part-<shard>.parquet; raw shards: <output>/raw/<dataset>
(or --raw). Reruns skip finished shards of both stages. ``--config FILE``: YAML / JSON EmbedJobConfig; flags win.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from clipcap_core.configs import to_dict
from pipelines.cli import DOWNLOAD, EMBED, Parser
from pipelines.commands import flags
from pipelines.io import storage
from pipelines.io.urlsafety import setup_logging

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT))  # run from a checkout or a Ray working dir
_EMBED_JOB_FIELDS = ("input", "output", "dataset", "force_unlock")  # this job's own flags, not the CLIP's or pool's


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML / JSON file with EmbedJobConfig fields (embed / download / synthetic)")
    p.add_argument("--input", help="URL list (tsv / csv / parquet / jsonl; CC3M's headerless TSV works); "
                   "without it: the synthetic embedded default")
    p.add_argument("--output", help=f"storage root (default: {CHECKOUT / 'data'})")
    p.add_argument("--dataset", help="dataset name in output paths (default: cc3m, or synthetic)")
    p.add_argument("--raw", help="shard folder (default: <output>/raw/<dataset>)")
    p.add_argument("--skip-download", action="store_true", help="embed the shards already at --raw")
    p.add_argument("--synthetic", type=int, default=256, help="samples of the embedded default (default 256)")
    p.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS, a running local head, else local)")
    flags.add(p, DOWNLOAD, skip=("input", "output"), title="download (img2dataset)")
    flags.add(p, EMBED, skip=_EMBED_JOB_FIELDS, title="embed (CLIP)")
    return p


def job_config(args: argparse.Namespace):  # -> EmbedJobConfig
    # lazy: pandas ~0.55 s to import (python -X importtime)
    from pipelines.embed.download_embed import EmbedJobConfig, default_job_config

    root = args.output or str(CHECKOUT / "data")
    if args.input or args.skip_download:  # real data: a URL list, or shards already downloaded
        dataset = args.dataset or "cc3m"
        raw = args.raw or storage.join(root, "raw", dataset)
        data = {"embed": {"input": raw, "output_root": root, "dataset": dataset},
                "download": {"url_list": args.input or "", "output": raw}}
    else:
        data = to_dict(default_job_config(root, samples=args.synthetic))
        if args.dataset:
            data["embed"]["dataset"] = args.dataset
        if args.raw:
            data["embed"]["input"] = data["download"]["output"] = args.raw
    data = flags.merge(data, flags.load_file(args.config))
    data = flags.merge(data, {"embed": flags.given(args, flags.fields(EMBED), skip=_EMBED_JOB_FIELDS),
                              "download": flags.given(args, flags.fields(DOWNLOAD), skip=("input", "output"))})
    if args.skip_download:
        data["download"] = data["synthetic"] = None  # embed the shards at --raw as they are
    elif data["download"].get("distributor") is None:  # auto: img2dataset's Ray distributor on a cluster
        data["download"]["distributor"] = "ray" if (args.ray_address or os.environ.get("RAY_ADDRESS")) \
            else "multiprocessing"
    return flags.build(EmbedJobConfig, data)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    setup_logging()  # URLs (signed query strings) redacted in every log record
    args = build_parser().parse_args(argv)
    # lazy: pandas ~0.55 s to import (python -X importtime)
    from pipelines.embed.download_embed import result_dict, run_embed_job

    try:
        cfg = job_config(args)
        if cfg.synthetic is not None:
            print(f"embed_cc3m: no --input given: running the EMBEDDED DEFAULT ({cfg.synthetic.samples} "
                  f"synthetic images, `tiny` CLIP preset trained on synthetic shapes) into {cfg.embed.output_root}",
                  flush=True)
        result = run_embed_job(cfg, ray_address=args.ray_address)
    except (ValueError, OSError) as exc:  # job-level faults: one clear line, before any work
        print(f"embed_cc3m: error: {exc}", file=sys.stderr)
        return 2
    print(result.describe())
    print("RESULT " + json.dumps(result_dict(result), sort_keys=True), flush=True)
    return result.exit_code  # 0 all done, 4 some shards not done (rerun), 5 nothing (pipelines.exitcodes)


if __name__ == "__main__":  # img2dataset's worker processes re-import this file
    sys.exit(main())

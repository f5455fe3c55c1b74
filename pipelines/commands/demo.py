"""``clipcap demo``: the embedded default end to end (synthetic data, tiny preset, output under ./data).

    clipcap demo                      # what `make demo` runs
    clipcap demo --samples 64 --output /tmp/clipcap-demo
    clipcap demo --decap              # + a text-only (DeCap) model trained on the captions alone
    clipcap demo --world scenes       # two groups and a relation, six references per image, the tiny-scenes CLIP
"""

from __future__ import annotations

import argparse
import json

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "run the embedded default end to end (tiny preset, ./data)"


def run(args: argparse.Namespace) -> int:
    from pipelines.demo.run import SAMPLES, STEPS, DemoConfig, run_demo, step_decap

    steps = [*STEPS, step_decap] if args.decap else None
    samples = args.samples or SAMPLES[args.world]
    result = run_demo(DemoConfig(root=args.output, samples=samples, seed=args.seed, ray_address=args.ray_address,
                                 world=args.world), steps=steps)
    print(result.describe())
    print(json.dumps({"embeddings_uri": result.embeddings_uri, "raw_uri": result.raw_uri, **result.paths},
                     indent=2))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="data", help="output folder (default: ./data)")
    p.add_argument("--samples", type=int, help="synthetic images (default: 1024; scenes: 2048)")
    p.add_argument("--seed", type=int, default=0, help='seed of the synthetic data set')
    p.add_argument("--ray-address", help="default: RAY_ADDRESS if set, else a private local Ray instance")
    p.add_argument("--world", choices=["synthetic", "scenes"], default="synthetic",
                   help="synthetic: one group of shapes (quick); scenes: two groups and a relation, several references")
    p.add_argument("--decap", action="store_true",
                   help="also train a text-only (DeCap) captioner on the captions and caption the held-out images")

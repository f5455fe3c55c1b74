"""``clipcap train``: train a ClipCap model on embedding tables with Ray Train (``pipelines.train``).

    clipcap train --tables s3://b/embeddings/cc3m/ViT-B-32-openai --output s3://b/runs --name cc3m-mlp \
        --model clipcap-mlp --workers 4 --gpu --epochs 10
    clipcap train --config train.yaml --set train.lr=1e-4 --set run.checkpoint_every=200
    clipcap train --decoder decap --tables s3://b/text-embeddings/corpus/ViT-B-32-openai --output s3://b/runs \
        --name corpus-decap --noise-std 0.1 --memory-size 50000          # text only (DeCap); see decap_train

Flags map onto ``TrainJobConfig`` (``--epochs``/``--lr``/... onto ``train``, ``--workers``/``--gpu``/... onto
``scale``, ``--mapping``/``--prefix-length``/``--freeze-lm`` onto ``model_overrides``); ``--set KEY=VALUE``
reaches any other key (value parsed as YAML). Re-running with the same ``--output`` and ``--name`` resumes.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipelines.commands import options

# flag dest -> (config section or "" for the top level, field name)
FIELDS: dict[str, tuple[str, str]] = {
    "tables": ("", "tables"), "output": ("", "output"), "name": ("", "name"), "model": ("", "model"),
    "heldout_fraction": ("", "heldout_fraction"),
    "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("train", "lr"),
    "warmup_steps": ("train", "warmup_steps"), "precision": ("train", "precision"), "seed": ("train", "seed"),
    "max_caption_tokens": ("train", "max_caption_tokens"),
    "workers": ("scale", "num_workers"), "gpu": ("scale", "use_gpu"), "cpus_per_worker": ("scale", "cpus_per_worker"),
    "torch_threads": ("scale", "torch_threads"),
    "checkpoint_every": ("run", "checkpoint_every"), "max_failures": ("run", "max_failures"),
    "log_every": ("run", "log_every"),
    "decoder": ("", "decoder"), "noise_std": ("decap", "noise_std"), "memory_size": ("decap", "memory_size"),
    "memory": ("decap", "memory"), "memory_seed": ("decap", "memory_seed"), "tau": ("decap", "tau"),
}
_MODEL_FLAGS = {"mapping": "mapping.kind", "prefix_length": "mapping.prefix_length", "freeze_lm": "lm.freeze"}


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by train / nightly / sweep (hyperparameters, scale, run options)."""
    options.add_config_arguments(p, "the command's config")
    p.add_argument("--epochs", type=int, help='passes over the training split')
    p.add_argument("--batch-size", type=int, help='captions per step (per worker)')
    p.add_argument("--lr", type=float, help='peak learning rate (AdamW)')
    p.add_argument("--warmup-steps", type=int, help='linear warm-up steps')
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
        help='training precision (bf16 / fp16: autocast)')
    p.add_argument("--seed", type=int, help='seed of the model init and the data order')
    p.add_argument("--max-caption-tokens", type=int,
        help='caption tokens kept per sample (incl. end-of-text)')
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float,
        help='Ray CPUs per training worker (leave some for the data tasks)')
    p.add_argument("--torch-threads", type=int,
        help='torch threads per worker (default: from --cpus-per-worker)')
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (and every epoch)")
    p.add_argument("--max-failures", type=int, help="worker-group restarts from the latest checkpoint")
    p.add_argument("--log-every", type=int, help='steps between progress lines')
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--tables", nargs="+", help="embedding table folders or files (local, s3://, ...)")
    p.add_argument("--output", help="storage root; the run lives in <output>/<name>/")
    p.add_argument("--name", help="run name (re-running with the same name resumes)")
    p.add_argument("--model", help="preset (tiny, clipcap-mlp, ...) or model artifact URI to warm-start from")
    p.add_argument("--mapping", choices=["mlp", "transformer"], help="preset override: mapping network")
    p.add_argument("--prefix-length", type=int, help="preset override: prefix length k")
    p.add_argument("--freeze-lm", action=argparse.BooleanOptionalAction, default=None,
                   help="preset override: freeze (or tune) the language model")
    p.add_argument("--heldout-fraction", type=float, help='fraction of keys held out for evaluation')
    g = p.add_argument_group("DeCap (text-only training)")
    g.add_argument("--decoder", choices=["clipcap", "decap"],
                   help="decap: train on the text_embedding of text tables (clipcap embed-text), no images")
    g.add_argument("--noise-std", type=float, help="Gaussian noise on the normalised text embedding (CapDec)")
    g.add_argument("--memory-size", type=int, help="caption embeddings stored as the projection memory "
                   "(default 10000; 0: all), sampled with --memory-seed from the training split")
    g.add_argument("--memory", help="take the memory from this text table instead of the training tables")
    g.add_argument("--memory-seed", type=int, help="seed of the memory sample")
    g.add_argument("--tau", type=float, help="projection temperature stored with the memory (default 0.01)")


def config_from_args(args: argparse.Namespace) -> Any:
    """A validated TrainJobConfig from ``--config``, flags and ``--set`` (in that order of precedence)."""
    from pipelines.train import TrainJobConfig

    overrides = {key: getattr(args, dest) for dest, key in _MODEL_FLAGS.items() if getattr(args, dest, None) is not None}
    data = options.collect(args, FIELDS, extra={"model_overrides": overrides} if overrides else None)
    return options.build(TrainJobConfig, data)


def init_ray(address: str | None) -> None:
    """Connect to an explicit ``--ray-address``. Without one, Ray starts when the job first needs it (after
    tables and model were checked): it connects to RAY_ADDRESS (``ray job submit``) or starts a local instance."""
    from pipelines import runtime

    if address:
        runtime.ensure_ray(address)


def run(args: argparse.Namespace) -> int:
    from pipelines.train import run_training

    cfg = config_from_args(args)  # config errors before any Ray process starts
    init_ray(args.ray_address)
    result = run_training(cfg)
    print(json.dumps({"artifact": result.artifact, "run_dir": result.run_dir, "metrics": result.metrics}, indent=2))
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a ClipCap model on embedding tables (Ray Train)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)

"""``clipcap train-clip``: contrastive CLIP training / fine-tuning on webdataset shards with Ray Train.

    clipcap train-clip --shards s3://b/raw/mydomain --output s3://b/clip-runs --name vitb32-mydomain \
        --model ViT-B-32 --pretrained openai --lock-image --lr 1e-5 --epochs 3 --workers 8 --gpu --precision bf16
    clipcap train-clip --shards data/raw/synthetic --output data/clip-runs --name tiny --model tiny --from-scratch

Flags map onto ``pipelines.clip_train.ClipTrainJobConfig`` (``--lr``/``--epochs``/... onto ``train``,
``--workers``/``--gpu``/... onto ``scale``, ``--model``/``--pretrained``/``--from-scratch`` onto ``model``);
``--config FILE`` gives any field and ``--set KEY=VALUE`` reaches any other (value parsed as YAML).
Re-running with the same ``--output`` and ``--name`` resumes from the latest checkpoint. Prints the weights
file, which ``clipcap embed`` / ``caption`` / ``train-clip`` take as ``--pretrained``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipelines.commands import options
from pipelines.commands.train import init_ray

_FIELDS: dict[str, tuple[str, str]] = {
    "shards": ("", "shards"), "output": ("", "output"), "name": ("", "name"),
    "heldout_fraction": ("", "heldout_fraction"),
    "model": ("model", "model_name"), "pretrained": ("model", "pretrained"), "from_scratch": ("model", "from_scratch"),
    "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("train", "lr"),
    "weight_decay": ("train", "weight_decay"), "warmup_steps": ("train", "warmup_steps"),
    "grad_clip": ("train", "grad_clip"), "precision": ("train", "precision"), "seed": ("train", "seed"),
    "local_loss": ("train", "local_loss"), "lock_image": ("train", "lock_image"), "lock_text": ("train", "lock_text"),
    "augment": ("train", "augment"),
    "workers": ("scale", "num_workers"), "gpu": ("scale", "use_gpu"), "cpus_per_worker": ("scale", "cpus_per_worker"),
    "torch_threads": ("scale", "torch_threads"),
    "checkpoint_every": ("run", "checkpoint_every"), "max_failures": ("run", "max_failures"),
    "log_every": ("run", "log_every"), "eval_max_samples": ("run", "eval_max_samples"),
}


def _choices(field_name: str) -> list[str]:
    from clipcap_core.clip_training import ClipTrainConfig

    return options.choices(ClipTrainConfig, field_name)


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "ClipTrainJobConfig", "train.beta2=0.95")
    p.add_argument("--shards", nargs="+", help="webdataset shard folders or .tar files (local, s3://, ...)")
    p.add_argument("--output", help="storage root; the run lives in <output>/<name>/")
    p.add_argument("--name", help="run name (re-running with the same name resumes)")
    p.add_argument("--model", help="open_clip model name (tiny, ViT-B-32, ...)")
    p.add_argument("--pretrained", help="fine-tune from an open_clip tag, a weights file or an object-store URI")
    p.add_argument("--from-scratch", action="store_true", default=None,
                   help="seeded random init even where the name ships weights (e.g. tiny)")
    p.add_argument("--heldout-fraction", type=float, help="samples held out by key hash for retrieval eval")
    p.add_argument("--epochs", type=int, help="passes over the training pairs")
    p.add_argument("--batch-size", type=int, help="pairs per worker per step (the loss sees workers x this)")
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (not on gains, biases, logit scale)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps before the cosine decay")
    p.add_argument("--grad-clip", type=float, help="max gradient norm (0 = off)")
    p.add_argument("--precision", choices=_choices("precision"), help="autocast precision (bf16/fp16 on GPU)")
    p.add_argument("--seed", type=int, help="init, crop and shard-order seed")
    p.add_argument("--local-loss", action="store_true", default=None,
                   help="each worker's rows against all gathered features (open_clip --local-loss)")
    p.add_argument("--lock-image", action="store_true", default=None, help="freeze the image tower")
    p.add_argument("--lock-text", action="store_true", default=None, help="freeze the text tower")
    p.add_argument("--augment", choices=_choices("augment"), help="training-time image augmentation")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker")
    p.add_argument("--torch-threads", type=int, help="torch threads per worker (0: Ray's default)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (and every epoch)")
    p.add_argument("--max-failures", type=int, help="worker-group restarts from the latest checkpoint")
    p.add_argument("--log-every", type=int, help="steps between progress lines")
    p.add_argument("--eval-max-samples", type=int, help="held-out pairs evaluated each epoch (rank 0)")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")


def config_from_args(args: argparse.Namespace) -> Any:
    from pipelines.clip_train import ClipTrainJobConfig

    return options.build(ClipTrainJobConfig, options.collect(args, _FIELDS))


def run(args: argparse.Namespace) -> int:
    from pipelines.clip_train import plan, run_clip_training

    cfg = config_from_args(args)
    plan(cfg)  # model, weights and shards checked before Ray starts
    init_ray(args.ray_address)
    result = run_clip_training(cfg)
    print(json.dumps({"weights": result.weights, "model_dir": result.model_dir, "run_dir": result.run_dir,
                      "metrics": result.metrics}, indent=2))
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("train-clip", help="train or fine-tune CLIP contrastively (Ray Train)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)

"""``clipcap train-clip``: contrastive CLIP training / fine-tuning on webdataset shards with Ray Train.

    clipcap train-clip --input s3://b/raw/mydomain --output s3://b/clip-runs --name vitb32-mydomain \
        --clip ViT-B-32 --clip-pretrained openai --lock-image --lr 1e-5 --epochs 3 --workers 8 --gpu --precision bf16
    clipcap train-clip --input data/raw/synthetic --output data/clip-runs --name tiny --clip tiny --from-scratch

Flags map onto ``pipelines.clip.job.ClipTrainJobConfig`` (``--lr``/``--epochs``/... onto ``train``,
``--workers``/``--gpu``/... onto ``scale``, ``--clip``/``--clip-pretrained``/``--from-scratch`` onto ``model``);
``--config FILE`` gives any field and ``--set KEY=VALUE`` reaches any other (value parsed as YAML).
Re-running with the same ``--output`` and ``--name`` resumes from the latest checkpoint. Prints the weights
file, which ``clipcap embed`` / ``train-clip`` / ``eval-clip`` take as ``--clip-pretrained``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "train or fine-tune CLIP contrastively (Ray Train)"

_FIELDS: dict[str, tuple[str, str]] = {
    "input": ("", "shards"), "output": ("", "output"), "name": ("", "name"),
    "heldout_fraction": ("", "heldout_fraction"),
    "clip": ("model", "model_name"), "clip_pretrained": ("model", "pretrained"), "from_scratch": ("model", "from_scratch"),
    "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("train", "lr"),
    "weight_decay": ("train", "weight_decay"), "warmup_steps": ("train", "warmup_steps"),
    "grad_clip": ("train", "grad_clip"), "precision": ("train", "precision"), "seed": ("train", "seed"),
    "local_loss": ("train", "local_loss"), "lock_image": ("train", "lock_image"), "lock_text": ("train", "lock_text"),
    "augment": ("train", "augment"),
    **common.SCALE_FIELDS, "eval_max_samples": ("run", "eval_max_samples"),
}


# The Literal values of ClipTrainConfig's precision / augment, written out: reading them from the dataclass
# imports torch (~30 s of `train-clip --help` on a busy 2-core box). test_cli_help checks they match.
CHOICES = {"precision": ("fp32", "bf16", "fp16"), "augment": ("none", "crop")}


def _choices(field_name: str) -> str:
    """The values of a ``ClipTrainConfig`` ``Literal`` field as a flag-table KIND (``a|b|c``)."""
    return "|".join(CHOICES[field_name])


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "ClipTrainJobConfig", "train.beta2=0.95")
    common.add_flags(p, f"""
        --input             str+    webdataset shard folders or .tar files (local, s3://, ...)
        --output            str     storage root; the run lives in <output>/<name>/
        --name              str     run name (re-running with the same name resumes)
        --clip              str     open_clip model name (tiny, ViT-B-32, ...)
        --clip-pretrained   str     fine-tune from an open_clip tag, a weights file or an object-store URI
        --from-scratch      switch  seeded random init even where the name ships weights (e.g. tiny)
        --heldout-fraction  float   samples held out by key hash for retrieval eval
        --epochs            int     passes over the training pairs
        --batch-size        int     pairs per worker per step (the loss sees workers x this)
        --lr                float   peak learning rate (AdamW)
        --weight-decay      float   AdamW weight decay (not on gains, biases, logit scale)
        --warmup-steps      int     linear warm-up steps before the cosine decay (default: 100, at most 5% of
                                    the run)
        --grad-clip         float   max gradient norm (0 = off)
        --precision         {_choices("precision")}  autocast precision (bf16/fp16 on GPU)
        --seed              int     init, crop and shard-order seed
        --local-loss        switch  each worker's rows against all gathered features (open_clip --local-loss)
        --lock-image        switch  freeze the image tower
        --lock-text         switch  freeze the text tower
        --augment           {_choices("augment")}  training-time image augmentation
    """)
    common.old_spellings(p, {"--shards": "--input", "--model": "--clip", "--pretrained": "--clip-pretrained"})
    common.add_scale_flags(p, cpus_help="CPUs reserved per worker (default: the node's cores less one for the data "
                                        "tasks, shared by its workers; GPU: 1)",
                           threads_help="torch threads per worker (default: CPU, the node's cores less one, shared by "
                                        "its workers; GPU, Ray's default)")
    p.add_argument("--eval-max-samples", type=int, help="held-out pairs evaluated each epoch (rank 0)")
    common.add_ray_address(p)


def config_from_args(args: argparse.Namespace) -> Any:
    from pipelines.clip.job import ClipTrainJobConfig

    return options.build(ClipTrainJobConfig, options.collect(args, _FIELDS), _FIELDS)


def run(args: argparse.Namespace) -> int:
    from pipelines.clip.job import plan, run_clip_training

    cfg = config_from_args(args)
    plan(cfg)  # model, weights and shards checked before Ray starts
    common.init_ray(args.ray_address)
    result = run_clip_training(cfg)
    common.print_result(None, {"weights": result.weights, "model_dir": result.model_dir, "run_dir": result.run_dir,
                               "metrics": result.metrics})
    return 0

"""``clipcap train``: train a ClipCap model on embedding tables with Ray Train (``pipelines.train.job``).

    clipcap train --input s3://b/embeddings/cc3m/ViT-B-32-openai --output s3://b/runs --name cc3m-mlp \
        --model clipcap-mlp --workers 4 --gpu --epochs 10
    clipcap train --config train.yaml --set train.lr=1e-4 --set run.checkpoint_every=200
    clipcap train --decoder decap --input s3://b/text-embeddings/corpus/ViT-B-32-openai --output s3://b/runs \
        --name corpus-decap --noise-std 0.1 --memory-size 50000          # text only (DeCap); see pipelines.train.decap

Flags map onto ``TrainJobConfig`` (``--epochs``/``--lr``/... onto ``train``, ``--workers``/``--gpu``/... onto
``scale``, ``--mapping``/``--prefix-length``/``--freeze-lm`` onto ``model_overrides``); ``--set KEY=VALUE``
reaches any other key (value parsed as YAML). Re-running with the same ``--output`` and ``--name`` resumes.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "train a ClipCap model on embedding tables (Ray Train)"
# flag dest -> (config section or "" for the top level, field name)
FIELDS: dict[str, tuple[str, str]] = {
    "input": ("", "tables"), "output": ("", "output"), "name": ("", "name"), "model": ("", "model"),
    "heldout_fraction": ("", "heldout_fraction"),
    "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("train", "lr"),
    "warmup_steps": ("train", "warmup_steps"), "warmup_fraction": ("train", "warmup_fraction"),
    "weight_decay": ("train", "weight_decay"), "precision": ("train", "precision"), "seed": ("train", "seed"),
    "max_caption_tokens": ("train", "max_caption_tokens"), "strict": ("", "strict"),
    **common.SCALE_FIELDS,
    "decoder": ("", "decoder"), "noise_std": ("decap", "noise_std"), "memory_size": ("decap", "memory_size"),
    "memory": ("decap", "memory"), "memory_seed": ("decap", "memory_seed"), "tau": ("decap", "tau"),
}
_MODEL_FLAGS = {"mapping": "mapping.kind", "prefix_length": "mapping.prefix_length", "freeze_lm": "lm.freeze"}


def add_train_flags(p: argparse.ArgumentParser, *, epochs: str, batch_size: str, seed: str) -> None:
    """The ``train`` section's flags of ``train`` / ``nightly`` / ``sweep`` (a sweep's help speaks of trials)."""
    common.add_flags(p, f"""
        --epochs              int             {epochs} (default: the preset's recipe)
        --batch-size          int             {batch_size} (default: the preset's recipe)
        --lr                  float           peak learning rate, AdamW (default: the preset's recipe)
        --warmup-steps        int             linear warm-up steps (default: the recipe's, at most 5% of the run)
        --warmup-fraction     float           linear warm-up as a share of the run's steps (instead of steps)
        --weight-decay        float           AdamW weight decay (default: the preset's recipe)
        --precision           fp32|bf16|fp16  training precision (bf16 / fp16: autocast)
        --seed                int             {seed}
        --max-caption-tokens  int             caption tokens kept per sample, incl. end-of-text (default: the
                                              preset's recipe)
    """)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by train / nightly (hyperparameters, scale, run options)."""
    options.add_config_arguments(p, "the command's config")
    add_train_flags(p, epochs="passes over the training split", batch_size="captions per step (per worker)",
                    seed="seed of the model init and the data order")
    common.add_scale_flags(p, cpus_help="Ray CPUs reserved per training worker (default: the node's cores less one "
                                        "for the data tasks, shared by its workers; GPU: 1)",
                           threads_help="torch threads per worker (default: CPU, the node's cores less one, shared by "
                                        "its workers; GPU, Ray's default)")
    common.add_ray_address(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    common.add_flags(p, """
        --input             str+              embedding table folders or files (local, s3://, ...)
        --output            str               storage root; the run lives in <output>/<name>/
        --name              str               run name (re-running with the same name resumes)
        --model             str               preset (tiny, clipcap-mlp, ...) or model artifact URI to warm-start from
        --mapping           mlp|transformer   preset override: mapping network
        --prefix-length     int               preset override: prefix length k
    """)
    common.old_spellings(p, {"--tables": "--input"})
    p.add_argument("--freeze-lm", action=argparse.BooleanOptionalAction, default=None,
                   help="preset override: freeze (or tune) the language model")
    p.add_argument("--heldout-fraction", type=float, help="fraction of keys held out for evaluation")
    p.add_argument("--strict", action="store_true", default=None,
                   help="fail (exit 2) on rows with a non-finite vector, an empty caption or a duplicate key "
                        "instead of dropping them into the run's input_errors table")
    common.add_flags(p.add_argument_group("DeCap (text-only training)"), """
        --decoder       clipcap|decap   decap: train on the text_embedding of text tables (clipcap embed-text),
                                        no images
        --noise-std     float           Gaussian noise on the normalised text embedding (CapDec)
        --memory-size   int             caption embeddings stored as the projection memory (default 10000; 0: all),
                                        sampled with --memory-seed from the training split
        --memory        str             take the memory from this text table instead of the training tables
        --memory-seed   int             seed of the memory sample
        --tau           float           projection temperature stored with the memory (default 0.01)
    """)


def config_from_args(args: argparse.Namespace) -> Any:
    """A validated TrainJobConfig from ``--config``, flags and ``--set`` (in that order of precedence)."""
    from pipelines.train.job import TrainJobConfig

    overrides = {key: getattr(args, dest) for dest, key in _MODEL_FLAGS.items() if getattr(args, dest, None) is not None}
    data = options.collect(args, FIELDS, extra={"model_overrides": overrides} if overrides else None)
    return options.build(TrainJobConfig, data, FIELDS)


def run(args: argparse.Namespace) -> int:
    from pipelines.train.job import run_training

    cfg = config_from_args(args)  # config errors before any Ray process starts
    common.init_ray(args.ray_address)
    result = run_training(cfg)
    common.print_result(None, {"artifact": result.artifact, "run_dir": result.run_dir, "metrics": result.metrics,
                               "dropped_rows": result.input_errors, "health": result.health})
    return 0

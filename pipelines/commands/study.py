"""``clipcap study prefix``: prefix length x mapping x LM (frozen / fine-tuned) x seeds, on Ray Tune, with held-out
BLEU-1..4, METEOR, ROUGE-L, CIDEr and CLIPScore as mean and spread over seeds, training time and trainable
parameters per setting (``pipelines.train.study``). ``clipcap study decoding``: one trained model's held-out rows
captioned greedily, by beam search, by sampling and by n samples + CLIP rerank: images/s and the same metrics
(``pipelines.evaluate.decoding_study``).

    clipcap study prefix --input data/embeddings/scenes/tiny-scenes --output studies \\
        --set model_overrides.tokenizer=word-scenes
    clipcap study prefix --input s3://b/embeddings/coco/ViT-B-32-openai --output s3://b/studies \\
        --set presets.mlp=clipcap-mlp --set presets.transformer=clipcap-transformer --trial-gpus 1
    clipcap study decoding --input data/embeddings/scenes/tiny-scenes --model runs/scenes/model --output studies

Output in ``<output>/<name>/``: ``table.md``, ``table.parquet`` and ``prefix.png`` + ``trials.parquet`` (prefix) or
``decoding.png`` (decoding).
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "studies: prefix length x mapping x frozen / tuned LM x seeds (Ray Tune); decoding strategies' cost and gain"

# flag dest -> (config section, field): the flags below, then --config and --set, into StudyConfig
_FIELDS: dict[str, tuple[str, str]] = {
    "input": ("", "tables"), "output": ("", "output"), "name": ("", "name"),
    "prefix_lengths": ("", "prefix_lengths"), "mappings": ("", "mappings"), "lms": ("", "lms"),
    "seeds": ("", "seeds"), "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"), "heldout_fraction": ("", "heldout_fraction"),
    "eval_max_samples": ("", "eval_max_samples"), "max_train_rows": ("", "max_train_rows"),
    "tokenize": ("", "tokenize"), "trial_cpus": ("", "trial_cpus"), "trial_gpus": ("", "trial_gpus"),
    "max_concurrent": ("", "max_concurrent"),
}
_DECODING_FIELDS: dict[str, tuple[str, str]] = {
    "input": ("", "tables"), "output": ("", "output"), "name": ("", "name"), "model": ("", "model"),
    "heldout_fraction": ("", "heldout_fraction"), "eval_max_samples": ("", "max_rows"),
    "tokenize": ("options", "tokenize"), "beam_sizes": ("options", "beam_sizes"), "top_p": ("options", "top_p"),
    "temperature": ("options", "temperature"), "rerank_n": ("options", "rerank_n"),
    "max_length": ("options", "max_length"), "repeats": ("options", "repeats"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", choices=["prefix", "decoding"],
                   help="prefix: prefix length x mapping x LM x seeds; decoding: strategies of one model")
    options.add_config_arguments(p, "StudyConfig", "model_overrides.tokenizer=word-scenes")
    add = p.add_argument
    add("--input", nargs="+", help="embedding table folders or files (required)")
    add("--output", help="where the tables, plot and Tune state go: <output>/<name>/ (required)")
    add("--name", help="study name (default prefix-study)")
    add("--prefix-lengths", type=int, nargs="+", help="default: 1 10 20")
    add("--mappings", nargs="+", choices=["mlp", "transformer"], help="default: mlp transformer")
    add("--lms", nargs="+", choices=["frozen", "tuned"], help="the LM frozen or fine-tuned (default: both)")
    add("--seeds", type=int, nargs="+", help="training seeds per setting (default: 0 1 2)")
    add("--epochs", type=int, help="epochs per trial (default: the preset's recipe)")
    add("--batch-size", type=int, help="captions per step (default: the preset's recipe)")
    add("--lr", type=float, help="peak learning rate (default: the preset's recipe)")
    add("--heldout-fraction", type=float, help="fraction of keys held out for evaluation (default 0.1)")
    add("--eval-max-samples", type=int, help="held-out rows captioned per trial at most (default 500)")
    add("--max-train-rows", type=int, help="training rows per trial at most (default 100000)")
    add("--tokenize", choices=["ptb", "simple"], help="ptb: the COCO tokenizer (Java, default); simple: none")
    add("--trial-cpus", type=float, help="CPUs per trial (default 1)")
    add("--trial-gpus", type=float, help="GPUs per trial (default 0)")
    add("--max-concurrent", type=int, help="trials running at once at most (default: as resources allow)")
    add("--model", help="decoding: the trained model artifact (required)")
    add("--beam-sizes", type=int, nargs="+", help="decoding: beam sizes (default: 3 5)")
    add("--top-p", type=float, help="decoding: nucleus mass of sampling (default 0.9)")
    add("--temperature", type=float, help="decoding: sampling temperature (default 1.0)")
    add("--rerank-n", type=int, nargs="+", help="decoding: samples per image CLIP reranks (default: 5)")
    add("--max-length", type=int, help="decoding: caption tokens at most (default 24)")
    add("--repeats", type=int, help="decoding: runs per strategy, the fastest timed (default 1)")
    common.add_ray_address(p)


def config_from_args(args: argparse.Namespace) -> Any:
    if args.study == "decoding":
        from pipelines.evaluate.decoding_study import DecodingStudyConfig

        data = options.collect(args, _DECODING_FIELDS)
        data.setdefault("name", "decoding-study")
        return options.build(DecodingStudyConfig, data, _DECODING_FIELDS)
    from pipelines.train.study import StudyConfig

    return options.build(StudyConfig, options.collect(args, _FIELDS), _FIELDS)


def run(args: argparse.Namespace) -> int:
    from pipelines.train.study import format_table, run_prefix_study

    cfg = config_from_args(args)
    if args.study == "decoding":
        from pipelines.evaluate import decoding_study

        print(decoding_study.format_table(decoding_study.run_decoding_study(cfg)))
        print(f"\nsaved: {cfg.output.rstrip('/')}/{cfg.name}/{{table.md,table.parquet,decoding.png}}")
        return 0
    common.init_ray(args.ray_address)
    _, table = run_prefix_study(cfg)
    print(format_table(table))
    print(f"\nsaved: {cfg.output.rstrip('/')}/{cfg.name}/{{table.md,table.parquet,trials.parquet,prefix.png}}")
    return 0

"""``clipcap caption``: bulk-caption image archives into caption tables (``pipelines.caption.job``).

    clipcap caption --input s3://bucket/archives --output s3://bucket/captions/run1 --model s3://bucket/models/m1
    clipcap caption --config caption.yaml --overwrite          # YAML/JSON with CaptionConfig fields; flags win

Flags map onto ``CaptionConfig`` (``--strategy``/``--num-captions``/... onto ``decoding``, ``--format``/
``--part-size``/... onto ``source``, ``--stages``/``--gpus-per-actor``/... onto ``resources``);
``--set KEY=VALUE`` reaches any other key.
Output: ``<output>/captions/part-*.parquet`` (the caption table) and ``<output>/_meta/`` (errors table, run
record, summary). After the summary, ``--show K`` prints ``key<TAB>caption`` for the first K images by key
(rank-0 captions of the committed table; by default all of them when there are at most ``SHOW_ALL_UP_TO``).
Exit code: 0 every part done, 4 some parts could not be read (named on stderr; a rerun retries them) or the
output failed part-way (the part and the cause named), 5 none done, 6 most captions empty, 2 a bad config,
input, output or model, or another run holds the output's lease (before any work), 143 / 130 stopped by SIGTERM / Ctrl-C (a rerun resumes).
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, options
from pipelines.commands.caption_images import add_projection_arguments

# SIGTERM / Ctrl-C: stop committing, say how many parts are committed, exit 143 / 130 (pipelines.stopping)
STOP_ON_SIGNALS = True
JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "bulk-caption image archives into caption tables"
SHOW_ALL_UP_TO = 20  # without --show, a run of at most this many images prints every caption
# flag dest -> (config section or "" for the top level, field name)
_FIELDS: dict[str, tuple[str, str]] = {
    "input": ("", "input"), "output": ("", "output"), "model": ("", "model"), "overwrite": ("", "overwrite"),
    "force_unlock": ("", "force_unlock"),
    "rerank": ("", "rerank"), "clip_score": ("", "clip_score"),
    "allow_untrained": ("", "allow_untrained"),
    "format": ("source", "format"), "part_size": ("source", "part_size"), "max_pixels": ("source", "max_pixels"),
    "image_column": ("source", "image_column"), "url_column": ("source", "url_column"),
    "key_column": ("source", "key_column"), "allow_private_urls": ("source", "allow_private_urls"),
    "allow_object_store_urls": ("source", "allow_object_store_urls"),
    "strategy": ("decoding", "strategy"), "num_captions": ("decoding", "n"), "beam_size": ("decoding", "beam_size"),
    "max_length": ("decoding", "max_length"), "temperature": ("decoding", "temperature"),
    "top_p": ("decoding", "top_p"), "top_k": ("decoding", "top_k"), "stop_token": ("decoding", "stop_token"),
    "seed": ("decoding", "seed"),
    "decode_block_rows": ("resources", "decode_block_rows"), "clip_batch_size": ("resources", "clip_batch_size"),
    "caption_batch_size": ("resources", "caption_batch_size"), "clip_actors": ("resources", "clip_actors"),
    "caption_actors": ("resources", "caption_actors"), "stages": ("resources", "stages"), "read_cpus": ("resources", "read_cpus"),
    "cpus_per_actor": ("resources", "cpus_per_actor"), "torch_threads": ("resources", "torch_threads"), "gpus_per_actor": ("resources", "gpus_per_actor"),
    "precision": ("resources", "precision"), "jpeg_draft": ("resources", "jpeg_draft"),
    "projection": ("projection", "mode"), "memory": ("projection", "memory"),
    "memory_size": ("projection", "memory_size"), "tau": ("projection", "tau"),
    "projection_top_k": ("projection", "top_k"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "CaptionConfig", "decoding.top_k=40")
    common.add_flags(p, """
        --input             str     directory, archive or Parquet file URI (local, s3://, ...)
        --output            str     caption table directory URI
        --model             str     trained model artifact URI (required; `clipcap train` or
                                    `clipcap import-reference` makes one)
        --allow-untrained   switch  accept an untrained preset as --model (random captions: wiring tests, benchmarks)
        --overwrite         switch  redo every part of the output
        --force-unlock      switch  take the output's lease (_meta/lease.json) even from a run that looks alive
        --format            auto|images|tar|zip|webdataset|parquet|embeddings
                                    input format (default auto: by file extension)
        --part-size         int     loose images (or Parquet rows) per output part
        --max-pixels        int     decompression-bomb limit per image
        --image-column      str     Parquet input: column with the encoded image bytes
        --url-column        str     Parquet input: column with image URLs (fetched when no bytes)
        --key-column        str     Parquet input: column with the row key (default: row position)
        --strategy          greedy|beam|reference-beam|sample  decoding strategy (default greedy)
        --allow-private-urls  switch  URL inputs: fetch private / loopback / link-local hosts too (refused by default)
        --allow-object-store-urls  switch  URL inputs: fetch s3:// / gs:// URLs with this job's credentials
                                    (refused by default)
        --num-captions      int     captions per image (beam / sample)
        --rerank            none|clip  clip: rank each image's captions by CLIP similarity
    """)
    p.add_argument("--no-clip-score", dest="clip_score", action="store_false", default=None,
                   help="skip the clip_score column (saves the CLIP text forward per caption)")
    common.add_flags(p, """
        --beam-size         int     beams per image (beam / reference-beam)
        --max-length        int     new tokens at most
        --temperature       float   sampling temperature (sample)
        --top-p             float   nucleus sampling mass (sample)
        --top-k             int     sample among the k likeliest tokens (sample)
        --stop-token        str     e.g. "." (the authors' models stop there)
        --seed              int     sampling seed (sample)
        --decode-block-rows   int   rows per block out of the decode tasks
        --clip-batch-size   int     images per CLIP forward
        --caption-batch-size  int   embeddings per decoding batch
        --stages            auto|fused|split  fused (auto): CLIP + captioner in one actor; split: a CLIP pool
                                    feeding a captioning pool
        --clip-actors       int     split stages: CLIP actors (default: sized from the cluster)
        --caption-actors    int     captioning (or fused) actors, one model each (default: one per GPU, or per
                                    CPU node)
        --read-cpus         float   CPUs per read/decode task (default 1)
        --cpus-per-actor    float   Ray CPUs reserved per actor (default 1; not a thread cap)
        --torch-threads     int     torch threads per actor (default: the node's cores / its actors)
        --gpus-per-actor    float   GPUs per actor (default: 1 when the cluster has GPUs)
        --precision         auto|fp32|fp16|bf16  auto: fp16 on GPU, fp32 on CPU
        --jpeg-draft        switch  faster JPEG decoding by DCT scaling (pixels differ slightly)
    """)
    p.add_argument("--show", type=int, metavar="K",
                   help=f"print key<TAB>caption for the first K images by key after the run (default: all when "
                        f"there are at most {SHOW_ALL_UP_TO}; 0: none)")
    common.add_ray_address(p)
    add_projection_arguments(p)


def config_from_args(args: argparse.Namespace) -> Any:
    """Build a validated CaptionConfig from ``--config``, flags and ``--set`` (unknown keys / bad types fail)."""
    from clipcap_core.configs import ConfigError
    from pipelines.caption.job import CaptionConfig

    data = options.collect(args, _FIELDS)
    if not data.get("model"):
        from pipelines.caption.stages import UNTRAINED_HINT

        raise ConfigError("--model is required: " + UNTRAINED_HINT.format(uri="(none)").split("; ", 1)[1])
    return options.build(CaptionConfig, data, _FIELDS)


def run(args: argparse.Namespace) -> int:
    from pipelines.caption.job import caption_archive

    cfg = config_from_args(args)
    if args.show is not None and args.show < 0:
        from clipcap_core.configs import ConfigError

        raise ConfigError(f"--show must be >= 0 (0 prints no captions), got {args.show}")
    common.init_ray(args.ray_address)  # job-level faults are reported before any Ray process starts
    summary = caption_archive(cfg)
    common.print_result(None, summary.as_dict())
    common.print_not_done(summary.parts_failed, "clipcap caption: part {name} not done (rerun to retry): {why}")
    show_captions(cfg.output, args.show)
    return summary.exit_code


def show_captions(output: str, show: int | None) -> None:
    """Print ``key<TAB>caption`` lines of the first ``show`` images (None: all of at most ``SHOW_ALL_UP_TO``), so a
    small run's captions are seen without opening Parquet; a larger run gets a hint on stderr instead."""
    from pipelines.caption.output import table_uri, top_captions
    from pipelines.console import terminal

    if show == 0:
        return
    rows = top_captions(output)
    if show is None and len(rows) > SHOW_ALL_UP_TO:
        print(f"clipcap caption: {len(rows)} images captioned in {table_uri(output)}; --show K prints the first K",
              file=terminal())
        return
    for key, caption in rows[:show]:
        print(f"{key}\t{' '.join((caption or '').split())}")

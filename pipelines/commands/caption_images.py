"""``clipcap caption-images``: caption a few images with a model artifact or preset and print the captions.

    clipcap caption-images photo1.jpg photo2.png --model s3://bucket/models/coco
    clipcap caption-images img/*.jpg --model ./artifacts/tiny-synthetic --strategy beam --beam-size 5 -n 3

One line per image: ``<path>\\t<caption>`` (``n`` lines per image with ``-n``; ``--scores`` adds the mean
token log-prob). For archives and millions of images use ``clipcap caption`` (Ray).

DeCap artifacts project the image embedding onto their caption memory automatically; ``--projection none``
decodes the raw embedding instead, ``--projection memory --memory <text-embedding table>`` projects for any model.
"""

from __future__ import annotations

import argparse
from typing import Any

HELP = "caption images with a model and print the captions"


def add_projection_arguments(p: argparse.ArgumentParser) -> None:
    """DeCap projection flags (``caption`` has them as ``ProjectionConfig``'s fields)."""
    p.add_argument("--projection", choices=["auto", "none", "memory"],
                   help="auto (default): a DeCap artifact projects onto its memory; none: decode the raw image "
                        "embedding; memory: project onto --memory (or the artifact's memory)")
    p.add_argument("--memory", help="text-embedding table (clipcap embed-text) to project onto")
    p.add_argument("--memory-size", type=int, help="seeded sample of this many --memory rows (default: all)")
    p.add_argument("--tau", type=float, help="projection temperature (default: the memory's, 0.01)")
    p.add_argument("--projection-top-k", type=int, dest="projection_top_k",
                   help="softmax over each image's k nearest memory entries only (large memories; default: all)")


def projection_options(args: argparse.Namespace) -> dict[str, Any]:
    """The projection flags given, as ``ProjectionConfig`` fields."""
    out = {"mode": args.projection, "memory": args.memory, "memory_size": args.memory_size, "tau": args.tau,
           "top_k": args.projection_top_k}
    return {k: v for k, v in out.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from clipcap_core import artifacts
    from clipcap_core.captioner import Captioner, open_image
    from clipcap_core.configs import from_dict
    from clipcap_core.decap import ProjectionConfig
    from pipelines.caption.stages import UNTRAINED_HINT

    if artifacts.is_preset(args.model) and not args.allow_untrained:
        raise ValueError(UNTRAINED_HINT.format(uri=args.model))
    images = [open_image(p) for p in args.paths]  # a bad file fails here, naming its path, before the model loads
    projection = from_dict(ProjectionConfig, projection_options(args))
    captioner = Captioner.from_pretrained(args.model, device=args.device, precision=args.precision,
                                          projection=projection)
    options: dict[str, Any] = {"beam_size": args.beam_size, "max_length": args.max_length, "n": args.n,
                               "stop_token": args.stop_token, "seed": args.seed, "stop_at_eos": not args.ignore_eos}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.top_p is not None:
        options["top_p"] = args.top_p
    if args.top_k is not None:
        options["top_k"] = args.top_k
    gen = captioner.generate(images=images, strategy=args.strategy, **options)
    for i, (text, score) in enumerate(zip(gen.texts, gen.scores, strict=True)):
        path = args.paths[i // gen.n]
        print(f"{path}\t{text}" + (f"\t{score:.4f}" if args.scores else ""))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="image files or URIs (local, s3://, ...)")
    p.add_argument("--model", required=True, help="trained model artifact (directory or URI)")
    p.add_argument("--allow-untrained", action="store_true",
                   help="accept an untrained preset (tiny...) as --model: random captions, for wiring checks")
    p.add_argument("--strategy", default="greedy", choices=["greedy", "beam", "reference-beam", "sample"],
                   help="decoding strategy")
    p.add_argument("--beam-size", type=int, default=5, help="beams per image (beam / reference-beam)")
    p.add_argument("--max-length", type=int, default=30, help="new tokens at most")
    p.add_argument("-n", type=int, default=1, help="captions per image (beam / sample)")
    p.add_argument("--stop-token", help='also stop at this token, e.g. "." for the authors\' checkpoints')
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at end-of-text (with --stop-token .: exactly the authors' generate2)")
    p.add_argument("--temperature", type=float, help="sampling temperature (sample)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (sample)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (sample)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="model dtype")
    p.add_argument("--scores", action="store_true", help="print the mean token log-prob too")
    add_projection_arguments(p)

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

from pipelines.commands import flags, options

HELP = "caption images with a model and print the captions"
PROJECTION = "clipcap_core.decap:ProjectionConfig"  # the DeCap projection flags, as `clipcap caption` has them


def run(args: argparse.Namespace) -> int:
    from clipcap_core import artifacts
    from clipcap_core.captioner import Captioner, open_image
    from clipcap_core.configs import from_dict
    from clipcap_core.decap import ProjectionConfig
    from pipelines.caption.stages import UNTRAINED_HINT

    if artifacts.is_preset(args.model) and not args.allow_untrained:
        raise ValueError(UNTRAINED_HINT.format(uri=args.model))
    images = [open_image(p) for p in args.paths]  # a bad file fails here, naming its path, before the model loads
    projection = from_dict(ProjectionConfig, options.flags(args, flags.fields(PROJECTION)))
    captioner = Captioner.from_pretrained(args.model, device=args.device, precision=args.precision,
                                          projection=projection)
    decode: dict[str, Any] = {"beam_size": args.beam_size, "max_length": args.max_length, "n": args.n,
                               "stop_token": args.stop_token, "seed": args.seed, "stop_at_eos": not args.ignore_eos}
    if args.temperature is not None:
        decode["temperature"] = args.temperature
    if args.top_p is not None:
        decode["top_p"] = args.top_p
    if args.top_k is not None:
        decode["top_k"] = args.top_k
    gen = captioner.generate(images=images, strategy=args.strategy, **decode)
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
    flags.add(p, PROJECTION, title="DeCap projection")

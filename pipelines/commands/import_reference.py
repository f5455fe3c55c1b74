"""``clipcap import-reference``: convert a released ClipCap or DeCap checkpoint (authors' layout) into a model
artifact.

    clipcap import-reference coco_weights.pt --output s3://bucket/models/coco-mlp \\
        --mapping mlp --prefix-length 10 --clip-dim 512 --lm gpt2
    clipcap import-reference transformer_weights.pt --output ./coco-transformer --mapping transformer \\
        --prefix-length 40 --clip-length 40 --num-layers 8 --clip-dim 640 --normalize-prefix --lm ./gpt2-config
    clipcap import-reference --decap coco_prefix-009.pt --output ./decap-coco --memory s3://b/text-embeddings/coco

The checkpoint is read with ``torch.load(weights_only=True)`` (no pickled code runs). Its ``gpt.*`` weights are
used when present (then ``--lm`` may be a directory holding only the LM config) and saved in the artifact
unless identical to ``--lm``'s weights. Decode like the authors with ``--stop-token .`` (their models never
learned end-of-text; ``--ignore-eos`` makes it exact even if one shows up) and ``--strategy reference-beam``.

``--decap``: the DeCap authors' decoder (``clipcap_core.reference``): mapping, sizes, vocabulary (CLIP's
BPE) and D come from the checkpoint; ``--memory`` stores a text-embedding table as the memory image embeddings
are projected onto (or give one at caption time). Their greedy decoding is our default ``greedy``.
"""

from __future__ import annotations

import argparse

from pipelines.commands import common

HELP = "convert a released ClipCap or DeCap checkpoint into an artifact"


def run(args: argparse.Namespace) -> int:
    from clipcap_core.encoders import EncoderConfig

    common.require(args, "output")
    encoder = EncoderConfig(model_name=args.clip, pretrained=args.clip_pretrained) if args.clip else None
    if args.decap:
        return _run_decap(args, encoder)
    if args.memory:
        raise ValueError("--memory goes with --decap (a ClipCap checkpoint has no DeCap memory)")
    missing = [flag for flag, value in (("--mapping", args.mapping), ("--prefix-length", args.prefix_length),
                                        ("--clip-dim", args.clip_dim)) if value is None]
    if missing:
        raise ValueError(f"a ClipCap checkpoint needs {', '.join(missing)} (or pass --decap for a DeCap one)")
    return _run_clipcap(args, encoder)


def _run_decap(args: argparse.Namespace, encoder: object) -> int:
    from clipcap_core.reference import import_decap_checkpoint

    given = [flag for flag, value in (("--mapping", args.mapping), ("--prefix-length", args.prefix_length),
                                      ("--clip-length", args.clip_length), ("--clip-dim", args.clip_dim),
                                      ("--tokenizer", args.tokenizer)) if value is not None]
    if given or args.normalize_prefix:
        raise ValueError(f"--decap reads the architecture from the checkpoint: drop {given or ['--normalize-prefix']}")
    result = import_decap_checkpoint(args.checkpoint, args.output, encoder=encoder, memory=args.memory)
    cfg = result.config
    memory = f"memory from {args.memory}" if args.memory else "no memory: give one at caption time (--memory)"
    print(f"imported DeCap {args.checkpoint} -> {args.output} (linear, k=1, D={cfg.clip_dim}, "
          f"{cfg.lm.config['n_layer']} layers, CLIP BPE; {memory})")
    return 0


def _run_clipcap(args: argparse.Namespace, encoder: object) -> int:
    from clipcap_core.model import MappingConfig
    from clipcap_core.reference import import_reference_checkpoint

    mapping = MappingConfig(kind=args.mapping, prefix_length=args.prefix_length,
                            clip_length=args.clip_length or args.prefix_length, num_layers=args.num_layers,
                            normalize_prefix=args.normalize_prefix)
    result = import_reference_checkpoint(args.checkpoint, args.output, mapping=mapping, clip_dim=args.clip_dim,
                                         lm=args.lm, tokenizer=args.tokenizer, encoder=encoder)
    lm = "saved in the artifact" if result.lm_saved else f"referenced ({args.lm})"
    print(f"imported {args.checkpoint} -> {args.output} ({args.mapping}, k={args.prefix_length}, D={args.clip_dim}; "
          f"LM {lm})")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="state dict (.pt) in the authors' layout: local path or URI")
    p.add_argument("--output", help="artifact directory URI to write (required)")
    p.add_argument("--decap", action="store_true",
        help="the checkpoint is the DeCap authors' decoder (architecture read from it)")
    p.add_argument("--memory", help="--decap: text-embedding table URI stored as the artifact's DeCap memory")
    p.add_argument("--mapping", choices=["mlp", "transformer"],
        help="mapping network of the checkpoint (the authors' coco/conceptual weights: mlp); required "
             "without --decap")
    p.add_argument("--prefix-length", type=int,
        help="prefix length k of the checkpoint (the authors' MLP weights: 10); required without --decap")
    p.add_argument("--clip-length", type=int, help="transformer only (default: the prefix length)")
    p.add_argument("--num-layers", type=int, default=8, help="transformer only")
    p.add_argument("--clip-dim", type=int, help="CLIP embedding dimension D; required without --decap")
    p.add_argument("--normalize-prefix", action="store_true", help="L2-normalise CLIP embeddings (transformer ckpt)")
    p.add_argument("--lm", default="gpt2", help="base LM: hub name or directory / URI (config only is enough "
                                                "when the checkpoint carries the LM weights)")
    p.add_argument("--tokenizer", help="tokenizer: hub name, directory or URI (default: --lm)")
    p.add_argument("--clip", help="open_clip model that made the embeddings (default from D: 512 ViT-B-32, "
                                        "640 RN50x4, 768 ViT-L-14)")
    p.add_argument("--clip-pretrained", default="openai", help="its pretrained tag / file (with --clip)")
    common.old_spellings(p, {"--out": "--output", "--clip-model": "--clip"})

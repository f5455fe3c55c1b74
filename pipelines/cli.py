"""The ``clipcap`` console script (``python -m pipelines.cli CMD ...`` under ``ray job submit``): a sub-command is
a ``run(args) -> exit code`` function (its docstring is its ``--help``) and a ``Command`` in ``COMMANDS`` naming
the config dataclass whose fields are its flags (``pipelines.commands.flags``).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn

from pipelines import exitcodes, stopping
from pipelines.commands import flags
from pipelines.console import job_log, terminal
from pipelines.exitcodes import JobFailed
from pipelines.io.urlsafety import setup_logging

# the configs whose fields are the commands' flags, imported when that command's parser is built
CAPTION = "pipelines.caption.job:CaptionConfig"
DOWNLOAD = "pipelines.download.job:DownloadConfig"
EMBED = "pipelines.embed.job:EmbedConfig"
EMBED_TEXT = "pipelines.embed.text:EmbedTextConfig"
EVAL_CLIP = "pipelines.clip.evaluate:EvalClipConfig"
EVALUATE = "pipelines.evaluate.run:EvaluateConfig"
INDEX = "pipelines.index:IndexConfig"
NIGHTLY = "pipelines.train.nightly:NightlyConfig"
REPORT = "pipelines.report.build:ReportConfig"
STUDY_DECODING = "pipelines.evaluate.decoding_study:DecodingStudyConfig"
STUDY_PREFIX = "pipelines.train.study:StudyConfig"
SWEEP = "pipelines.train.sweep:SweepConfig"
TRAIN = "pipelines.train.job:TrainJobConfig"
TRAIN_CLIP = "pipelines.clip.job:ClipTrainJobConfig"
PROJECTION = "clipcap_core.decap:ProjectionConfig"  # the DeCap projection flags, as `clipcap caption` has them

RAY_ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS or a local instance)"
# embed / embed-text look for a running local head before they start one (runtime.ensure_ray)
RAY_ADDRESS_HEAD_HELP = "Ray cluster address (default: RAY_ADDRESS, a running local head, else a new local instance)"
SHOW_ALL_UP_TO = 20  # without --show, a caption run of at most this many images prints every caption


@dataclass(frozen=True, kw_only=True)
class CaptionImagesArgs:
    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"paths": "paths", "n": "-n"}
    paths: tuple[str, ...]  # image files or URIs (local, s3://, ...)
    model: str  # trained model artifact (directory or URI)
    allow_untrained: bool = False
    """accept an untrained preset (tiny...) as --model: random captions, for wiring checks"""
    strategy: Literal["greedy", "beam", "reference-beam", "sample"] = "greedy"  # decoding strategy
    beam_size: int = 5  # beams per image (beam / reference-beam)
    max_length: int = 30  # new tokens at most
    n: int = 1  # captions per image (beam / sample)
    stop_token: str | None = None  # also stop at this token, e.g. "." for the authors' checkpoints
    ignore_eos: bool = False  # do not stop at end-of-text (with --stop-token .: exactly the authors' generate2)
    temperature: float | None = None  # sampling temperature (sample)
    top_p: float | None = None  # nucleus sampling mass (sample)
    top_k: int | None = None  # sample among the k likeliest tokens (sample)
    seed: int = 0  # sampling seed
    device: str = "cpu"  # torch device (cpu, cuda, cuda:1, ...)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # model dtype
    scores: bool = False  # print the mean token log-prob too


@dataclass(frozen=True, kw_only=True)
class ImportReferenceArgs:
    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"checkpoint": "checkpoint"}
    checkpoint: str  # state dict (.pt) in the authors' layout: local path or URI
    output: str | None = None  # artifact directory URI to write (required)
    decap: bool = False  # the checkpoint is the DeCap authors' decoder (architecture read from it)
    memory: str | None = None  # --decap: text-embedding table URI stored as the artifact's DeCap memory
    mapping: Literal["mlp", "transformer"] | None = None
    """mapping network of the checkpoint (the authors' coco/conceptual weights: mlp); required without --decap"""
    prefix_length: int | None = None
    """prefix length k of the checkpoint (the authors' MLP weights: 10); required without --decap"""
    clip_length: int | None = None  # transformer only (default: the prefix length)
    num_layers: int = 8  # transformer only
    clip_dim: int | None = None  # CLIP embedding dimension D; required without --decap
    normalize_prefix: bool = False  # L2-normalise CLIP embeddings (transformer ckpt)
    lm: str = "gpt2"
    """base LM: hub name or directory / URI (config only is enough when the checkpoint carries the LM weights)"""
    tokenizer: str | None = None  # tokenizer: hub name, directory or URI (default: --lm)
    clip: str | None = None
    """open_clip model that made the embeddings (default from D: 512 ViT-B-32, 640 RN50x4, 768 ViT-L-14)"""
    clip_pretrained: str = "openai"  # its pretrained tag / file (with --clip)


@dataclass(frozen=True, kw_only=True)
class SearchArgs:
    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"top_k": "-k/--top-k"}
    index: str | None = None  # index folder (clipcap index --output)
    text: tuple[str, ...] | None = None  # query texts (encoded by the table's CLIP)
    image: tuple[str, ...] | None = None  # query image files (local or any URI)
    key: tuple[str, ...] | None = None  # keys of indexed rows (their own vectors)
    nprobe: int | None = None  # IVF lists searched per query (default: the index's)
    output: str | None = None  # also write the hits as Parquet (query, rank, score, key, caption, file, row)
    top_k: int = 10  # neighbours per query


@dataclass(frozen=True, kw_only=True)
class DemoArgs:
    output: str = "data"  # output folder
    samples: int | None = None  # synthetic images (default: 1024; scenes: 2048)
    seed: int = 0  # seed of the synthetic data set
    world: Literal["synthetic", "scenes"] = "synthetic"
    """synthetic: one group of shapes (quick); scenes: two groups and a relation, several references"""
    decap: bool = False
    """also train a text-only (DeCap) captioner on the captions and caption the held-out images"""


@dataclass(frozen=True, kw_only=True)
class _MappingOverrides:
    kind: Literal["mlp", "transformer"] | None = None  # mapping network
    prefix_length: int | None = None  # prefix length k


@dataclass(frozen=True, kw_only=True)
class _LMOverrides:
    freeze: bool | None = None  # freeze (or tune) the language model


@dataclass(frozen=True, kw_only=True)
class PresetOverrides:
    """``clipcap train``'s flags into ``model_overrides``: a field's dotted path is its ModelConfig key."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"mapping.kind": "--mapping", "lm.freeze": "--freeze-lm"}
    mapping: _MappingOverrides = field(default_factory=_MappingOverrides)
    lm: _LMOverrides = field(default_factory=_LMOverrides)


class Parser(argparse.ArgumentParser):
    """argparse without abbreviated flags, and an unknown flag answered with the command's closest flags."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._chosen(ns)
            parser.error(unknown_message(extras, [*_flags(parser), *_flags(self)]))
        return ns

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog} --help lists every flag\n")

    def _chosen(self, ns: argparse.Namespace) -> argparse.ArgumentParser:
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        return sub.choices.get(getattr(ns, "command", None) or "", self) if sub else self


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for a in parser._actions for flag in a.option_strings]


def unknown_message(extras: list[str], known: list[str]) -> str:
    hints = []
    for arg in extras:
        close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=2) if arg.startswith("--") else []
        hints.append(f"{arg} (did you mean {' or '.join(dict.fromkeys(close))}?)" if close else arg)
    return "unrecognized arguments: " + " ".join(hints)


@dataclass(frozen=True)
class Command:
    """A sub-command: ``run`` and the flags of ``config``; with ``example`` (a ``--set`` example) it takes
    ``--config`` / ``--set``; ``ray``: its ``--ray-address`` help; ``standalone``: no ``--config``, so flags
    carry the field defaults and a field without one is a required flag."""

    run: Callable[[argparse.Namespace], int]
    help: str
    config: str | type = ""
    example: str = ""
    ray: str = ""
    more: Callable[[argparse.ArgumentParser], None] | None = None
    standalone: bool = False
    stop_on_signals: bool = False  # SIGTERM / Ctrl-C stop it cleanly (pipelines.stopping)
    job_log: bool = True  # Ray's output goes to a log file unless -v (pipelines.console)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        if self.example:
            flags.add_config_arguments(p, flags.config_class(self.config).__name__, self.example)
        if self.config:
            flags.add(p, self.config, required=self.standalone, defaults=self.standalone)
        if self.more:
            self.more(p)
        if self.ray:
            p.add_argument("--ray-address", help=self.ray)


def build_parser(commands: list[str] | None = None, *, flags: bool = True) -> argparse.ArgumentParser:
    """The parser of every command, or of ``commands`` only; ``flags=False``: the commands without their flags."""
    parser = Parser(prog="clipcap", description="CLIP-prefix image captioning at scale on Ray.",
                    epilog=exitcodes.help_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging of the project's modules "
                        "(not of boto / urllib3 / Ray, which would log credentials) and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        if commands is not None and name not in commands:
            continue
        p = sub.add_parser(name, help=cmd.help, description=inspect.cleandoc(cmd.run.__doc__ or ""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if flags:
            cmd.add_arguments(p)
        p.set_defaults(func=cmd.run, stop_on_signals=cmd.stop_on_signals, job_log=cmd.job_log)
    return parser


def command_parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser([command])._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([first]) if first in COMMANDS else build_parser(flags=False)
    args = parser.parse_args(argv)

    setup_logging(args.verbose)  # -v: our loggers only; URLs redacted in every record
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.verbose or not args.job_log:
        return _run(args)
    with job_log(args.command):  # Ray's own output to the log file; ours stays on the terminal
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The command under ``stopping.run``; a job-level failure is one line on the terminal and its exit code."""
    try:
        return stopping.run(lambda: int(args.func(args) or 0), f"clipcap {args.command}",
                            signals=args.stop_on_signals)
    except JobFailed as exc:
        print(f"clipcap {args.command}: {exc}", file=terminal())
        return exc.exit_code
    except (ValueError, OSError, FileNotFoundError) as exc:
        # Config / schema / URI problems: one clear line, no traceback (use -v for it).
        if args.verbose:
            raise
        print(f"clipcap {args.command}: error: {exc}", file=terminal())
        return 2


# --- what the commands share ------------------------------------------------------------------------------------
def require(args: argparse.Namespace, *dests: str) -> None:
    """A ValueError naming the first missing flag of ``dests``."""
    for dest in dests:
        if getattr(args, dest, None) in (None, ""):
            raise ValueError(f"--{dest.replace('_', '-')} is required")


def init_ray(address: str | None) -> None:
    """Connect to an explicit ``--ray-address``; without one Ray starts when the job first needs it."""
    from pipelines import runtime

    if address:
        runtime.ensure_ray(address)


def print_result(text: str | None, data: Mapping[str, Any] | str) -> None:
    """A stage's summary: on a terminal one line (or the scalar fields, wrapped), else also the JSON for scripts."""
    if sys.stdout.isatty() and not isinstance(data, str):
        print(text if text is not None else brief(data))
        return
    if text is not None:
        print(text)
    print(data if isinstance(data, str) else json.dumps(data, indent=2))


def brief(data: Mapping[str, Any], width: int = 100) -> str:
    """The non-empty scalar fields of ``data`` as ``key: value`` pairs, wrapped to ``width`` columns."""
    import textwrap

    pairs = [f"{k}: {round(v, 2) if isinstance(v, float) else v}" for k, v in data.items()
             if isinstance(v, (str, int, float)) and not isinstance(v, bool) and v not in ("", 0)]
    return textwrap.fill(", ".join(pairs), width=width, subsequent_indent="  ")


def print_not_done(failed: Mapping[str, str], line: str) -> None:
    """One line per unit not done (``line`` formatted with ``name`` and ``why``) on the operator's terminal."""
    for name, why in sorted(failed.items()):
        print(line.format(name=name, why=why), file=terminal())


# --- the commands -----------------------------------------------------------------------------------------------
def download(args: argparse.Namespace) -> int:
    """``clipcap download``: URL list -> webdataset shards with img2dataset (``pipelines.download.job``).

        clipcap download --input cc3m/Train_GCC-training.tsv --output s3://bucket/cc3m/raw \\
            --processes 16 --threads 64 --image-size 256

    A headerless TSV (CC3M) is detected from its first row (or ``--no-header --columns caption,url``).
    """
    from pipelines.download.job import run_download, summary_json

    summary = run_download(flags.from_args(args, DOWNLOAD), ray_address=args.ray_address)
    print_result(summary.describe(), summary_json(summary))
    return summary.exit_code


def embed(args: argparse.Namespace) -> int:
    """``clipcap embed``: webdataset shards -> CLIP embedding tables (``pipelines.embed.job``).

        clipcap embed --input s3://bucket/cc3m/raw --output s3://bucket/clipcap --dataset cc3m \\
            --clip ViT-B-32 --clip-pretrained openai --num-actors 4 --gpus-per-actor 1 --batch-size 256

    Output: ``<output>/embeddings/<dataset>/<clip-tag>/part-<shard>.parquet``; a rerun skips finished shards.
    """
    from pipelines.embed.job import run_embed

    result = run_embed(flags.from_args(args, EMBED), ray_address=args.ray_address)
    print_result(result.describe(), result.to_dict())
    print_not_done(result.failed, "clipcap embed: shard not done (rerun to retry): {name}: {why}")
    return result.exit_code


def embed_text(args: argparse.Namespace) -> int:
    """``clipcap embed-text``: a caption corpus -> CLIP text-embedding tables (``pipelines.embed.text``).

        clipcap embed-text --input s3://bucket/corpus/captions.txt --output s3://bucket/clipcap --dataset corpus \\
            --clip ViT-B-32 --clip-pretrained openai --num-actors 2 --gpus-per-actor 1
        clipcap embed-text --input captions.csv --caption-col text --key-col id ...    # or img2dataset shards

    Output: ``<output>/text-embeddings/<dataset>/<clip-tag>/part-<id>.parquet``, input of
    ``clipcap train --decoder decap`` (a text-only captioner).
    """
    from pipelines.embed.text import run_embed_text

    result = run_embed_text(flags.from_args(args, EMBED_TEXT), ray_address=args.ray_address)
    print_result(result.describe(), result.to_dict())
    return 0


def demo(args: argparse.Namespace) -> int:
    """``clipcap demo``: the embedded default end to end (synthetic data, tiny preset, output under ./data).

        clipcap demo                      # what `make demo` runs
        clipcap demo --decap              # + a text-only (DeCap) model trained on the captions alone
        clipcap demo --world scenes       # two groups and a relation, six references per image, the tiny-scenes CLIP
    """
    from pipelines.demo.run import SAMPLES, STEPS, DemoConfig, run_demo, step_decap

    cfg = DemoConfig(root=args.output, samples=args.samples or SAMPLES[args.world], seed=args.seed,
                     ray_address=args.ray_address, world=args.world)
    result = run_demo(cfg, steps=[*STEPS, step_decap] if args.decap else None)
    print(result.describe())
    print(json.dumps({"embeddings_uri": result.embeddings_uri, "raw_uri": result.raw_uri, **result.paths},
                     indent=2))
    return 0


def caption_images(args: argparse.Namespace) -> int:
    """``clipcap caption-images``: caption a few images with a model artifact or preset and print the captions.

        clipcap caption-images photo1.jpg photo2.png --model s3://bucket/models/coco
        clipcap caption-images img/*.jpg --model ./artifacts/tiny-synthetic --strategy beam --beam-size 5 -n 3

    One line per image: ``<path>\\t<caption>`` (``n`` lines with ``-n``; ``--scores`` adds the mean token
    log-prob). For archives and millions of images use ``clipcap caption`` (Ray).
    """
    from clipcap_core import artifacts
    from clipcap_core.captioner import Captioner, open_image
    from clipcap_core.configs import from_dict
    from clipcap_core.decap import ProjectionConfig
    from pipelines.caption.stages import UNTRAINED_HINT

    if artifacts.is_preset(args.model) and not args.allow_untrained:
        raise ValueError(UNTRAINED_HINT.format(uri=args.model))
    images = [open_image(p) for p in args.paths]  # a bad file fails here, naming its path, before the model loads
    projection = from_dict(ProjectionConfig, flags.given(args, flags.fields(PROJECTION)))
    captioner = Captioner.from_pretrained(args.model, device=args.device, precision=args.precision,
                                          projection=projection)
    decode = {k: getattr(args, k) for k in ("beam_size", "max_length", "n", "stop_token", "seed", "temperature",
                                            "top_p", "top_k") if getattr(args, k) is not None}
    gen = captioner.generate(images=images, strategy=args.strategy, stop_at_eos=not args.ignore_eos, **decode)
    for i, (text, score) in enumerate(zip(gen.texts, gen.scores, strict=True)):
        print(f"{args.paths[i // gen.n]}\t{text}" + (f"\t{score:.4f}" if args.scores else ""))
    return 0


def import_reference(args: argparse.Namespace) -> int:
    """``clipcap import-reference``: convert a released ClipCap or DeCap checkpoint into a model artifact.

        clipcap import-reference coco_weights.pt --output s3://bucket/models/coco-mlp \\
            --mapping mlp --prefix-length 10 --clip-dim 512 --lm gpt2
        clipcap import-reference --decap coco_prefix-009.pt --output ./decap-coco --memory s3://b/text-embeddings/coco

    Read with ``torch.load(weights_only=True)`` (no pickled code runs). ``gpt.*`` weights are used when present
    and saved unless identical to ``--lm``'s. Decode like the authors with ``--stop-token . --ignore-eos`` and
    ``--strategy reference-beam``. ``--decap``: architecture and vocabulary come from the checkpoint; ``--memory``
    stores the text-embedding table image embeddings are projected onto.
    """
    from clipcap_core.encoders import EncoderConfig

    require(args, "output")
    encoder = EncoderConfig(model_name=args.clip, pretrained=args.clip_pretrained) if args.clip else None
    if args.decap:
        return _import_decap(args, encoder)
    if args.memory:
        raise ValueError("--memory goes with --decap (a ClipCap checkpoint has no DeCap memory)")
    missing = [flag for flag, value in (("--mapping", args.mapping), ("--prefix-length", args.prefix_length),
                                        ("--clip-dim", args.clip_dim)) if value is None]
    if missing:
        raise ValueError(f"a ClipCap checkpoint needs {', '.join(missing)} (or pass --decap for a DeCap one)")
    return _import_clipcap(args, encoder)


def _import_decap(args: argparse.Namespace, encoder: object) -> int:
    from clipcap_core.reference import import_decap_checkpoint

    given = [flag for flag, value in (("--mapping", args.mapping), ("--prefix-length", args.prefix_length),
                                      ("--clip-length", args.clip_length), ("--clip-dim", args.clip_dim),
                                      ("--tokenizer", args.tokenizer)) if value is not None]
    if given or args.normalize_prefix:
        raise ValueError(f"--decap reads the architecture from the checkpoint: drop {given or ['--normalize-prefix']}")
    cfg = import_decap_checkpoint(args.checkpoint, args.output, encoder=encoder, memory=args.memory).config
    memory = f"memory from {args.memory}" if args.memory else "no memory: give one at caption time (--memory)"
    print(f"imported DeCap {args.checkpoint} -> {args.output} (linear, k=1, D={cfg.clip_dim}, "
          f"{cfg.lm.config['n_layer']} layers, CLIP BPE; {memory})")
    return 0


def _import_clipcap(args: argparse.Namespace, encoder: object) -> int:
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


def train_config(args: argparse.Namespace) -> Any:
    """The TrainJobConfig of ``--config`` < flags (``--mapping`` ... into ``model_overrides``) < ``--set``."""
    overrides = {f"{section}.{name}": getattr(args, dest) for dest, (section, name) in flags.fields(PresetOverrides).items()
                 if getattr(args, dest, None) is not None}
    return flags.from_args(args, TRAIN, extra={"model_overrides": overrides} if overrides else None)


def train(args: argparse.Namespace) -> int:
    """``clipcap train``: train a ClipCap model on embedding tables with Ray Train (``pipelines.train.job``).

        clipcap train --input s3://b/embeddings/cc3m/ViT-B-32-openai --output s3://b/runs --name cc3m-mlp \\
            --model clipcap-mlp --workers 4 --gpu --epochs 10
        clipcap train --decoder decap --input s3://b/text-embeddings/corpus/ViT-B-32-openai --output s3://b/runs \\
            --name corpus-decap --noise-std 0.1 --memory-size 50000      # text only (DeCap)

    Re-running with the same ``--output`` and ``--name`` resumes.
    """
    from pipelines.train.job import run_training

    cfg = train_config(args)  # config errors before any Ray process starts
    init_ray(args.ray_address)
    result = run_training(cfg)
    print_result(None, {"artifact": result.artifact, "run_dir": result.run_dir, "metrics": result.metrics,
                        "dropped_rows": result.input_errors, "health": result.health})
    return 0


def nightly(args: argparse.Namespace) -> int:
    """``clipcap nightly``: one nightly retraining run (``pipelines.train.nightly.run_nightly``).

        clipcap nightly --input s3://b/embeddings/cc3m/ViT-B-32-openai --state s3://b/nightly/cc3m \\
            --initial-model s3://b/models/cc3m-mlp --workers 2 --gpu --metric cider --tolerance 0.02
        clipcap nightly --state s3://b/nightly/cc3m --status        # print the pointer and the decision history

    A no-op when no new shard arrived; the production pointer (``<state>/production.json``) moves only when the
    candidate is not worse on the fixed held-out set. Exit code 0: promoted / no-op, 3: refused.
    """
    from pipelines.train import nightly as job

    if args.status:
        if not args.state:
            raise ValueError("--status needs --state")
        print(json.dumps({"production": job.read_pointer(args.state), "history": job.read_history(args.state)},
                         indent=2, default=str))
        return 0
    cfg = flags.from_args(args, NIGHTLY)
    init_ray(args.ray_address)
    result = job.run_nightly(cfg)
    print(json.dumps({"decision": result.decision, "reason": result.reason, "run": result.run,
                      "new_shards": list(result.new_shards), "candidate": result.candidate,
                      "candidate_metrics": result.candidate_metrics,
                      "production_metrics": result.production_metrics, "production": result.pointer},
                     indent=2, default=str))
    return exitcodes.REFUSED if result.decision == "refused" else 0


def _status_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", action="store_true", help="print the pointer and history of --state and exit")


def sweep(args: argparse.Namespace) -> int:
    """``clipcap sweep``: Ray Tune over prefix lengths x mapping types; prints and saves held-out BLEU-4 / CIDEr.

        clipcap sweep --input s3://b/embeddings/coco/ViT-B-32-openai --output s3://b/sweeps \\
            --prefix-lengths 1 10 20 --mappings mlp transformer --epochs 5

    The table lands in ``<output>/<name>/results.{csv,json,md}``.
    """
    from pipelines.train.sweep import format_table, run_sweep

    cfg = flags.from_args(args, SWEEP)
    init_ray(args.ray_address)
    print(format_table(run_sweep(cfg)))
    print(f"\nsaved: {cfg.output.rstrip('/')}/{cfg.name}/results.{{csv,json,md}}")
    return 0


def study_config(args: argparse.Namespace) -> Any:
    """The config of ``clipcap study prefix`` or ``clipcap study decoding``."""
    return flags.from_args(args, STUDY_DECODING if args.study == "decoding" else STUDY_PREFIX)


def study(args: argparse.Namespace) -> int:
    """``clipcap study prefix``: prefix length x mapping x LM (frozen / tuned) x seeds on Ray Tune, held-out
    caption metrics as mean and spread over seeds (``pipelines.train.study``). ``clipcap study decoding``: one
    model's held-out rows by each decoding strategy, images/s and metrics (``pipelines.evaluate.decoding_study``).

        clipcap study prefix --input data/embeddings/scenes/tiny-scenes --output studies \\
            --set model_overrides.tokenizer=word-scenes
        clipcap study decoding --input data/embeddings/scenes/tiny-scenes --model runs/scenes/model --output studies

    Output in ``<output>/<name>/``: ``table.md``, ``table.parquet`` and a plot.
    """
    from pipelines.train.study import format_table, run_prefix_study

    cfg = study_config(args)
    if args.study == "decoding":
        from pipelines.evaluate import decoding_study

        print(decoding_study.format_table(decoding_study.run_decoding_study(cfg)))
        print(f"\nsaved: {cfg.output.rstrip('/')}/{cfg.name}/{{table.md,table.parquet,decoding.png}}")
        return 0
    init_ray(args.ray_address)
    _, table = run_prefix_study(cfg)
    print(format_table(table))
    print(f"\nsaved: {cfg.output.rstrip('/')}/{cfg.name}/{{table.md,table.parquet,trials.parquet,prefix.png}}")
    return 0


def _study_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", choices=["prefix", "decoding"],
                   help="prefix: prefix length x mapping x LM x seeds; decoding: strategies of one model")
    flags.add_config_arguments(p, "StudyConfig", "model_overrides.tokenizer=word-scenes")
    flags.add(p, STUDY_PREFIX, title="study")
    flags.add(p, STUDY_DECODING, skip=tuple(flags.fields(STUDY_PREFIX)), title="study decoding")


def caption_config(args: argparse.Namespace) -> Any:
    """The validated CaptionConfig of ``--config`` < flags < ``--set``."""
    from clipcap_core.configs import ConfigError
    from pipelines.caption.job import CaptionConfig

    data = flags.collect(args, flags.fields(CAPTION))
    if not data.get("model"):
        from pipelines.caption.stages import UNTRAINED_HINT

        raise ConfigError("--model is required: " + UNTRAINED_HINT.format(uri="(none)").split("; ", 1)[1])
    return flags.build(CaptionConfig, data, flags.fields(CAPTION))


def caption(args: argparse.Namespace) -> int:
    """``clipcap caption``: bulk-caption image archives into caption tables (``pipelines.caption.job``).

        clipcap caption --input s3://bucket/archives --output s3://bucket/captions/run1 --model s3://bucket/models/m1

    Output: ``<output>/captions/part-*.parquet`` and ``<output>/_meta/`` (errors, run record, summary). A rerun
    resumes and retries the parts that could not be read (exit codes: ``clipcap --help``).
    """
    from pipelines.caption.job import caption_archive

    cfg = caption_config(args)
    if args.show is not None and args.show < 0:
        from clipcap_core.configs import ConfigError

        raise ConfigError(f"--show must be >= 0 (0 prints no captions), got {args.show}")
    init_ray(args.ray_address)  # job-level faults are reported before any Ray process starts
    summary = caption_archive(cfg)
    print_result(None, summary.as_dict())
    print_not_done(summary.parts_failed, "clipcap caption: part {name} not done (rerun to retry): {why}")
    show_captions(cfg.output, args.show)
    return summary.exit_code


def show_captions(output: str, show: int | None) -> None:
    """``key<TAB>caption`` of the first ``show`` images (None: all of at most ``SHOW_ALL_UP_TO``, else a hint)."""
    from pipelines.caption.output import table_uri, top_captions

    if show == 0:
        return
    rows = top_captions(output)
    if show is None and len(rows) > SHOW_ALL_UP_TO:
        print(f"clipcap caption: {len(rows)} images captioned in {table_uri(output)}; --show K prints the first K",
              file=terminal())
        return
    for key, text in rows[:show]:
        print(f"{key}\t{' '.join((text or '').split())}")


def _show_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--show", type=int, metavar="K",
                   help=f"print key<TAB>caption for the first K images by key after the run (default: all when "
                        f"there are at most {SHOW_ALL_UP_TO}; 0: none)")


def train_clip(args: argparse.Namespace) -> int:
    """``clipcap train-clip``: contrastive CLIP training / fine-tuning on webdataset shards with Ray Train.

        clipcap train-clip --input s3://b/raw/mydomain --output s3://b/clip-runs --name vitb32-mydomain \\
            --clip ViT-B-32 --clip-pretrained openai --lock-image --lr 1e-5 --epochs 3 --workers 8 --gpu
        clipcap train-clip --input data/raw/synthetic --output data/clip-runs --name tiny --clip tiny --from-scratch

    Re-running with the same ``--output`` and ``--name`` resumes. Prints the weights file (``--clip-pretrained``
    of ``embed`` / ``train-clip`` / ``eval-clip``).
    """
    from pipelines.clip.job import plan, run_clip_training

    cfg = flags.from_args(args, TRAIN_CLIP)
    plan(cfg)  # model, weights and shards checked before Ray starts
    init_ray(args.ray_address)
    result = run_clip_training(cfg)
    print_result(None, {"weights": result.weights, "model_dir": result.model_dir, "run_dir": result.run_dir,
                        "metrics": result.metrics})
    return 0


def eval_clip(args: argparse.Namespace) -> int:
    """``clipcap eval-clip``: retrieval R@1/5/10 (image->text, text->image) and zero-shot classification of a CLIP.

        clipcap eval-clip --clip tiny --shards data/raw/synthetic --part heldout
        clipcap eval-clip --clip ViT-B-32 --clip-pretrained s3://b/clip-runs/x/model/x.safetensors \\
            --shards s3://b/raw/val --classes classes.txt --templates templates.txt --output eval.json

    Prints a table; ``--output`` also writes the JSON report.
    """
    from pipelines.clip.evaluate import evaluate_clip, format_report
    from pipelines.io import storage

    report = evaluate_clip(flags.from_args(args, EVAL_CLIP))
    print(format_report(report))
    if args.output:
        storage.write_json(report, args.output)
        print(f"report: {args.output}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``clipcap evaluate``: COCO metrics, CLIPScore and RefCLIPScore of captions (``pipelines.evaluate``).

        clipcap evaluate --predictions s3://b/captions/run1 --references captions_val2014.json --output ./eval/run1
        clipcap evaluate --predictions results.json --references refs.parquet --images ./val2014 \\
                         --model s3://b/models/m1 --output ./eval/m1      # + CLIPScore with m1's CLIP

    Predictions: our caption table (folder or file), a COCO results JSON, or a Parquet/JSONL/CSV table.
    References: a COCO captions annotation JSON, {id: [captions]} JSON, or a Parquet/JSONL/CSV table (id, caption).
    """
    from pipelines.evaluate.run import format_table, run_evaluate

    summary = run_evaluate(flags.from_args(args, EVALUATE))
    print_result(None, summary if args.json else format_table(summary))
    return 0


def _evaluate_flags(p: argparse.ArgumentParser) -> None:
    flags.add(p, EVALUATE, required=True)
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def report(args: argparse.Namespace) -> int:
    """``clipcap report``: one self-contained HTML report of a captioning run (``pipelines.report``).

        clipcap report --input s3://b/captions/run1 --evaluation ./eval/run1 --run s3://b/runs/cc3m-mlp \\
                       --output report.html

    The page opens with what went wrong (unmatched, empty or looping captions, the lowest CLIPScores); the
    gallery samples a few parts of the table; images and model come from the table's run record (or
    ``--images`` / ``--model``).
    """
    from pipelines.report.build import build_report

    require(args, "input", "output")
    print(build_report(flags.from_args(args, REPORT)))
    return 0


def index(args: argparse.Namespace) -> int:
    """``clipcap index``: a nearest-neighbour index (faiss) over an embedding table (``pipelines.index``).

        clipcap index --input s3://b/clipcap/embeddings/cc3m/ViT-B-32-openai --output s3://b/clipcap/index/cc3m
        clipcap index --input data/text-embeddings/corpus/tiny --column text_embedding --output data/index/corpus

    Exact search below ``--exact-below`` vectors, IVF above (``--kind`` overrides); cosine similarity.
    """
    from pipelines.index import build_index

    cfg = flags.from_args(args, INDEX)
    init_ray(args.ray_address)
    print(json.dumps(build_index(cfg), indent=2))
    return 0


def search(args: argparse.Namespace) -> int:
    """``clipcap search``: query an index made by ``clipcap index`` by text, image file or key.

        clipcap search --index data/index/synthetic --text "two small red circles at the top" -k 10
        clipcap search --index s3://b/clipcap/index/cc3m --image photo.jpg --output hits.parquet

    Text and images are encoded by the CLIP that made the table; a key queries with that row's own vector.
    """
    from pipelines.index import Searcher, format_hits, hits_table
    from pipelines.io import storage

    if not args.index:
        raise ValueError("--index is required (a folder made by `clipcap index`)")
    given = [(kind, values) for kind, values in (("text", args.text), ("image", args.image), ("key", args.key))
             if values]
    if len(given) != 1:
        raise ValueError("give exactly one of --text, --image, --key")
    kind, queries = given[0]
    searcher = Searcher.open(args.index, nprobe=args.nprobe)
    find = {"text": searcher.search_text, "image": searcher.search_images, "key": searcher.search_keys}[kind]
    hits = find(queries, k=args.top_k)
    print(format_hits(queries, hits))
    if args.output:
        storage.atomic_write_table(hits_table(queries, hits), args.output)
    return 0


# sub-command name -> Command, in the order `clipcap --help` lists them
COMMANDS = {
    "download": Command(download, "download a URL list into webdataset shards (img2dataset)", DOWNLOAD, "timeout=20",
                        "with --distributor ray (default: RAY_ADDRESS or a local instance)"),
    "embed": Command(embed, "embed webdataset shards with CLIP into Parquet tables", EMBED,
                     "resources.batch_size=128", RAY_ADDRESS_HEAD_HELP, stop_on_signals=True),
    "embed-text": Command(embed_text, "embed a caption corpus with the CLIP text tower into Parquet", EMBED_TEXT,
                          "resources.batch_size=256", RAY_ADDRESS_HEAD_HELP, stop_on_signals=True),
    "demo": Command(demo, "run the embedded default end to end (tiny preset, ./data)", DemoArgs,
                    ray="default: RAY_ADDRESS if set, else a private local Ray instance", standalone=True),
    "caption-images": Command(caption_images, "caption images with a model and print the captions", CaptionImagesArgs,
                              more=functools.partial(flags.add, ref=PROJECTION, title="DeCap projection"),
                              standalone=True, job_log=False),
    "import-reference": Command(import_reference, "convert a released ClipCap or DeCap checkpoint into an artifact",
                                ImportReferenceArgs, standalone=True, job_log=False),
    "train": Command(train, "train a ClipCap model on embedding tables (Ray Train)", TRAIN, "train.lr=1e-4",
                     RAY_ADDRESS_HELP, functools.partial(flags.add, ref=PresetOverrides,
                                                         title="preset overrides (model_overrides)")),
    "nightly": Command(nightly, "nightly retraining on fresh embedding shards + guarded promotion", NIGHTLY,
                       "train.lr=1e-4", RAY_ADDRESS_HELP, _status_flag),
    "sweep": Command(sweep, "prefix-length x mapping sweep with Ray Tune (held-out BLEU-4, CIDEr)", SWEEP,
                     "train.lr=1e-4, presets.mlp=clipcap-mlp", RAY_ADDRESS_HELP),
    "study": Command(study, "studies: prefix length x mapping x frozen / tuned LM x seeds (Ray Tune); decoding "
                            "strategies' cost and gain", ray=RAY_ADDRESS_HELP, more=_study_flags),
    "caption": Command(caption, "bulk-caption image archives into caption tables", CAPTION, "decoding.top_k=40",
                       RAY_ADDRESS_HELP, _show_flag, stop_on_signals=True),
    "train-clip": Command(train_clip, "train or fine-tune CLIP contrastively (Ray Train)", TRAIN_CLIP,
                          "train.beta2=0.95", RAY_ADDRESS_HELP),
    "eval-clip": Command(eval_clip, "retrieval and zero-shot evaluation of a CLIP model", EVAL_CLIP, job_log=False),
    "evaluate": Command(evaluate, "COCO metrics + CLIPScore of captions against references", more=_evaluate_flags,
                        job_log=False),
    "report": Command(report, "write a self-contained HTML report of a captioning run", REPORT, job_log=False),
    "index": Command(index, "build a nearest-neighbour index (faiss) over an embedding table", INDEX, "kind=hnsw",
                     RAY_ADDRESS_HELP),
    "search": Command(search, "query a nearest-neighbour index by text, image or key", SearchArgs, standalone=True,
                      job_log=False),
}

if __name__ == "__main__":
    sys.exit(main())

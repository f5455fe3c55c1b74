"""Bulk captioning speed with the users' defaults: `clipcap caption` end to end vs the same model in one plain
process through `Captioner` (the compute limit) vs the authors' per-image loop.

Same models for all three: a ViT-B-32-sized CLIP and a GPT-2-small-sized ClipCap (MLP mapping, k = 10, D = 512),
random seeded weights (same FLOPs as the real ones), saved as a model artifact. Input: ``--images`` synthetic
256 px JPEGs in one tar archive, written before any clock starts.

- ours: `clipcap caption --input archive.tar --output DIR --model DIR --strategy S --max-length T` with **no
  resource flags**, in a new process as a user runs it: imports, Ray start, actor start-up, model loads,
  reading, decoding, CLIP, decoding, CLIPScore (on by default) and commits are all inside the wall time;
- Captioner: ``Captioner.from_pretrained(model).caption(images=<bytes>, ...)`` in this process, batches of
  ``--captioner-batch`` (32), all cores as torch threads, the model loaded before the clock (the limit: pure
  decode + CLIP + generation compute); no CLIPScore;
- reference: decode + CLIP on one image at a time, then the authors' per-image decoding without a KV cache
  (``authors_clipcap.generate2`` greedy, ``generate_beam`` beam 5), all cores; costs seconds per image, so it runs
  on ``--ref-images`` images.
Prints images/s of each and the ratios ours / Captioner and ours / reference; ``--json`` writes them.

    python benchmarks/caption.py                        # 1024 images, greedy, 30 tokens
    python benchmarks/caption.py --images 256 --strategies greedy,beam --ref-images 8
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_artifact(out: str, seed: int = 0) -> None:
    """GPT-2-small-sized LM + MLP mapping (k = 10) for a ViT-B-32-sized CLIP (D = 512), random weights."""
    from transformers import GPT2Config

    from clipcap_core.artifacts import save_model
    from clipcap_core.encoders import EncoderConfig
    from clipcap_core.model import LMConfig, MappingConfig, ModelConfig, build_model
    from clipcap_core.tokenizer import build_word_tokenizer

    vocab = GPT2Config().vocab_size
    tokenizer = build_word_tokenizer(words=[f"w{i}" for i in range(vocab - 2)])  # GPT-2-sized vocabulary
    cfg = ModelConfig(clip_dim=512, mapping=MappingConfig(kind="mlp", prefix_length=10),
                      lm=LMConfig(name_or_path="gpt2-small-random", config={}, seed=seed),
                      encoder=EncoderConfig(model_name="ViT-B-32", pretrained=None))
    torch.manual_seed(seed)
    save_model(build_model(cfg, tokenizer), tokenizer, out)


def build_archive(path: str, n: int, size: int) -> list[bytes]:
    from clipcap_core import synthetic

    images = []
    with tarfile.open(path, "w") as tf:
        for s in synthetic.generate(n, seed=3, size=size):
            buf = io.BytesIO()
            s.image.save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
            info = tarfile.TarInfo(f"images/{s.key}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            images.append(data)
    return images


def run_pipeline(archive: str, model: str, out: str, args: argparse.Namespace, strategy: str) -> dict:
    """`clipcap caption` with default resources in a new process; its wall time and summary."""
    from benchmarks.clirun import run_clipcap

    wall, summary, stderr, cmd = run_clipcap("caption", "--input", archive, "--output", out, "--model", model,
                                             "--strategy", strategy, "--max-length", str(args.new_tokens),
                                             *args.extra_flags.split())
    plan = [x.split("resources: ", 1)[1] for x in stderr.splitlines() if "pool resources: " in x]
    return {"wall_s": wall, "images": summary["images"], "images_per_s": summary["images"] / wall, "plan": plan,
            "command": " ".join(cmd[1:])}


def run_captioner(images: list[bytes], model_uri: str, args: argparse.Namespace, strategy: str) -> dict:
    """The same model in one plain process: ``Captioner.caption`` over batches, all cores (the limit)."""
    from clipcap_core.captioner import Captioner

    torch.set_num_threads(os.cpu_count() or 1)
    gpu = torch.cuda.is_available()  # like the job's default: the GPU when there is one, fp16 there
    cap = Captioner.from_pretrained(model_uri, device="cuda" if gpu else "cpu", precision="fp16" if gpu else "fp32")
    cap.caption(images=images[:2], strategy=strategy, max_length=args.new_tokens)  # loads CLIP, warms up
    t = time.perf_counter()
    n = 0
    for start in range(0, len(images), args.captioner_batch):
        chunk = images[start:start + args.captioner_batch]
        n += len(cap.caption(images=chunk, strategy=strategy, beam_size=5, max_length=args.new_tokens,
                             batch_size=args.captioner_batch))
    wall = time.perf_counter() - t
    return {"images": n, "wall_s": wall, "images_per_s": n / wall, "batch": args.captioner_batch}


def run_reference(images: list[bytes], model_uri: str, args: argparse.Namespace, strategy: str,
                  threads: int, count: int) -> dict:
    """CLIP one image at a time, then the authors' per-image decoding: wall and CPU seconds per stage."""
    from benchmarks.authors_clipcap import generate2, generate_beam
    from clipcap_core.artifacts import load_model
    from clipcap_core.encoders import load_encoder
    from clipcap_core.imaging import decode_image

    torch.set_num_threads(threads)
    loaded = load_model(model_uri)
    model, tok = loaded.model, loaded.tokenizer
    encoder = load_encoder(loaded.config.encoder)
    wall = {"decode": 0.0, "clip": 0.0, "caption": 0.0}
    cpu = dict(wall)
    tokens, per_image = [], []
    with torch.inference_mode():
        for data in images[:count]:
            marks = [(time.perf_counter(), time.process_time())]
            x = encoder.preprocess(decode_image(data))[None]  # (1, 3, H, W)
            marks.append((time.perf_counter(), time.process_time()))
            emb = torch.from_numpy(encoder.encode_images(x))  # (1, D)
            marks.append((time.perf_counter(), time.process_time()))
            prefix = model.prefix(emb)  # (1, k, E)
            if strategy == "greedy":
                text = generate2(model, tok, prefix, entry_length=args.new_tokens, stop_token=tok.eos_token)
            else:
                text = generate_beam(model, tok, prefix, beam_size=5, entry_length=args.new_tokens,
                                     stop_token=tok.eos_token)[0]
            marks.append((time.perf_counter(), time.process_time()))
            for i, stage in enumerate(("decode", "clip", "caption")):
                wall[stage] += marks[i + 1][0] - marks[i][0]
                cpu[stage] += marks[i + 1][1] - marks[i][1]
            per_image.append(marks[-1][0] - marks[0][0])
            tokens.append(len(tok.encode(text)))
    n = len(per_image)
    return {"threads": threads, "images": n, "images_per_s": n / sum(wall.values()), "cpu_s_per_image": sum(cpu.values()) / n,
            "s_per_image": {k: round(v / n, 3) for k, v in wall.items()},
            "s_per_image_min_median_max": [round(float(q), 2) for q in np.quantile(per_image, [0, 0.5, 1])],
            "cpu_s_per_image_by_stage": {k: round(v / n, 3) for k, v in cpu.items()},
            "mean_tokens": float(np.mean(tokens))}


def parser() -> argparse.ArgumentParser:
    """This benchmark's flags (``tests/test_benchmarks.py`` checks ``gpu_check.sh``'s lines against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--strategies", default="greedy")
    p.add_argument("--ref-images", type=int, default=8, help="images run through the authors' per-image loop")
    p.add_argument("--captioner-batch", type=int, default=32)
    p.add_argument("--extra-flags", default="", help="flags added to `clipcap caption` (default: none)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", help="also write the figures to this file")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipcap-bench-caption-"))
    model_uri, archive = str(work / "model"), str(work / "archive.tar")
    if not (work / "model" / "config.json").exists():
        build_artifact(model_uri)
    images = build_archive(archive, args.images, args.image_size)
    cpus = os.cpu_count() or 1
    print(f"machine: {cpus} CPUs (load average {os.getloadavg()[0]:.1f}), torch {torch.__version__}, GPU: "
          f"{torch.cuda.is_available()}; archive {args.images} JPEGs {args.image_size}px; ViT-B-32 + GPT-2 small "
          f"(random weights); {args.new_tokens} new tokens", flush=True)
    results = {}
    for strategy in args.strategies.split(","):
        load = [os.getloadavg()[0]]
        ref = run_reference(images, model_uri, args, strategy, cpus, args.ref_images)
        limit = run_captioner(images, model_uri, args, strategy)
        load.append(os.getloadavg()[0])
        ours = run_pipeline(archive, model_uri, str(work / f"out-{strategy}-{time.time_ns()}"), args, strategy)
        load.append(os.getloadavg()[0])
        assert ours["images"] == args.images, ours
        results[strategy] = {"ours": ours, "captioner": limit, "reference": ref, "loadavg_1m": load,
                             "ours_over_captioner": round(ours["images_per_s"] / limit["images_per_s"], 3),
                             "ours_over_reference": round(ours["images_per_s"] / ref["images_per_s"], 1)}
        print(f"{strategy:6s} ours {ours['images_per_s']:.2f} images/s end to end ({ours['images']} in "
              f"{ours['wall_s']:.1f} s, default flags) | Captioner {limit['images_per_s']:.2f} images/s | authors' "
              f"loop {ref['images_per_s']:.3f} images/s ({ref['images']} images) | ours/Captioner "
              f"{results[strategy]['ours_over_captioner']}, ours/authors {results[strategy]['ours_over_reference']}x"
              f" | load {load}", flush=True)
        print(f"       our plan: {ours['plan']}", flush=True)
    print(json.dumps(results, indent=2, default=str))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

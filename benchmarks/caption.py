"""Bulk captioning speed: the Ray pipeline end to end vs a reference-style per-image loop.

Same models for both: a ViT-B-32-sized CLIP and a GPT-2-small-sized ClipCap (MLP mapping, k = 10, D = 512),
random seeded weights (same FLOPs as the real ones), saved as a model artifact. Input: a 256-image tar of
synthetic JPEGs. Every caption is exactly ``--new-tokens`` tokens in our pipeline (no end-of-text stop);
the reference stops at end-of-text if a random model happens to emit it (which only favours the reference).

- pipeline: ``pipelines.caption.caption_archive`` on a local Ray instance started beforehand: read + decode
  tasks -> CLIP actor -> batched KV-cache decoding actor -> caption table. Timed from the call to the
  committed table, so actor start-up and model loading are *included* ("end to end"). A small run
  (``--small-images``) before it measures the fixed start-up; (N - n) / (wall_N - wall_n) is the "marginal"
  rate, what images cost once the pipeline runs (the figure that matters for large archives).
- reference: for each image, decode + preprocess, CLIP on that one image, then the authors' per-image
  decoding without KV cache (``reference.generate2`` greedy, ``reference.generate_beam`` beam 5), all
  threads of the machine. It costs seconds per image, so it runs on ``--ref-images`` images and is reported
  per image (images/s on that subset).

    python benchmarks/caption.py                       # CPU: 256 images, greedy + beam-5, 30 tokens
    python benchmarks/caption.py --strategies greedy --ref-images 8
    python benchmarks/caption.py --gpus-per-actor 1 --caption-batch-size 256   # on a GPU machine

Prints one line per strategy: pipeline images/s, stage busy seconds, reference images/s and the ratio.
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
    from clipcap_core.mapping import MappingConfig
    from clipcap_core.model import LMConfig, ModelConfig, build_model
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


def run_pipeline(archive: str, model: str, out: str, args: argparse.Namespace, strategy: str):
    from clipcap_core.decoding import DecodeConfig
    from pipelines.caption import CaptionConfig, ResourceOptions, caption_archive

    decoding = DecodeConfig(strategy=strategy, beam_size=5, max_length=args.new_tokens, stop_at_eos=False)
    res = ResourceOptions(clip_batch_size=args.clip_batch_size, caption_batch_size=args.caption_batch_size,
                          decode_block_rows=32, read_cpus=0.25, cpus_per_actor=args.cpus_per_actor,
                          clip_actors=args.clip_actors, caption_actors=args.caption_actors,
                          torch_threads=args.actor_threads, gpus_per_actor=args.gpus_per_actor)
    cfg = CaptionConfig(input=archive, output=out, model=model, decoding=decoding, resources=res,
                        progress_interval_s=15.0)
    t0 = time.perf_counter()
    summary = caption_archive(cfg)
    return time.perf_counter() - t0, summary


def run_reference(images: list[bytes], model_uri: str, args: argparse.Namespace, strategy: str):
    """CLIP one image at a time, then the authors' per-image decoding; returns per-stage seconds."""
    from clipcap_core.artifacts import load_model
    from clipcap_core.encoders import load_encoder
    from clipcap_core.reference import generate2, generate_beam
    from pipelines.imaging import decode_image

    loaded = load_model(model_uri)
    model, tok = loaded.model, loaded.tokenizer
    encoder = load_encoder(loaded.config.encoder)
    t = {"decode": 0.0, "clip": 0.0, "caption": 0.0}
    tokens = []
    with torch.inference_mode():
        for data in images[: args.ref_images]:
            t0 = time.perf_counter()
            x = encoder.preprocess(decode_image(data))[None]  # (1, 3, H, W)
            t1 = time.perf_counter()
            emb = torch.from_numpy(encoder.encode_images(x))  # (1, D)
            t2 = time.perf_counter()
            prefix = model.prefix(emb)  # (1, k, E)
            if strategy == "greedy":
                text = generate2(model, tok, prefix, entry_length=args.new_tokens, stop_token=tok.eos_token)
            else:
                text = generate_beam(model, tok, prefix, beam_size=5, entry_length=args.new_tokens,
                                     stop_token=tok.eos_token)[0]
            t3 = time.perf_counter()
            t["decode"] += t1 - t0
            t["clip"] += t2 - t1
            t["caption"] += t3 - t2
            tokens.append(len(tok.encode(text)))
    return t, float(np.mean(tokens))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--small-images", type=int, default=8, help="images of the start-up calibration run")
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--strategies", default="greedy,beam")
    p.add_argument("--ref-images", type=int, default=16, help="images run through the reference loop")
    p.add_argument("--clip-batch-size", type=int, default=32)
    p.add_argument("--caption-batch-size", type=int, default=32)
    p.add_argument("--clip-actors", type=int, default=1)
    p.add_argument("--caption-actors", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--actor-threads", type=int, default=1, help="torch threads per actor")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray instance")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipcap-bench-caption-"))
    model_uri, archive = str(work / "model"), str(work / "archive.tar")
    if not (work / "model" / "config.json").exists():
        build_artifact(model_uri)
    images = build_archive(archive, args.images, args.image_size)
    small_archive = str(work / "small.tar")
    build_archive(small_archive, args.small_images, args.image_size)
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=args.ray_cpus or cpus + 1, include_dashboard=False, log_to_driver=False)
    print(f"machine: {cpus} CPUs, torch {torch.__version__}, GPU: {torch.cuda.is_available()}; archive "
          f"{args.images} JPEGs {args.image_size}px; models ViT-B-32 + GPT-2 small (random); "
          f"{args.new_tokens} new tokens", flush=True)
    results = {}
    for strategy in args.strategies.split(","):
        # a small run first: its wall time is mostly the fixed start-up (actors, model loads), which the
        # difference with the full run removes ("marginal" rate: what more images cost)
        small_wall, small = run_pipeline(small_archive, model_uri, str(work / f"small-{strategy}-{time.time_ns()}"),
                                         args, strategy)
        wall, summary = run_pipeline(archive, model_uri, str(work / f"out-{strategy}-{time.time_ns()}"), args,
                                     strategy)
        ours = summary.images / wall
        later = (summary.images - small.images) / max(wall - small_wall, 1e-9)
        torch.set_num_threads(cpus)
        ref_t, ref_tokens = run_reference(images, model_uri, args, strategy)
        n_ref = min(args.ref_images, args.images)
        ref_ips = n_ref / sum(ref_t.values())
        results[strategy] = {
            "pipeline_images_per_s": round(ours, 3), "pipeline_wall_s": round(wall, 2),
            "small_run_images": small.images, "small_run_wall_s": round(small_wall, 2),
            "pipeline_marginal_images_per_s": round(later, 3), "ratio_marginal": round(later / ref_ips, 1),
            "pipeline_stage_busy_s": summary.stage_seconds, "pipeline_images": summary.images,
            "reference_images_per_s": round(ref_ips, 4), "reference_images": n_ref,
            "reference_s_per_image": {k: round(v / n_ref, 3) for k, v in ref_t.items()},
            "reference_mean_tokens": ref_tokens, "ratio": round(ours / ref_ips, 1),
        }
        print(f"{strategy:6s} pipeline {ours:6.2f} images/s ({summary.images} images in {wall:.1f} s incl. actor "
              f"start-up; marginal {later:.2f} images/s vs a {small.images}-image run of {small_wall:.1f} s; stage "
              f"busy s {summary.stage_seconds}) | reference {ref_ips:.3f} images/s "
              f"(per image s {results[strategy]['reference_s_per_image']}, {n_ref} images, "
              f"{ref_tokens:.0f} tokens) | ratio {ours / ref_ips:.1f}x end to end, {later / ref_ips:.1f}x "
              "marginal", flush=True)
    print(json.dumps(results, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()

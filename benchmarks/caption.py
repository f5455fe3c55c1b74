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
  per image (images/s on that subset). Run before Ray starts.
- CPU time: process CPU seconds per image of the pipeline's stages (each actor runs 1 torch thread) vs the
  reference run on 1 thread (``--ref-cpu-images``): the efficiency ratio, much less sensitive than wall time
  to other processes sharing the machine.

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


def run_reference(images: list[bytes], model_uri: str, args: argparse.Namespace, strategy: str,
                  threads: int, count: int) -> dict:
    """CLIP one image at a time, then the authors' per-image decoding: wall and CPU seconds per stage."""
    from clipcap_core.artifacts import load_model
    from clipcap_core.encoders import load_encoder
    from clipcap_core.reference import generate2, generate_beam
    from pipelines.imaging import decode_image

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--small-images", type=int, default=8, help="images of the start-up calibration run")
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--strategies", default="greedy,beam")
    p.add_argument("--ref-images", type=int, default=16, help="images run through the reference loop")
    p.add_argument("--ref-cpu-images", type=int, default=4,
                   help="images run through a 1-thread reference loop for the CPU-time ratio")
    p.add_argument("--clip-batch-size", type=int, default=32)
    p.add_argument("--caption-batch-size", type=int, default=64)
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
    # Ray runs its workers at nice 15 by default: on a shared machine that hands the CPU to every other
    # process, including the reference loop (nice 0). Like for like: nice 0 for both.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipcap-bench-caption-"))
    model_uri, archive = str(work / "model"), str(work / "archive.tar")
    if not (work / "model" / "config.json").exists():
        build_artifact(model_uri)
    images = build_archive(archive, args.images, args.image_size)
    small_archive = str(work / "small.tar")
    build_archive(small_archive, args.small_images, args.image_size)
    cpus = os.cpu_count() or 1
    print(f"machine: {cpus} CPUs (load average {os.getloadavg()[0]:.1f}), torch {torch.__version__}, GPU: "
          f"{torch.cuda.is_available()}; archive {args.images} JPEGs {args.image_size}px; ViT-B-32 + GPT-2 small "
          f"(random weights); {args.new_tokens} new tokens", flush=True)
    strategies = args.strategies.split(",")
    # before Ray starts: all threads for wall time (as users run it); 1 thread for CPU time (several threads
    # spin-wait when the machine is shared, which inflates the reference's CPU seconds)
    reference = {s: run_reference(images, model_uri, args, s, cpus, args.ref_images) for s in strategies}
    reference_1t = {s: run_reference(images, model_uri, args, s, 1, args.ref_cpu_images) for s in strategies}
    ray.init(num_cpus=args.ray_cpus or cpus + 1, include_dashboard=False, log_to_driver=False)
    results = {}
    for strategy in strategies:
        # a small run first: its wall time is mostly the fixed start-up (actors, model loads), which the
        # difference with the full run removes ("marginal" rate: what more images cost)
        small_wall, small = run_pipeline(small_archive, model_uri, str(work / f"small-{strategy}-{time.time_ns()}"),
                                         args, strategy)
        wall, summary = run_pipeline(archive, model_uri, str(work / f"out-{strategy}-{time.time_ns()}"), args,
                                     strategy)
        ref, ref1 = reference[strategy], reference_1t[strategy]
        ours, marginal = summary.images / wall, (summary.images - small.images) / max(wall - small_wall, 1e-9)
        cpu_per_image = sum(summary.stage_cpu_seconds.values()) / summary.images
        results[strategy] = {
            "pipeline": {"images": summary.images, "wall_s": round(wall, 2), "images_per_s": round(ours, 3),
                         "small_run": [small.images, round(small_wall, 2)], "marginal_images_per_s": round(marginal, 3),
                         "stage_busy_s": summary.stage_seconds, "stage_cpu_s": summary.stage_cpu_seconds,
                         "cpu_s_per_image": round(cpu_per_image, 4)},
            "reference": ref, "reference_1_thread": ref1,
            "ratio_end_to_end": round(ours / ref["images_per_s"], 1),
            "ratio_marginal": round(marginal / ref["images_per_s"], 1),
            "ratio_cpu_time": round(ref1["cpu_s_per_image"] / cpu_per_image, 1),
        }
        print(f"{strategy:6s} pipeline {ours:.2f} images/s end to end ({summary.images} in {wall:.1f} s incl. "
              f"start-up), marginal {marginal:.2f} images/s, {cpu_per_image:.3f} CPU s/image, stage busy s "
              f"{summary.stage_seconds} | reference {ref['images_per_s']:.3f} images/s ({ref['images']} images, "
              f"s/image {ref['s_per_image']}), 1 thread {ref1['cpu_s_per_image']:.2f} CPU s/image | ratios: "
              f"{results[strategy]['ratio_end_to_end']}x end to end, {results[strategy]['ratio_marginal']}x "
              f"marginal, {results[strategy]['ratio_cpu_time']}x CPU time", flush=True)
    print(json.dumps(results, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()

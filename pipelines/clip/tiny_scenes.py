"""Make the ``scenes`` CLIPs shipped in ``clipcap_core/resources`` (``make tiny-scenes-clip`` / ``make
tiny-scenes-gapped-clip``; <= 20 min each on 2 cores).

    python -m pipelines.clip.tiny_scenes --variant tiny-scenes|tiny-scenes-gapped [--root data/tiny-scenes] [--steps N]

``TRAIN_N`` train-split scenes in hard-negative twins (one minimal edit apart) with varied reference captions;
``train.group_size=2`` keeps each twin pair in one batch, so the CLIP must learn shape and relation, not colour
alone. ``tiny-scenes`` learns its temperature; ``tiny-scenes-gapped`` keeps logit scale 100 from a cone-shaped
init and trains briefly, which leaves a modality gap near a real CLIP's (Liang et al., NeurIPS 2022). The fp16
weights go to ``<variant>.safetensors``; zero-shot, minimal-edit and gap figures on fresh ``test`` and ``novel``
scenes go to its model card and ``<variant>.eval.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from safetensors.torch import load_file, save_file

from clipcap_core import scenes
from clipcap_core.clip_eval import l2n, modality_gap
from clipcap_core.clip_training import ClipModelSpec, ClipTrainConfig
from clipcap_core.encoders import EncoderConfig, load_encoder
from pipelines.clip.evaluate import encode_texts
from pipelines.clip.job import ClipTrainJobConfig, model_card, run_clip_training
from pipelines.train.state import RunOptions, ScaleConfig

RESOURCES = Path(__file__).resolve().parents[2] / "clipcap_core" / "resources"
TRAIN_SEED, EVAL_SEED, EVAL_N = 1, 7777, 1000
TRAIN_N, SHARD = 16384, 1024


@dataclass(frozen=True, kw_only=True)
class Variant:
    steps: int  # training steps of ``batch`` pairs
    batch: int = 128
    lr: float = 1e-3
    logit_scale: float | None = None  # fixed (not learned) when set
    cone_init: float = 0.0


VARIANTS = {
    "tiny-scenes": Variant(steps=1024),
    "tiny-scenes-gapped": Variant(steps=384, logit_scale=100.0, cone_init=4.0),
}


# --- zero-shot figures ------------------------------------------------------------------------------------
def _encode_images(encoder: Any, samples: list[scenes.SceneSample]) -> np.ndarray:
    pixels = np.stack([encoder.resize(s.image) for s in samples])
    return np.concatenate([encoder.encode_pixels(pixels[i: i + 256]) for i in range(0, len(pixels), 256)])


def hard_negative_accuracy(encoder: Any, img: np.ndarray, samples: list[scenes.SceneSample]) -> dict[str, float]:
    """Per kind: share of images whose true caption scores above every edit of that kind (and of all kinds)."""
    negs = [scenes.hard_negatives(s.scene) for s in samples]
    kinds = list(negs[0])
    texts = [scenes.caption_for(x) for s, n in zip(samples, negs, strict=True)
             for x in [s.scene] + [e for k in kinds for e in n[k]]]
    emb = l2n(encode_texts(encoder, texts))
    img, out, at = l2n(img), {k: [] for k in (*kinds, "all")}, 0
    for i, n in enumerate(negs):
        scores = emb[at: at + 1 + sum(map(len, n.values()))] @ img[i]
        truth, pos = scores[0], 1
        for k in kinds:
            if n[k]:
                out[k].append(bool(truth > scores[pos: pos + len(n[k])].max()))
            pos += len(n[k])
        out["all"].append(bool(truth > scores[1:].max()))
        at += pos
    return {f"hard_{k}": float(np.mean(v)) for k, v in out.items() if v}


def zero_shot_scenes(encoder: Any, split: str, n: int = EVAL_N, seed: int = EVAL_SEED) -> dict[str, float]:
    """Zero-shot figures of ``encoder`` on ``n`` fresh ``split`` scenes (see the module doc) + the modality gap."""
    samples = list(scenes.generate(n, seed=seed, size=64, split=split))  # type: ignore[arg-type]
    img = _encode_images(encoder, samples)
    classes = sorted({s.caption for s in samples})
    cls_emb = encode_texts(encoder, classes)
    top1 = [classes[i] for i in (l2n(img) @ l2n(cls_emb).T).argmax(1)]
    hits = [scenes.parse_caption(p).normalized() == s.scene.normalized()  # type: ignore[union-attr]
            for p, s in zip(top1, samples, strict=True)]
    own = encode_texts(encoder, [s.caption for s in samples])
    return {"images": float(n), "classes": float(len(classes)), "top1": float(np.mean(hits)),
            **hard_negative_accuracy(encoder, img, samples), **modality_gap(img, own)}


# --- the run ----------------------------------------------------------------------------------------------
def train(name: str, v: Variant, root: Path) -> Any:
    """Shards (once) and the ``train-clip`` run of variant ``name``; returns its ``ClipTrainResult``."""
    shards = root / "shards-twins"
    if not (shards / f"{TRAIN_N // SHARD - 1:05d}.tar").exists():
        t0 = time.perf_counter()
        scenes.write_webdataset(shards, TRAIN_N, seed=TRAIN_SEED, size=64, shard_size=SHARD, caption="random",
                                twins=True)
        logging.info("%d training scenes written in %.0f s", TRAIN_N, time.perf_counter() - t0)
    epochs = max(1, math.ceil(v.steps * v.batch / TRAIN_N))
    cfg = ClipTrainJobConfig(
        shards=(str(shards),), output=str(root / "runs"), name=f"{name}-s{v.steps}",
        model=ClipModelSpec(model_name=name, from_scratch=True),
        train=ClipTrainConfig(epochs=epochs, batch_size=v.batch, lr=v.lr, weight_decay=0.1,
                              warmup_steps=v.steps // 10, seed=0, augment="none", logit_scale=v.logit_scale,
                              cone_init=v.cone_init, group_size=2),
        run=RunOptions(log_every=25, checkpoint_every=200),
        scale=ScaleConfig(num_workers=1, cpus_per_worker=1, torch_threads=2), heldout_fraction=0.0)
    ray.init(num_cpus=2, log_to_driver=True)
    try:
        return run_clip_training(cfg)
    finally:
        ray.shutdown()


def write_fp16(weights: str, out: Path) -> None:
    save_file({k: t.half() if t.is_floating_point() else t for k, t in load_file(weights).items()}, str(out),
              metadata={"format": "pt"})
    out.chmod(0o644)


def card(name: str, v: Variant, result: Any, figures: dict[str, dict[str, float]], seconds: float) -> str:
    info = json.loads((Path(result.model_dir) / "clipcap_clip.json").read_text())
    info["weights"] = f"{name}.safetensors"
    temp = (f"fixed logit scale {v.logit_scale:g} (temperature {1 / v.logit_scale:g}), not learned"
            if v.logit_scale else "learned temperature (open_clip's init 1/0.07)")
    titles = {"test": "unseen images, seen combinations (split `test`)",
              "novel": "held-out colour-shape combinations (split `novel`)"}
    extra = {f"Zero-shot on {EVAL_N} {titles[k]}, seed {EVAL_SEED}": t for k, t in figures.items()}
    return (model_card(info, extra) + f"\nWorld: `scenes` (clipcap_core/scenes.py); {temp}; cone init "
            f"{v.cone_init:g}. top1: image->caption among the canonical captions of the evaluated images (chance "
            "1/1000); hard_*: true caption above every minimal edit of that kind (chance: count 1/5, size 1/3, colour "
            "1/15, shape 1/9, relation 1/4, binding 1/2); the gap figures are of image and canonical "
            "caption pairs (a real CLIP: paired cosine ~0.3, centroid distance ~0.8). "
            f"Trained in {seconds / 60:.0f} min on 2 shared CPU cores. Weights stored as fp16 (the "
            f"figures are of the fp16 file). Made by `python -m pipelines.clip.tiny_scenes --variant {name}`.\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS), required=True, help="which CLIP to make")
    ap.add_argument("--root", default="data/tiny-scenes", help="work folder (shards, runs)")
    ap.add_argument("--steps", type=int, help="training steps (default: the variant's)")
    ap.add_argument("--out", default=str(RESOURCES), help="where <variant>.safetensors / .md go")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name, out = args.variant, Path(args.out)
    v = replace(VARIANTS[name], steps=args.steps or VARIANTS[name].steps)
    t0 = time.perf_counter()
    result = train(name, v, Path(args.root).resolve())
    seconds = time.perf_counter() - t0
    tmp = out / f".tmp-{name}.safetensors"  # open_clip picks its loader by the .safetensors suffix
    write_fp16(result.weights, tmp)
    encoder = load_encoder(EncoderConfig(model_name=name, pretrained=str(tmp)))
    figures = {split: zero_shot_scenes(encoder, split) for split in ("test", "novel")}
    tmp.replace(out / f"{name}.safetensors")
    (out / f"{name}.md").write_text(card(name, v, result, figures, seconds))
    (out / f"{name}.eval.json").write_text(json.dumps({"train_seconds": seconds, **figures}, indent=2) + "\n")
    shutil.copy(result.run_dir + "/history.json", out / f"{name}.history.json")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

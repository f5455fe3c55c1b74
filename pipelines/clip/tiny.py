"""Make the aligned ``tiny`` CLIP shipped in ``clipcap_core/resources`` (``make tiny-clip``; ~10 min on 2 cores):
``clipcap train-clip`` from scratch on the synthetic set (seed ``TRAIN_SEED``), the weights cast to fp16 as
``tiny.safetensors``, and zero-shot figures on ``EVAL_N`` unseen images (``EVAL_SEED``) in its model card.

    python -m pipelines.clip.tiny [--root data/tiny-clip] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import ray
from safetensors.torch import load_file, save_file

from clipcap_core import synthetic
from clipcap_core.clip_eval import l2n
from clipcap_core.clip_training import ClipModelSpec, ClipTrainConfig
from clipcap_core.encoders import EncoderConfig, load_encoder
from pipelines.clip.evaluate import encode_texts, synthetic_attributes
from pipelines.clip.job import ClipTrainJobConfig, model_card, run_clip_training
from pipelines.train.state import RunOptions, ScaleConfig

RESOURCES = Path(__file__).resolve().parents[2] / "clipcap_core" / "resources"
TRAIN_SEED, EVAL_SEED, EVAL_N = 1, 7777, 1000
TRAIN_N, BATCH = 8192, 256


def zero_shot_synthetic(encoder: Any, n: int = EVAL_N, seed: int = EVAL_SEED) -> dict[str, float]:
    """Top-1 exact and per-attribute accuracy of image->caption retrieval over all synthetic captions, on
    ``n`` fresh images of ``seed``."""
    samples = list(synthetic.generate(n, seed=seed, size=64))
    pixels = np.stack([encoder.resize(s.image) for s in samples])
    img = np.concatenate([encoder.encode_pixels(pixels[i: i + 256]) for i in range(0, n, 256)])
    return zero_shot_captions(encoder, img, [s.caption for s in samples])


def zero_shot_captions(encoder: Any, image_emb: np.ndarray, truth: list[str]) -> dict[str, float]:
    """Image embeddings -> the most similar of all 432 synthetic captions; exact and per-attribute accuracy."""
    classes = synthetic.all_captions()
    top1 = [classes[i] for i in (l2n(image_emb) @ l2n(encode_texts(encoder, classes)).T).argmax(1)]
    out = {"images": float(len(truth)), "classes": float(len(classes)),
           "top1_exact": float(np.mean([p == t for p, t in zip(top1, truth, strict=True)]))}
    out.update(synthetic_attributes(top1, truth))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/tiny-clip", help="work folder (shards, run)")
    ap.add_argument("--steps", type=int, default=600, help="training steps of batch 256")
    ap.add_argument("--out", default=str(RESOURCES), help="where tiny.safetensors / tiny.md go")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.root).resolve()
    shards = root / "shards"
    if not (shards / "00007.tar").exists():
        synthetic.write_webdataset(shards, TRAIN_N, seed=TRAIN_SEED, size=64, shard_size=1024)
    epochs = max(1, math.ceil(args.steps * BATCH / TRAIN_N))
    cfg = ClipTrainJobConfig(
        shards=(str(shards),), output=str(root / "runs"), name=f"tiny-s{args.steps}",
        model=ClipModelSpec(model_name="tiny", from_scratch=True),
        train=ClipTrainConfig(epochs=epochs, batch_size=BATCH, lr=1e-3, weight_decay=0.1,
                              warmup_steps=args.steps // 10, seed=0, augment="none"),
        run=RunOptions(log_every=25, eval_max_samples=512, checkpoint_every=200, eval_every=max(1, epochs // 4)),
        scale=ScaleConfig(num_workers=1, cpus_per_worker=1, torch_threads=2), heldout_fraction=0.05)
    ray.init(num_cpus=2, log_to_driver=True)
    result = run_clip_training(cfg)
    ray.shutdown()
    out = Path(args.out)
    tmp = out / ".tmp-tiny.safetensors"  # open_clip picks its loader by the .safetensors suffix
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(result.weights).items()},
              str(tmp), metadata={"format": "pt"})
    figures = zero_shot_synthetic(load_encoder(EncoderConfig(model_name="tiny", pretrained=str(tmp))))
    tmp.chmod(0o644)
    tmp.replace(out / "tiny.safetensors")
    info = json.loads((Path(result.model_dir) / "clipcap_clip.json").read_text())
    info["weights"] = "tiny.safetensors"
    last_eval = [r for r in result.history if r.get("kind") == "epoch" and "heldout_i2t_r1" in r]
    if last_eval:  # a rerun of a finished run evaluates nothing: take the run's last held-out figures
        info["metrics"] = {k: v for k, v in last_eval[-1].items() if k.startswith("heldout_") or k == "logit_scale"}
    card = model_card(info, {f"Zero-shot on {EVAL_N} unseen synthetic images (seed {EVAL_SEED}), all 432 "
                             "captions as classes, template '{}'": figures})
    (out / "tiny.md").write_text(card + "\nWeights stored as fp16 (the figures above are of the fp16 file). Made by "
                                 "`make tiny-clip` (python -m pipelines.clip.tiny).\n")
    (out / "tiny.eval.json").write_text(json.dumps(figures, indent=2) + "\n")
    shutil.copy(result.run_dir + "/history.json", out / "tiny.history.json")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

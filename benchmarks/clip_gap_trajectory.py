"""How the modality gap of a fixed-temperature CLIP on ``scenes`` moves as it trains, for one cone init.

    python benchmarks/clip_gap_trajectory.py --cone-init 4 --steps 400      # one row of RESULTS.md's gap table

Trains the ``tiny-scenes`` ViT from scratch in this process (no Ray: ``clip_training.train_step``) on the recipe
of ``pipelines/clip/tiny_scenes.py`` (16,384 scenes in hard-negative twins, each pair in one batch, batch 128,
logit scale fixed at 100, cosine schedule over ``--steps``) and prints, every ``--every`` steps, the zero-shot
top-1 among the canonical captions of 300 unseen scenes and the gap figures of their (image, caption) pairs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import open_clip
    import torch

    from clipcap_core import scenes
    from clipcap_core.clip_eval import l2n, modality_gap
    from clipcap_core.clip_training import (
        ClipModelSpec,
        ClipTrainConfig,
        build_clip,
        clip_loss,
        features,
        grouped_order,
        make_optimizer_and_scheduler,
        shape_init,
        train_step,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cone-init", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train", type=int, default=16384, help="training scenes (even: twins)")
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()

    def tokens(texts: list[str]) -> torch.Tensor:
        return open_clip.tokenize(texts, context_length=20)

    train = list(scenes.generate(args.train, seed=1, size=64, split="train", twins=True))
    pixels = torch.from_numpy(np.stack([np.asarray(s.image) for s in train]))
    caps = tokens([scenes.training_caption(s, 1) for s in train])
    test = list(scenes.generate(300, seed=4242, size=64, split="test"))
    test_pixels = torch.from_numpy(np.stack([np.asarray(s.image) for s in test]))
    classes = sorted({s.caption for s in test})
    hp = ClipTrainConfig(epochs=1, batch_size=128, lr=args.lr, weight_decay=0.1, warmup_steps=args.steps // 10,
                         seed=0, augment="none", logit_scale=100.0, cone_init=args.cone_init, group_size=2)
    model = build_clip(ClipModelSpec(model_name="tiny-scenes", from_scratch=True))
    shape_init(model, hp)
    optimizer, scheduler = make_optimizer_and_scheduler(model, hp, args.steps)
    loss_fn = clip_loss(hp)

    def report(step: int) -> None:
        model.eval()
        with torch.no_grad():
            img, txt, _ = features(model, test_pixels, tokens([s.caption for s in test]))
            cls = model.encode_text(tokens(classes), normalize=True)
        pred = (l2n(img.numpy()) @ l2n(cls.numpy()).T).argmax(1)
        top1 = np.mean([classes[i] == s.caption for i, s in zip(pred, test, strict=True)])
        gap = modality_gap(img.numpy(), txt.numpy())
        print(f"| {args.cone_init:g} | {args.steps} | {step} | {100 * top1:.1f}% | {gap['paired_cosine']:.3f} | "
              f"{gap['centroid_distance']:.3f} | {gap['gap_variance_share']:.3f} |  ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    report(0)
    gen, step = torch.Generator().manual_seed(0), 0
    while step < args.steps:
        order = grouped_order(args.train, 2, gen)  # each twin pair in one batch
        for i in range(0, args.train - hp.batch_size + 1, hp.batch_size):
            idx = order[i: i + hp.batch_size]
            train_step(model, pixels[idx], caps[idx], optimizer, scheduler, hp, loss_fn)
            step += 1
            if step % args.every == 0 or step == args.steps:
                report(step)
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()

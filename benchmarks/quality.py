"""Quality figures on held-out synthetic images, with the project's CLIP (``--clip tiny``, the aligned tiny CLIP;
with the seeded random-weight ``tiny-random`` the figures mean nothing):

1. CLIPScore of the true captions vs the same captions shuffled across images (``clipcap_core.metrics``);
2. exact-caption rate of the first of 5 sampled candidates vs the CLIP-reranked best of the same 5
   (``pipelines.caption.stages.score_and_rank``, what ``clipcap caption --rerank clip`` runs).

    python benchmarks/quality.py                          # train a tiny captioner on the CLIP's embeddings first
    python benchmarks/quality.py --model ./runs/demo/model  # or score an existing artifact (same CLIP)

The captioner is the tiny MLP preset trained in-process (a few CPU minutes) on ``--train`` synthetic images
embedded by that CLIP; held-out images are indices past the training range. Results are printed and written to
``benchmarks/results/quality.json``. Timings on a shared CPU are noisy; the figures are not timings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def embed_samples(encoder, samples, batch: int = 128) -> np.ndarray:
    out = []
    for s in range(0, len(samples), batch):
        pixels = np.stack([encoder.resize(x.image) for x in samples[s: s + batch]])
        out.append(encoder.encode_pixels(pixels))
    return np.concatenate(out)


def train_captioner(encoder_cfg, emb: np.ndarray, captions: list[str], epochs: int, seed: int):
    import torch

    from clipcap_core.configs import replace
    from clipcap_core.model import build_model
    from clipcap_core.presets import preset_config
    from clipcap_core.tokenizer import build_word_tokenizer
    from clipcap_core.training import TrainConfig, iterate_batches, train_loop

    tok = build_word_tokenizer(captions)
    torch.manual_seed(seed)
    cfg = replace(preset_config("tiny"), clip_dim=emb.shape[1], encoder=encoder_cfg,
                  mapping={**preset_config("tiny").mapping.__dict__, "normalize_prefix": True})
    model = build_model(cfg, tok)
    tc = TrainConfig(lr=3e-3, warmup_steps=20, batch_size=64, epochs=epochs, max_caption_tokens=16, seed=seed)
    steps = epochs * math.ceil(len(captions) / tc.batch_size)
    train_loop(model, lambda e: iterate_batches(tok, captions, emb, tc, epoch=e), tc, total_steps=steps)
    return model.eval(), tok


def clip_figures(scorer, emb: np.ndarray, captions: list[str], seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(captions))
    while np.any(perm == np.arange(len(perm))):  # a derangement: no image keeps its own caption
        perm = rng.permutation(len(captions))
    true = scorer.score(emb, captions).clip_score
    shuffled = scorer.score(emb, [captions[i] for i in perm]).clip_score
    return {"clip_score_true": float(true.mean()), "clip_score_shuffled": float(shuffled.mean()),
            "true_above_shuffled": float(np.mean(true > shuffled))}


def rerank_figures(model, tok, scorer, emb: np.ndarray, captions: list[str], n: int, temperature: float,
                   seed: int) -> dict[str, float]:
    from clipcap_core.decoding import generate
    from clipcap_core.metrics import exact_matches
    from pipelines.caption.stages import score_and_rank

    gen = generate(model, emb, tok, "sample", n=n, temperature=temperature, max_length=16, seed=seed)
    texts = gen.grouped()
    scores = np.asarray(gen.scores, dtype=np.float32).reshape(len(texts), n).tolist()
    ranked, _, _ = score_and_rank(emb, texts, scores, scorer, rerank=True)
    refs = [[c] for c in captions]
    first = exact_matches([g[0] for g in texts], refs)
    best = exact_matches([g[0] for g in ranked], refs)
    oracle = [max(exact_matches(g, [[c]] * n)) for g, c in zip(texts, captions, strict=True)]
    return {"exact_first_candidate": float(np.mean(first)), "exact_clip_reranked": float(np.mean(best)),
            "exact_any_candidate": float(np.mean(oracle)), "candidates": n, "temperature": temperature}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default="tiny", help="open_clip model name of the CLIP (default: tiny)")
    p.add_argument("--clip-pretrained", default=None)
    p.add_argument("--model", help="an existing model artifact (trained on this CLIP); default: train one")
    p.add_argument("--train", type=int, default=3000, help="synthetic images to train the captioner on")
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from clipcap_core import synthetic
    from clipcap_core.encoders import EncoderConfig, load_encoder
    from clipcap_core.metrics import ClipScorer

    t0 = time.perf_counter()
    enc_cfg = EncoderConfig(model_name=args.clip, pretrained=args.clip_pretrained)
    encoder = load_encoder(enc_cfg)
    scorer = ClipScorer(encoder)
    held = list(synthetic.generate(args.heldout, seed=args.seed, size=64, start=1_000_000))
    held_emb, held_caps = embed_samples(encoder, held), [s.caption for s in held]
    result = {"clip": args.clip, "clip_pretrained": args.clip_pretrained, "heldout": args.heldout,
              **clip_figures(scorer, held_emb, held_caps, args.seed)}
    if args.model:
        from clipcap_core.artifacts import load_model

        loaded = load_model(args.model)
        model, tok = loaded.model.eval(), loaded.tokenizer
    else:
        train = list(synthetic.generate(args.train, seed=args.seed, size=64))
        model, tok = train_captioner(enc_cfg, embed_samples(encoder, train), [s.caption for s in train],
                                     args.epochs, args.seed)
    result.update(rerank_figures(model, tok, scorer, held_emb, held_caps, args.candidates, args.temperature,
                                 args.seed))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = ROOT / "benchmarks" / "results" / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Decoding speed: our batched KV-cache greedy / beam-5 vs Hugging Face ``generate`` vs the authors' algorithm.

Same GPT-2-small-sized weights (random, seeded), same prefixes (MLP mapping, k = 10, D = 512), exactly
``--new-tokens`` new tokens for every method (no stop token: random weights would stop at arbitrary places):
- ours: ``clipcap_core.decoding.generate`` on the whole batch (greedy, beam 5);
- hf-generate: ``lm.generate(inputs_embeds=prefix, num_beams=1|5)`` on the same batch;
- reference: the authors' ``generate2`` / ``generate_beam`` (``clipcap_core.reference``), one image at a time,
  no KV cache; timed on ``--ref-images`` images and reported per caption.

    python benchmarks/decode.py                      # CPU, batch 32, 30 tokens, 2 threads
    python benchmarks/decode.py --device cuda --batch 256

Ends with two lines: ``greedy: <captions/s> captions/s, vs reference <R>x, vs hf-generate <H>x`` and the
same for ``beam5``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def build(device: str, seed: int = 0):
    from transformers import GPT2Config

    from clipcap_core.mapping import MappingConfig
    from clipcap_core.model import LMConfig, ModelConfig, build_model
    from clipcap_core.tokenizer import build_word_tokenizer

    vocab = GPT2Config().vocab_size
    tokenizer = build_word_tokenizer(words=[f"w{i}" for i in range(vocab - 2)])  # GPT-2-sized vocabulary
    cfg = ModelConfig(clip_dim=512, mapping=MappingConfig(kind="mlp", prefix_length=10),
                      lm=LMConfig(name_or_path="gpt2-small-random", config={}, seed=seed))
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer).to(device).eval()
    return model, tokenizer


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def hf_generate(model, prefix: torch.Tensor, new_tokens: int, beams: int) -> torch.Tensor:
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    with torch.inference_mode():
        return model.lm.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=new_tokens,
                                 do_sample=False, num_beams=beams, eos_token_id=None, pad_token_id=0)


def main(argv: list[str] | None = None) -> None:
    from clipcap_core.decoding import generate
    from clipcap_core.reference import generate2, generate_beam

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ref-images", type=int, default=3, help="images decoded by the per-image reference")
    p.add_argument("--repeats", type=int, default=2, help="best of N timings for the batched methods")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = build(args.device)
    embeds = np.random.default_rng(0).normal(size=(args.batch, 512)).astype(np.float32)
    with torch.inference_mode():
        prefix = model.prefix(torch.from_numpy(embeds))  # (B, k, E)
    T, B = args.new_tokens, args.batch
    print(f"device={args.device} threads={args.threads} batch={B} new_tokens={T} "
          f"LM={sum(p.numel() for p in model.lm.parameters()) / 1e6:.0f}M params (GPT-2 small size, random)")
    generate(model, embeds[:2], tok, "beam", max_length=3, stop_at_eos=False)  # warm-up
    hf_generate(model, prefix[:2], 3, 5)
    rows = {}
    for name, beams in (("greedy", 1), ("beam5", 5)):
        strategy = "greedy" if beams == 1 else "beam"
        t_ours, gen = timed(lambda: generate(model, embeds, tok, strategy, beam_size=beams, max_length=T,
                                             stop_at_eos=False), args.repeats)
        t_hf, out = timed(lambda: hf_generate(model, prefix, T, beams), args.repeats)
        n_ref = min(args.ref_images, B)
        if beams == 1:
            ref = lambda: [generate2(model, tok, prefix[i: i + 1], entry_length=T, stop_token=tok.eos_token)
                           for i in range(n_ref)]
        else:
            ref = lambda: [generate_beam(model, tok, prefix[i: i + 1], beam_size=5, entry_length=T,
                                         stop_token=tok.eos_token) for i in range(n_ref)]
        t_ref, _ = timed(ref)
        ours_cps, hf_cps, ref_cps = B / t_ours, B / t_hf, n_ref / t_ref
        lengths = {len(x) for x in gen.token_ids}
        print(f"{name:6s} ours {t_ours:7.2f}s ({ours_cps:6.2f} captions/s, lengths {sorted(lengths)}) | "
              f"hf-generate {t_hf:7.2f}s ({hf_cps:6.2f}/s, {out.shape[1]} tokens) | "
              f"reference {t_ref / n_ref:6.2f}s per image ({ref_cps:6.3f}/s, {n_ref} images)")
        rows[name] = (ours_cps, ours_cps / ref_cps, ours_cps / hf_cps)
    for name, (cps, r, h) in rows.items():
        print(f"{name}: {cps:.2f} captions/s, vs reference {r:.1f}x, vs hf-generate {h:.2f}x")


if __name__ == "__main__":
    main()

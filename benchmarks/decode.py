"""Decoding speed: our batched KV-cache greedy / beam-5 vs Hugging Face ``generate`` vs the authors' algorithm.

Same GPT-2-small-sized weights (random, seeded), same prefixes (MLP mapping, k = 10, D = 512), exactly
``--new-tokens`` new tokens for every method (no stop token: random weights would stop at arbitrary places):
- ours: ``clipcap_core.decoding.generate`` on the whole batch (greedy, beam 5);
- hf-generate: ``lm.generate(inputs_embeds=prefix, num_beams=1|5)`` on the same batch;
- reference: the authors' ``generate2`` / ``generate_beam`` (``benchmarks/authors_clipcap.py``), one image at a time,
  no KV cache; timed on ``--ref-images`` images and reported per caption.
All three start from the CLIP embeddings (the mapping network is timed too). Ours and HF run in adjacent pairs
(``--repeats``, order alternating) and the HF ratio is the median per-pair ratio, which cancels most of the
load of a shared machine; CPU seconds are printed too.

    python benchmarks/decode.py                      # CPU, batch 32, 30 tokens, 2 threads
    python benchmarks/decode.py --device cuda --batch 256

Ends with two lines: ``greedy: <captions/s> captions/s, vs reference <R>x, vs hf-generate <H>x`` and the
same for ``beam5``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build(device: str, seed: int = 0):
    from transformers import GPT2Config

    from clipcap_core.model import LMConfig, MappingConfig, ModelConfig, build_model
    from clipcap_core.tokenizer import build_word_tokenizer

    vocab = GPT2Config().vocab_size
    tokenizer = build_word_tokenizer(words=[f"w{i}" for i in range(vocab - 2)])  # GPT-2-sized vocabulary
    cfg = ModelConfig(clip_dim=512, mapping=MappingConfig(kind="mlp", prefix_length=10),
                      lm=LMConfig(name_or_path="gpt2-small-random", config={}, seed=seed))
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer).to(device).eval()
    return model, tokenizer


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, out


def hf_generate(model, embeds: np.ndarray, new_tokens: int, beams: int) -> torch.Tensor:
    """HF ``generate`` from CLIP embeddings (the mapping runs here too, like in ours)."""
    with torch.inference_mode():
        prefix = model.prefix(torch.from_numpy(embeds))  # (B, k, E)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        return model.lm.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=new_tokens,
                                 do_sample=False, num_beams=beams, eos_token_id=None, pad_token_id=0)


def reference(model, tok, embeds: np.ndarray, new_tokens: int, beams: int) -> list[str]:
    """The authors' loop: per image, map the embedding, then generate2 / generate_beam without a KV cache."""
    from benchmarks.authors_clipcap import generate2, generate_beam

    out = []
    for e in embeds:
        with torch.inference_mode():
            prefix = model.prefix(torch.from_numpy(e[None]))  # (1, k, E)
        if beams == 1:
            out.append(generate2(model, tok, prefix, entry_length=new_tokens, stop_token=tok.eos_token))
        else:
            out.append(generate_beam(model, tok, prefix, beam_size=beams, entry_length=new_tokens,
                                     stop_token=tok.eos_token)[0])
    return out


def compare(model, tok, embeds: np.ndarray, beams: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """Captions/s of ours, and its ratios to the reference and to HF generate.

    Ours and HF run in adjacent pairs (order alternating), so both see the same machine load; the HF ratio is
    the median of the per-pair ratios, captions/s the median of our runs."""
    from clipcap_core.decoding import generate

    strategy, T, B = ("greedy" if beams == 1 else "beam"), args.new_tokens, embeds.shape[0]

    def ours() -> object:
        return generate(model, embeds, tok, strategy, beam_size=beams, max_length=T, stop_at_eos=False)

    def hf() -> object:
        return hf_generate(model, embeds, T, beams)

    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "hf": []}
    for r in range(args.repeats):
        for name, fn in (("ours", ours), ("hf", hf)) if r % 2 == 0 else (("hf", hf), ("ours", ours)):
            wall, cpu, result = timed(fn)
            runs[name].append((wall, cpu))
            if name == "ours":
                gen = result
            else:
                out = result
    n_ref = min(args.ref_images, B)
    ref_wall, ref_cpu, _ = timed(lambda: reference(model, tok, embeds[:n_ref], T, beams))
    ours_w, ours_c = (float(np.median([x[i] for x in runs["ours"]])) for i in (0, 1))
    hf_w, hf_c = (float(np.median([x[i] for x in runs["hf"]])) for i in (0, 1))
    paired = float(np.median([h[0] / o[0] for o, h in zip(runs["ours"], runs["hf"], strict=True)]))
    lengths = sorted({len(x) for x in gen.token_ids})
    print(f"{strategy:6s} ours {ours_w:7.2f}s wall / {ours_c:7.2f}s CPU ({B / ours_w:6.2f} captions/s; lengths "
          f"{lengths}) | hf-generate {hf_w:7.2f}s / {hf_c:7.2f}s CPU ({B / hf_w:6.2f}/s; {out.shape[1]} tokens) | "
          f"reference {ref_wall / n_ref:6.2f}s wall / {ref_cpu / n_ref:6.2f}s CPU per image ({n_ref} images)")
    print(f"       per-pair wall ratios hf/ours: {[round(h[0] / o[0], 2) for o, h in zip(runs['ours'], runs['hf'], strict=True)]}; "
          f"CPU-time ratios: vs reference {(ref_cpu / n_ref) / (ours_c / B):.1f}x, vs hf-generate {hf_c / ours_c:.2f}x")
    return B / ours_w, (B / ours_w) / (n_ref / ref_wall), paired


def parser() -> argparse.ArgumentParser:
    """This benchmark's flags (``tests/test_benchmarks.py`` checks ``gpu_check.sh``'s lines against it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ref-images", type=int, default=3, help="images decoded by the per-image reference")
    p.add_argument("--repeats", type=int, default=3, help="ours / hf-generate pairs (medians are reported)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = build(args.device)
    embeds = np.random.default_rng(0).normal(size=(args.batch, 512)).astype(np.float32)
    print(f"device={args.device} threads={args.threads} batch={args.batch} new_tokens={args.new_tokens} "
          f"LM={sum(p.numel() for p in model.lm.parameters()) / 1e6:.0f}M params (GPT-2 small size, random), "
          f"MLP mapping k=10 D=512; medians of {args.repeats} ours / hf-generate pairs")
    from clipcap_core.decoding import generate

    generate(model, embeds[:2], tok, "beam", max_length=3, stop_at_eos=False)  # warm-up
    hf_generate(model, embeds[:2], 3, 5)
    rows = {name: compare(model, tok, embeds, beams, args) for name, beams in (("greedy", 1), ("beam5", 5))}
    for name, (cps, r, h) in rows.items():
        print(f"{name}: {cps:.2f} captions/s, vs reference {r:.1f}x, vs hf-generate {h:.2f}x")


if __name__ == "__main__":
    main()

"""Batched caption decoding over the LM's KV cache: greedy, beam, the authors' beam ("reference-beam"), sampling.
The prefix runs once per image, its cache shared by beams / samples; finished rows leave the batch. The stop
token stays in the caption, end-of-text does not; scores are the mean token log-prob. GPT-2 decodes over a
preallocated KV cache written in place (HF's ``DynamicCache`` copies the whole cache every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from clipcap_core.configs import from_dict

Strategy = Literal["greedy", "beam", "reference-beam", "sample"]


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How captions are decoded. ``CLI_FLAGS``: the fields that are not ``clipcap caption`` flags."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"length_penalty": None, "stop_at_eos": None, "use_cache": None,
                                                  "static_cache": None, "batch_size": None}
    strategy: Strategy = "greedy"  # decoding strategy
    max_length: int = 30  # new tokens at most
    beam_size: int = 5  # beams per image (beam / reference-beam)
    length_penalty: float = 1.0  # beam: rank finished captions by sum log-prob / length ** length_penalty
    temperature: float = 1.0  # sampling temperature (sample, reference-beam)
    top_k: int = 0  # sample among the k likeliest tokens (sample; 0: all)
    top_p: float = 1.0  # nucleus sampling mass (sample)
    n: int = 1  # captions per image (beam: the n best beams; sample: n samples)
    stop_token: str | None = None  # also stop at this token, e.g. "." (the authors' models stop there)
    stop_at_eos: bool = True
    seed: int = 0  # sampling seed (sample)
    use_cache: bool = True  # False: re-run the whole sequence every step (tests, baselines)
    static_cache: bool = True  # GPT-2 family: preallocated KV buffers (StaticCacheGPT2); False: HF DynamicCache
    batch_size: int | None = None  # inputs per decoding batch (None: all at once)

    def __post_init__(self) -> None:
        if self.max_length < 1 or self.beam_size < 1 or self.n < 1:
            raise ValueError("max_length, beam_size and n must be >= 1")
        if self.strategy == "greedy" and self.n > 1:
            raise ValueError("greedy decoding gives one caption per input: use n=1, or beam / sample")
        if self.strategy in ("beam", "reference-beam") and self.n > self.beam_size:
            raise ValueError(f"n={self.n} captions need beam_size >= n (got {self.beam_size})")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature > 0, 0 < top_p <= 1, top_k >= 0")


@dataclass
class Generation:
    texts: list[str]  # N * n captions
    token_ids: list[list[int]]  # generated ids: a stop token like '.' kept, a final end-of-text not
    scores: np.ndarray  # (N * n,) float32 mean token log-prob
    n: int = 1

    def grouped(self) -> list[list[str]]:
        return [self.texts[i: i + self.n] for i in range(0, len(self.texts), self.n)]


class CachedLM:
    """One decoding step at a time over a KV cache; rows can be selected / repeated between steps."""

    def __init__(self, lm: torch.nn.Module):
        self.body, self.head, self.wte = lm.base_model, lm.get_output_embeddings(), lm.get_input_embeddings()
        self.cache: Any = None

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:  # (B, k, E) -> logits (B, V)
        out = self.body(inputs_embeds=prefix, use_cache=True)
        self.cache = out.past_key_values
        return self.head(out.last_hidden_state[:, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:  # (B,) -> logits (B, V)
        out = self.body(inputs_embeds=self.wte(tokens)[:, None], past_key_values=self.cache, use_cache=True)
        return self.head(out.last_hidden_state[:, -1])

    def select(self, rows: torch.Tensor) -> None:  # keep / reorder rows (beam parents, finished rows dropped)
        self.cache.reorder_cache(rows)

    def repeat(self, n: int) -> None:
        if n > 1:
            self.cache.batch_repeat_interleave(n)


class UncachedLM(CachedLM):
    """Same interface without a KV cache: every step re-runs the whole sequence (authors' style)."""

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        self.embeds = prefix
        return self.head(self.body(inputs_embeds=prefix, use_cache=False).last_hidden_state[:, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.embeds = torch.cat((self.embeds, self.wte(tokens)[:, None]), dim=1)
        return self.head(self.body(inputs_embeds=self.embeds, use_cache=False).last_hidden_state[:, -1])

    def select(self, rows: torch.Tensor) -> None:
        self.embeds = self.embeds.index_select(0, rows)

    def repeat(self, n: int) -> None:
        self.embeds = self.embeds.repeat_interleave(n, dim=0)


class StaticCacheGPT2:
    """prefill / step / select / repeat. Rows are grouped: ``group`` consecutive rows share one image."""

    def __init__(self, lm: torch.nn.Module, max_new_tokens: int):
        self.body = lm.base_model
        self.blocks, self.wte, self.wpe, self.ln_f = self.body.h, self.body.wte, self.body.wpe, self.body.ln_f
        self.head = lm.get_output_embeddings()
        self.heads = lm.config.n_head
        self.max_new = max_new_tokens
        self.pk: list[torch.Tensor] = []  # per layer (b, H, k, Dh): prefix keys of each image
        self.pv: list[torch.Tensor] = []
        self.gk: list[torch.Tensor] = []  # per layer (R, H, off + max_new, Dh): keys of each row
        self.gv: list[torch.Tensor] = []
        self.spare: list[torch.Tensor] = []  # second set of row buffers for reordering
        self.group = 1
        self.rows = self.t = 0
        self.off = 0  # k when each row holds its own prefix copy (one row per image), else 0

    @staticmethod
    def supports(lm: torch.nn.Module) -> bool:
        cfg = lm.config
        return (getattr(cfg, "model_type", None) == "gpt2" and not cfg.add_cross_attention
                and not cfg.reorder_and_upcast_attn and not lm.training)

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:  # (B, k, E) -> logits (B, V)
        out = self.body(inputs_embeds=prefix, use_cache=True)
        self.pk = [layer.keys for layer in out.past_key_values.layers]  # (B, H, k, Dh)
        self.pv = [layer.values for layer in out.past_key_values.layers]
        self.gk, self.gv, self.spare = [], [], []
        self.group, self.rows, self.t = 1, prefix.shape[0], 0
        return self.head(out.last_hidden_state[:, -1])

    def repeat(self, n: int) -> None:
        self.group *= n
        self.rows *= n

    def _alloc(self) -> None:
        """Row buffers: with one row per image they hold the prefix too (one SDPA call), else it is shared."""
        k = self.pk[0]
        self.off = k.shape[2] if self.group == 1 else 0
        shape = (self.rows, k.shape[1], self.off + self.max_new, k.shape[3])
        self.gk = [k.new_empty(shape) for _ in self.pk]
        self.gv = [k.new_empty(shape) for _ in self.pk]
        if self.off:
            for buf, pre in zip(self.gk + self.gv, self.pk + self.pv, strict=True):
                buf[:, :, : self.off] = pre

    def step(self, tokens: torch.Tensor) -> torch.Tensor:  # (R,) -> logits (R, V)
        if not self.gk:
            self._alloc()
        R, t, g, off = tokens.shape[0], self.t, self.group, self.off
        pos = self.pk[0].shape[2] + t  # position of the new token
        x = (self.wte(tokens) + self.wpe(torch.full((1,), pos, dtype=torch.long, device=tokens.device)))[:, None]
        E = x.shape[-1]
        H, Dh = self.heads, E // self.heads
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.attn.c_attn(blk.ln_1(x)).split(E, dim=2)  # 3 x (R, 1, E)
            self.gk[i][:R, :, off + t] = k.view(R, H, Dh)
            self.gv[i][:R, :, off + t] = v.view(R, H, Dh)
            if off:
                att = F.scaled_dot_product_attention(q.view(R, H, 1, Dh), self.gk[i][:R, :, : off + t + 1],
                                                     self.gv[i][:R, :, : off + t + 1], scale=blk.attn.scaling)
            else:
                att = self._attend_shared(q.view(R, H, Dh), i, R, g, blk.attn.scaling)  # (R, H, Dh)
            x = x + blk.attn.c_proj(att.reshape(R, 1, E))
            x = x + blk.mlp(blk.ln_2(x))
        self.t = t + 1
        return self.head(self.ln_f(x[:, 0]))

    def _attend_shared(self, q: torch.Tensor, i: int, R: int, g: int, scale: float) -> torch.Tensor:
        """One query per row over [its image's prefix, its own generated tokens]; q (R, H, Dh)."""
        b, H, Dh = R // g, q.shape[1], q.shape[2]
        pk, pv = self.pk[i], self.pv[i]  # (b, H, k, Dh)
        gk, gv = self.gk[i][:R, :, : self.t + 1], self.gv[i][:R, :, : self.t + 1]  # (R, H, t+1, Dh)
        qb = q.view(b, g, H, Dh).transpose(1, 2)  # (b, H, g, Dh): the rows of an image share its prefix
        s_pre = qb @ pk.transpose(-1, -2)  # (b, H, g, k)
        s_gen = (q.unsqueeze(2) @ gk.transpose(-1, -2)).view(b, g, H, -1).transpose(1, 2)  # (b, H, g, t+1)
        p = (torch.cat((s_pre, s_gen), dim=-1) * scale).softmax(dim=-1)  # (b, H, g, k+t+1)
        k = pk.shape[2]
        out = (p[..., :k] @ pv).transpose(1, 2).reshape(R, H, Dh)
        p_gen = p[..., k:].transpose(1, 2).reshape(R, H, 1, -1)  # (R, H, 1, t+1)
        return out + (p_gen @ gv).view(R, H, Dh)

    def select(self, rows: torch.Tensor) -> None:
        """Keep / reorder rows (``rows``: old row of each new row)."""
        g, n = self.group, rows.numel()
        blocks = rows.view(-1, g) // g if n % g == 0 else None
        if self.gk and self.off:
            pass  # each row holds its own prefix copy: the row gather below covers it
        elif blocks is not None and bool((blocks == blocks[:, :1]).all()):  # whole images stay grouped
            images = blocks[:, 0]
            if images.numel() != self.pk[0].shape[0] or not bool(
                    (images == torch.arange(images.numel(), device=images.device)).all()):
                self.pk = [x.index_select(0, images) for x in self.pk]
                self.pv = [x.index_select(0, images) for x in self.pv]
        else:  # rows of an image part ways (sampling): one prefix copy per row from now on
            self.pk = [x.index_select(0, rows // g) for x in self.pk]
            self.pv = [x.index_select(0, rows // g) for x in self.pv]
            self.group = 1
        filled = self.off + self.t
        if self.gk and filled:
            if not self.spare:
                self.spare = [torch.empty_like(x) for x in self.gk + self.gv]
            bufs = self.gk + self.gv
            for src, dst in zip(bufs, self.spare, strict=True):
                torch.index_select(src[: self.rows, :, :filled], 0, rows, out=dst[:n, :, :filled])
            half = len(self.gk)
            self.gk, self.gv, self.spare = self.spare[:half], self.spare[half:], bufs
        self.rows = n


def _stepper(lm: torch.nn.Module, cfg: DecodeConfig) -> CachedLM:
    if not cfg.use_cache:
        return UncachedLM(lm)
    if cfg.static_cache and StaticCacheGPT2.supports(lm):
        return StaticCacheGPT2(lm, cfg.max_length)  # type: ignore[return-value]
    return CachedLM(lm)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stop_token: str | None, stop_at_eos: bool) -> list[int]:
    ids = [tokenizer.eos_token_id] if stop_at_eos else []
    if stop_token is not None:
        encoded = tokenizer.encode(stop_token, add_special_tokens=False)
        if not encoded:
            raise ValueError(f"stop_token {stop_token!r} encodes to no token")
        ids.append(encoded[0])
    return ids


# A strategy: (lm, prefix (B, k, E), cfg, stop ids (S,)) -> (tokens (B*n, T) long, lengths (B*n,), scores (B*n,))
def _greedy(lm: CachedLM, prefix: torch.Tensor, cfg: DecodeConfig, stop: torch.Tensor):
    return _sequential(lm, prefix, cfg, stop, pick=lambda logits, t: logits.max(-1).indices)  # max: faster than argmax


def _sample(lm: CachedLM, prefix: torch.Tensor, cfg: DecodeConfig, stop: torch.Tensor):
    gen = torch.Generator(device=prefix.device).manual_seed(cfg.seed)

    def pick(logits: torch.Tensor, t: int) -> torch.Tensor:
        logits = logits / cfg.temperature
        if cfg.top_k:
            kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = (cum - sorted_logits.softmax(-1)) >= cfg.top_p  # mass before this token already >= top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)

    return _sequential(lm, prefix, cfg, stop, pick=pick, repeat=cfg.n)


def _sequential(lm: CachedLM, prefix: torch.Tensor, cfg: DecodeConfig, stop: torch.Tensor, pick, repeat: int = 1):
    """One token per row per step (greedy, sampling); finished rows leave the batch."""
    logits = lm.prefill(prefix).float()  # (B, V)
    if repeat > 1:
        lm.repeat(repeat)
        logits = logits.repeat_interleave(repeat, dim=0)
    rows_total, dev = logits.shape[0], logits.device
    tokens = torch.zeros(rows_total, cfg.max_length, dtype=torch.long, device=dev)
    lengths = torch.zeros(rows_total, dtype=torch.long, device=dev)
    sums = torch.zeros(rows_total, dtype=torch.float32, device=dev)
    rows = torch.arange(rows_total, device=dev)  # original row of each active row
    for t in range(cfg.max_length):
        nxt = pick(logits, t)  # (R,)
        logp = logits.gather(1, nxt[:, None]).squeeze(1) - logits.logsumexp(-1)  # log-prob of the chosen token
        tokens[rows, t] = nxt
        sums[rows] += logp
        lengths[rows] += 1
        live = ~torch.isin(nxt, stop)
        if t == cfg.max_length - 1 or not live.any():
            break
        if not live.all():  # drop finished rows from the cache and the batch
            keep = live.nonzero().squeeze(1)
            lm.select(keep)
            rows, nxt = rows[keep], nxt[keep]
        logits = lm.step(nxt).float()
    return tokens, lengths, sums


def _beam(lm: CachedLM, prefix: torch.Tensor, cfg: DecodeConfig, stop: torch.Tensor):
    """Beam search as HF ``generate(num_beams=K)``: K running beams per image, a pool of the K best finished
    captions ranked by sum log-prob / length ** length_penalty; an image ends when no beam beats its pool."""
    K, T, lp = cfg.beam_size, cfg.max_length, cfg.length_penalty
    logits = lm.prefill(prefix).float()  # (B, V)
    B, V = logits.shape
    dev = logits.device
    C = max(2, 1 + stop.numel()) * K  # candidates per image: always >= K that did not stop
    lm.repeat(K)
    logits = logits.repeat_interleave(K, dim=0)  # (B*K, V)
    run_sum = torch.zeros(B, K, device=dev)
    run_sum[:, 1:] = -1e9  # step 0: all beams are the same, expand from beam 0 only
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=dev)
    pool = _Pool(B, K, T, dev)
    active = torch.arange(B, device=dev)  # original image of each active image
    rank = torch.arange(C, device=dev)
    for t in range(T):
        b = active.shape[0]
        # The best C of an image's K*V continuations are among each beam's own best C: rank those only
        # (no (b*K, V) log-softmax or sum tensor is ever written).
        row_top, row_tok = logits.topk(min(C, V), dim=-1)  # (b*K, c)
        cand = run_sum.view(-1, 1) + (row_top - logits.logsumexp(-1, keepdim=True))  # (b*K, c)
        top_sum, top_idx = cand.view(b, -1).topk(C, dim=1)  # (b, C)
        top_idx = (top_idx // row_top.shape[1]) * V + row_tok.view(b, -1).gather(1, top_idx)  # into K*V
        parent, tok = top_idx // V, top_idx % V
        flat_parent = torch.arange(b, device=dev)[:, None] * K + parent  # (b, C) rows of seqs
        cand_seqs = torch.cat((seqs[flat_parent], tok[..., None]), dim=2)  # (b, C, t+1)
        is_stop = torch.isin(tok, stop) | (t == T - 1)  # at max length every candidate ends
        finished = is_stop & (rank < K)  # only candidates that would have made the beam may finish
        if finished.any():
            pool.add(active, cand_seqs, top_sum, finished, t + 1, lp)
        if t == T - 1:
            break
        sel = (is_stop.long() * C + rank).argsort(dim=1)[:, :K]  # the K best candidates that did not stop
        run_sum = top_sum.gather(1, sel)
        seqs = cand_seqs.gather(1, sel[..., None].expand(-1, -1, t + 1)).view(b * K, t + 1)
        rows = flat_parent.gather(1, sel).view(-1)
        done = pool.done(active, run_sum[:, 0], t + 1, lp)  # (b,)
        if done.all():
            break
        if done.any():  # finished images leave the batch
            keep = (~done).nonzero().squeeze(1)
            rows_k = (keep[:, None] * K + torch.arange(K, device=dev)).view(-1)
            active, run_sum, seqs, rows = active[keep], run_sum[keep], seqs[rows_k], rows[rows_k]
        lm.select(rows)
        logits = lm.step(seqs[:, -1]).float()
    return pool.best(cfg.n)


class _Pool:
    """The K best finished captions per image."""

    def __init__(self, B: int, K: int, T: int, dev: torch.device):
        self.K, self.T = K, T
        self.score = torch.full((B, K), float("-inf"), device=dev)
        self.sum = torch.zeros(B, K, device=dev)
        self.len = torch.ones(B, K, dtype=torch.long, device=dev)
        self.seqs = torch.zeros(B, K, T, dtype=torch.long, device=dev)

    def add(self, images, seqs, sums, valid, length: int, lp: float) -> None:
        """Merge candidates seqs (b, C, length) with sums (b, C) where ``valid`` into the pools of ``images``."""
        score = torch.where(valid, sums / length ** lp, float("-inf"))
        padded = torch.nn.functional.pad(seqs, (0, self.T - length))
        all_score = torch.cat((self.score[images], score), dim=1)  # (b, K + C)
        best = all_score.topk(self.K, dim=1).indices  # (b, K)
        lens = torch.full_like(score, length, dtype=torch.long)
        self.score[images] = all_score.gather(1, best)
        self.sum[images] = torch.cat((self.sum[images], sums), 1).gather(1, best)
        self.len[images] = torch.cat((self.len[images], lens), 1).gather(1, best)
        self.seqs[images] = torch.cat((self.seqs[images], padded), 1).gather(
            1, best[..., None].expand(-1, -1, self.T))

    def done(self, images, best_sum, length: int, lp: float) -> torch.Tensor:
        """True where the pool is full and the best running beam (at the current length) cannot beat it."""
        worst = self.score[images][:, -1]
        return torch.isfinite(worst) & (best_sum / length ** lp <= worst)

    def best(self, n: int):
        order = self.score.argsort(dim=1, descending=True)[:, :n]  # (B, n)
        tokens = self.seqs.gather(1, order[..., None].expand(-1, -1, self.T)).flatten(0, 1)
        return tokens, self.len.gather(1, order).flatten(), self.sum.gather(1, order).flatten()


def _reference_beam(lm: CachedLM, prefix: torch.Tensor, cfg: DecodeConfig, stop: torch.Tensor):
    """The authors' ``generate_beam`` batched over images (length-averaged ranking, stopped beams carried)."""
    K = cfg.beam_size
    logp = (lm.prefill(prefix).float() / cfg.temperature).softmax(-1).log()  # (B, V) as the authors compute it
    B, V = logp.shape
    dev = logp.device
    scores, tok = logp.topk(K, dim=-1)  # (B, K)
    seqs = tok.reshape(B * K, 1)
    lengths = torch.ones(B * K, device=dev)
    stopped = torch.isin(seqs[:, 0], stop)
    out_tokens = torch.zeros(B * K, cfg.max_length, dtype=torch.long, device=dev)
    out_len, out_score = torch.ones(B * K, device=dev), torch.zeros(B * K, device=dev)
    active = torch.arange(B, device=dev)
    lm.repeat(K)
    beam = torch.arange(K, device=dev)
    for t in range(1, cfg.max_length + 1):
        done = stopped.view(-1, K).all(dim=1)  # (b,)
        if done.any() or t == cfg.max_length:  # images leave with their state frozen, as in the authors' loop
            fin = done if t < cfg.max_length else torch.ones_like(done)
            rows = (fin.nonzero()[:, :1] * K + beam).view(-1)
            dest = (active[fin][:, None] * K + beam).view(-1)
            out_tokens[dest, : seqs.shape[1]] = seqs[rows]
            out_len[dest], out_score[dest] = lengths[rows], scores.view(-1)[rows]
            if fin.all():
                break
            keep = (~fin).nonzero().squeeze(1)
            rows_k = (keep[:, None] * K + beam).view(-1)
            active, scores = active[keep], scores[keep]
            seqs, lengths, stopped = seqs[rows_k], lengths[rows_k], stopped[rows_k]
            lm.select(rows_k)
        b = active.shape[0]
        logp = (lm.step(seqs[:, -1]).float() / cfg.temperature).softmax(-1).log()  # (b*K, V)
        logp[stopped] = float("-inf")
        logp[stopped, 0] = 0.0
        scores_sum = scores.view(-1, 1) + logp
        lengths[~stopped] += 1
        avg, idx = (scores_sum / lengths[:, None]).view(b, K * V).topk(K, dim=1)
        src = (torch.arange(b, device=dev)[:, None] * K + idx // V).view(-1)
        nxt = (idx % V).view(-1)
        lengths, stopped = lengths[src], stopped[src] | torch.isin(nxt, stop)
        seqs = torch.cat((seqs[src], nxt[:, None]), dim=1)
        scores = avg * lengths.view(b, K)
        lm.select(src)
    avg_score = out_score / out_len
    order = avg_score.view(B, K).argsort(dim=1, descending=True)[:, : cfg.n]
    rows = (torch.arange(B, device=dev)[:, None] * K + order).view(-1)
    return out_tokens[rows], out_len[rows].long(), avg_score[rows] * out_len[rows]


_STRATEGY_FNS = {"greedy": _greedy, "beam": _beam, "reference-beam": _reference_beam, "sample": _sample}


def decode_config(strategy: str = "greedy", **options: Any) -> DecodeConfig:
    """A validated DecodeConfig (unknown options fail with the list of known ones)."""
    return from_dict(DecodeConfig, {"strategy": strategy, **options})


@torch.inference_mode()
def generate(model: torch.nn.Module, clip_embeds: np.ndarray | torch.Tensor, tokenizer: PreTrainedTokenizerBase,
             strategy: str = "greedy", *, config: DecodeConfig | None = None, **options: Any) -> Generation:
    """Caption CLIP embeddings (N, D): ``strategy`` and ``options`` are DecodeConfig fields (or pass ``config``)."""
    cfg = config or decode_config(strategy, **options)
    embeds = torch.as_tensor(np.asarray(clip_embeds) if not torch.is_tensor(clip_embeds) else clip_embeds)
    if embeds.ndim != 2:
        raise ValueError(f"expected embeddings of shape (N, D), got {tuple(embeds.shape)}")
    stop = torch.tensor(stop_token_ids(tokenizer, cfg.stop_token, cfg.stop_at_eos), device=model.device)
    step = cfg.batch_size or max(1, embeds.shape[0])
    was_training = model.training
    model.eval()
    texts, ids, scores = [], [], []
    try:
        for start in range(0, embeds.shape[0], step):
            lm = _stepper(model.lm, cfg)
            prefix = model.prefix(embeds[start: start + step].float())  # (b, k, E)
            tokens, lengths, sums = _STRATEGY_FNS[cfg.strategy](lm, prefix, cfg, stop)
            for row, length in zip(tokens.tolist(), lengths.tolist(), strict=True):
                row = row[: int(length)]
                ids.append(row[:-1] if cfg.stop_at_eos and row and row[-1] == tokenizer.eos_token_id else row)
            scores.append((sums / lengths.clamp_min(1).to(sums.dtype)).float().cpu().numpy())
    finally:
        model.train(was_training)
    texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return Generation(texts=texts, token_ids=ids, scores=np.concatenate(scores) if scores else np.zeros(0, np.float32),
                      n=cfg.n)

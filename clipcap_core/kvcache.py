"""GPT-2 decoding steps over a preallocated ("static") KV cache with a shared prefix, for ``decoding.py``.

HF's ``DynamicCache`` copies the whole cache every step and again to reorder beams; here the prefix K/V are kept
once per image and a step writes one position in place. Tests check the tokens against HF's cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(lm: torch.nn.Module) -> bool:
    cfg = lm.config
    return (getattr(cfg, "model_type", None) == "gpt2" and not cfg.add_cross_attention
            and not cfg.reorder_and_upcast_attn and not lm.training)


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
        """Row buffers. One row per image (greedy): the prefix goes in too and attention is one SDPA call;
        several rows per image (beams, samples): prefix kept apart, shared (``_attend_shared``)."""
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

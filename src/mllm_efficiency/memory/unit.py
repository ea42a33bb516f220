"""The memory of one layer for one sequence and the attention over it (docs/long_context_memory.md).

`MemoryUnit.process(q, k, v)` takes one call's raw (unrotated) queries and keys and its values, batch 1:
q (H, L, D), k and v (Hkv, L, D); it returns the attention output (H, L, D). Per execution block of
`exc_block_size` queries it runs one softmax over
  LOCAL:  the last `n_local` tokens before each query (inclusive), keys rotated at 0..n-1, exact distances;
  GLOBAL: sinks + `topk` retrieved blocks + remainder tokens outside the query's window, keys unrotated and
          queries rotated at `n_local - 1` (InfLLM / Q-LLM / LM-Infinite) or sinks rotated at 0..n_init-1 and
          queries at `n_local + n_init - 1` (StreamingLLM: the sinks sit just before the window),
then updates the bookkeeping: local attention mass per remainder token, sinks, blocks and representatives.
"""
from __future__ import annotations

import logging
import torch

from .blocks import BlockCache, BlockStore, Growable

log = logging.getLogger("mllm_efficiency.memory")


def _empty(heads: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((heads, 0, dim))


class MemoryUnit:
    def __init__(self, cfg, rope, num_heads: int, num_kv_heads: int, head_dim: int, device, dtype,
                 question_span: tuple[int, int] | None = None, question_vector: torch.Tensor | None = None):
        self.cfg, self.rope = cfg, rope
        self.H, self.Hkv, self.D = num_heads, num_kv_heads, head_dim
        self.G = num_heads // num_kv_heads
        self.device, self.dtype = torch.device(device), dtype
        z = torch.empty(0, device=device, dtype=dtype)
        self.init_k = self.init_v = _empty(self.Hkv, self.D, z)
        self.local_k = self.local_v = _empty(self.Hkv, self.D, z)
        self.rem_k = self.rem_v = _empty(self.Hkv, self.D, z)
        self.rem_score = torch.zeros(self.H, 0, device=device)
        self.rem_pos0 = 0  # absolute position of rem[0]
        self.seen = 0  # tokens processed (absolute position of the next token)
        self.blocks_enabled = cfg.kind == "blocks"
        store_device = device if cfg.offload == "gpu" else "cpu"
        self.store = BlockStore((self.Hkv, cfg.block_size, self.D), dtype, store_device, cfg.pin_memory)
        self.cache = BlockCache(cfg.max_cached_block, cfg.cache_strategy, cfg.score_decay)
        self.reps = Growable((self.H * self.D,), torch.float32, device)
        self.qscore = Growable((), torch.float32, device)  # question . rep per block (cached, constant)
        self.question = question_vector  # (H * D) fp32 or None
        self.question_span = question_span  # absolute token range [s, e) of the question in the prompt
        self.question_source = "probe" if question_vector is not None else None
        self._call_gq: torch.Tensor | None = None
        self._call_start = 0
        self._topk_plan: list[list[int]] = []
        self.retrievals = 0
        self.blocks_chosen = 0

    # ------------------------------------------------------------------ one call
    @torch.no_grad()
    def process(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        cfg = self.cfg
        L = q.shape[1]
        self._call_start = self.seen
        lk, lv = torch.cat((self.local_k, k), 1), torch.cat((self.local_v, v), 1)
        n_prev = self.local_k.shape[1]
        self.rem_k, self.rem_v = torch.cat((self.rem_k, k), 1), torch.cat((self.rem_v, v), 1)
        self.rem_score = torch.cat((self.rem_score, self.rem_score.new_zeros(self.H, L)), 1)
        q_pos = cfg.n_local + cfg.n_init - 1 if cfg.kind == "stream" else cfg.n_local - 1
        gq = self.rope.rotate_at(q, q_pos)
        self._call_gq = gq
        out = q.new_empty(q.shape)
        exc = cfg.exc_block_size
        for st in range(0, L, exc):
            ed = min(st + exc, L)
            if cfg.chunk_topk_calc and st % cfg.chunk_topk_calc == 0:
                self._plan_topk(gq[:, st:min(st + cfg.chunk_topk_calc, L)])
            out[:, st:ed] = self._exec_block(q[:, st:ed], gq[:, st:ed], lk, lv, n_prev + st, n_prev + ed, scaling)
            self._bookkeeping(ed - st)
        self._topk_plan = []
        self.store.flush()  # blocks formed during the call go to their store in one copy
        if self.question is None and self.question_span is not None and self.blocks_enabled:
            self._maybe_build_question(end_of_call=True)
        keep = min(cfg.n_local, lk.shape[1])
        self.local_k, self.local_v = lk[:, lk.shape[1] - keep:], lv[:, lv.shape[1] - keep:]
        # unprocessed tail never exists after a call; drop the physical remainder beyond the processed count
        self._call_gq = None
        return out

    # ------------------------------------------------------------------ one execution block
    def _exec_block(self, q, gq, lk, lv, a, b, scaling):
        """Queries q/gq (H, e, D) are local-cache rows a..b-1 of lk/lv."""
        cfg = self.cfg
        e = b - a
        kv_st = max(a - cfg.n_local + 1, 0)
        n_k = b - kv_st
        keys = self.rope.rotate(lk[:, kv_st:b], 0)
        qs = self.rope.rotate(q, n_k - e)
        q_abs0 = self.seen  # absolute position of the block's first query
        # local logits, mask 0 <= i - j < n_local
        ql = qs.reshape(self.Hkv, self.G * e, self.D)
        local = torch.matmul(ql, keys.transpose(1, 2)).view(self.Hkv, self.G, e, n_k)
        qi = torch.arange(a, b, device=q.device)[:, None]
        kj = torch.arange(kv_st, b, device=q.device)[None, :]
        diff = qi - kj
        local_ok = (diff >= 0) & (diff < cfg.n_local)

        g_keys, g_vals, g_mask, n_blk, chosen = self._global_kv(gq, q_abs0, e)
        n_g = 0 if g_keys is None else g_keys.shape[1]
        # one fp32 buffer for both stages (no concatenation pass); masked and scaled in place
        logits = local.new_empty((self.Hkv, self.G, e, n_k + n_g), dtype=torch.float32)
        logits[..., :n_k] = local
        visible = local_ok
        if n_g:
            gql = gq.reshape(self.Hkv, self.G * e, self.D)
            logits[..., n_k:] = torch.matmul(gql, g_keys.transpose(1, 2)).view(self.Hkv, self.G, e, n_g)
            visible = torch.cat((local_ok, g_mask if g_mask is not None else local_ok.new_ones(e, n_g)), 1)
        logits.masked_fill_(~visible, float("-inf"))
        probs = torch.softmax(logits.mul_(scaling), -1)
        p_local = probs[..., :n_k]
        o = torch.matmul(p_local.to(lv.dtype).reshape(self.Hkv, self.G * e, n_k), lv[:, kv_st:b])
        if g_keys is not None:
            p_glob = probs[..., n_k:]
            o = o + torch.matmul(p_glob.to(g_vals.dtype).reshape(self.Hkv, self.G * e, -1), g_vals)
            if chosen and cfg.cache_strategy == "lru-s" and cfg.offload == "cpu":
                bs = cfg.block_size
                mass = p_glob[..., : n_blk * bs].sum(dim=(0, 1, 2)).view(n_blk, bs).sum(-1)
                self.cache.add_mass(chosen, mass.tolist())
        # local mass each key received, per query head, added to the remainder scores
        mass = p_local.sum(2).reshape(self.H, n_k)
        k_abs0 = q_abs0 - (a - kv_st)
        lo = max(k_abs0, self.rem_pos0)
        hi = min(k_abs0 + n_k, self.rem_pos0 + self.rem_score.shape[1])
        if hi > lo:
            self.rem_score[:, lo - self.rem_pos0:hi - self.rem_pos0] += mass[:, lo - k_abs0:hi - k_abs0]
        return o.view(self.H, e, self.D)

    def _global_kv(self, gq, q_abs0, e):
        """Keys/values of the global stage (Hkv, n, D) and the visibility mask, or Nones when empty."""
        cfg = self.cfg
        keys, vals, masks = [], [], []
        chosen: list[int] = []
        n_blk = 0
        if self.blocks_enabled and len(self.store):
            chosen = self._retrieve(gq)
            n_blk = len(chosen)
            bk, bv = self._block_kv(chosen)
            keys.append(bk)
            vals.append(bv)
            masks.append(None)
        if self.init_k.shape[1]:
            ik = self.init_k
            if cfg.kind == "stream":
                ik = self.rope.rotate(ik, 0)
            keys.append(ik)
            vals.append(self.init_v)
            masks.append(None)
        if self.blocks_enabled:
            # remainder tokens at absolute p are visible to query i when i - p >= n_local
            n_vis = min(self.seen - self.rem_pos0, q_abs0 + e - 1 - cfg.n_local + 1 - self.rem_pos0)
            if n_vis > 0:
                keys.append(self.rem_k[:, :n_vis])
                vals.append(self.rem_v[:, :n_vis])
                qi = torch.arange(q_abs0, q_abs0 + e, device=gq.device)[:, None]
                pj = torch.arange(self.rem_pos0, self.rem_pos0 + n_vis, device=gq.device)[None, :]
                masks.append(qi - pj >= cfg.n_local)
        if not keys:
            return None, None, None, 0, chosen
        g_mask = None
        if any(m is not None for m in masks):
            g_mask = torch.cat([m if m is not None else torch.ones(e, k.shape[1], dtype=torch.bool, device=gq.device)
                                for m, k in zip(masks, keys)], 1)
        return torch.cat(keys, 1), torch.cat(vals, 1), g_mask, n_blk, chosen

    # ------------------------------------------------------------------ retrieval
    def _scores(self, cur: torch.Tensor) -> torch.Tensor:
        """Block scores for cur (..., H*D): cur . rep (+ question_weight * question . rep for Q-LLM)."""
        s = cur @ self.reps.value.T
        if self.question is not None and self.cfg.question_weight:
            s = s + self.cfg.question_weight * self.qscore.value
        return s

    def _plan_topk(self, gq_group: torch.Tensor) -> None:
        """chunk_topk_calc: the top-k lists of a group of execution blocks against the current representatives."""
        if not (self.blocks_enabled and len(self.store)):
            self._topk_plan = []
            return
        exc = self.cfg.exc_block_size
        curs = [gq_group[:, s:s + exc].float().mean(1).reshape(-1) for s in range(0, gq_group.shape[1], exc)]
        scores = self._scores(torch.stack(curs))
        n = min(self.cfg.topk, scores.shape[-1])
        idx = scores.topk(n, -1).indices.sort(-1).values
        self._topk_plan = idx.tolist()

    def _retrieve(self, gq: torch.Tensor) -> list[int]:
        self.retrievals += 1
        nb = len(self.store)
        if self._topk_plan:
            chosen = [b for b in self._topk_plan.pop(0) if b < nb]
        elif nb <= self.cfg.topk:
            chosen = list(range(nb))
        else:
            cur = gq.float().mean(1).reshape(-1)
            chosen = sorted(self._scores(cur).topk(self.cfg.topk).indices.tolist())
        self.blocks_chosen += len(chosen)
        return chosen

    def _block_kv(self, chosen: list[int]):
        if self.cfg.offload == "gpu":
            data = self.store.rows.value[torch.tensor(chosen, device=self.store.rows.value.device)]
        else:
            slots = self.cache.select(chosen, self.store, self.device)
            data = self.cache.slots.index_select(0, slots)
        # (n, 2, Hkv, bs, D) -> (Hkv, n * bs, D)
        k = data[:, 0].permute(1, 0, 2, 3).reshape(self.Hkv, -1, self.D)
        v = data[:, 1].permute(1, 0, 2, 3).reshape(self.Hkv, -1, self.D)
        return k, v

    # ------------------------------------------------------------------ bookkeeping
    def _bookkeeping(self, e: int) -> None:
        cfg = self.cfg
        self.seen += e
        n_rem = self.seen - self.rem_pos0
        if self.init_k.shape[1] < cfg.n_init and n_rem > cfg.n_local:
            if self.question is None and self.question_span is not None and self.blocks_enabled:
                self._maybe_build_question(end_of_call=False)
            m = min(cfg.n_init - self.init_k.shape[1], n_rem - cfg.n_local)
            self.init_k = torch.cat((self.init_k, self.rem_k[:, :m]), 1)
            self.init_v = torch.cat((self.init_v, self.rem_v[:, :m]), 1)
            self._drop_rem(m)
            n_rem -= m
        if not self.blocks_enabled:
            if n_rem > cfg.n_local:  # StreamingLLM / LM-Infinite forget what leaves the window
                self._drop_rem(n_rem - cfg.n_local)
            return
        bs = cfg.block_size
        nb = (n_rem - cfg.n_local) // bs if n_rem - bs >= cfg.n_local else 0
        if nb:  # every complete block at once: one store write and one batched representative pass
            m = nb * bs
            bk = self.rem_k[:, :m].unflatten(1, (nb, bs)).transpose(0, 1)  # (nb, Hkv, bs, D)
            bv = self.rem_v[:, :m].unflatten(1, (nb, bs)).transpose(0, 1)
            sc = self.rem_score[:, :m].unflatten(1, (nb, bs)).transpose(0, 1)  # (nb, H, bs)
            self.store.add_many(bk, bv)
            reps = self._representatives(bk, sc)
            self.reps.append(reps)
            if self.question is not None:
                self.qscore.append(reps @ self.question)
            self._drop_rem(m)

    def _drop_rem(self, m: int) -> None:
        self.rem_k, self.rem_v = self.rem_k[:, m:], self.rem_v[:, m:]
        self.rem_score = self.rem_score[:, m:]
        self.rem_pos0 += m

    def _representative(self, bk: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """For each query head: mean of the raw keys (its KV head) of the repr_topk most attended tokens."""
        return self._representatives(bk[None], score[None])[0]

    def _representatives(self, bk: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Batched `_representative`: bk (n, Hkv, bs, D), score (n, H, bs) -> (n, H * D) fp32."""
        n, _, bs, _ = bk.shape
        r = min(self.cfg.repr_topk, bs)
        idx = score.topk(r, -1).indices  # (n, H, r); query head h reads KV head h // G
        idx = idx.reshape(n, self.Hkv, self.G * r, 1).expand(-1, -1, -1, self.D)
        picked = bk.gather(2, idx).view(n, self.H, r, self.D)
        return picked.float().mean(2).reshape(n, -1)

    # ------------------------------------------------------------------ Q-LLM question vector
    def _maybe_build_question(self, end_of_call: bool) -> None:
        s, e = self.question_span
        call_end = self._call_start + self._call_gq.shape[1]
        if e > self.seen and not end_of_call:
            return  # not processed yet: built at the end of this call
        if s < self._call_start or e > call_end:
            if end_of_call and e <= call_end:
                log.warning("memory: question span %s started before this call; no question term", (s, e))
                self.question_span = None
            return  # a span in a later call waits for it
        gq = self._call_gq[:, s - self._call_start:e - self._call_start]
        lo, hi = max(s, self.rem_pos0), min(e, self.rem_pos0 + self.rem_score.shape[1])
        if hi - lo == e - s:
            score = self.rem_score[:, lo - self.rem_pos0:hi - self.rem_pos0]
        else:  # part of the question already left the remainder: weigh its tokens by position only
            score = torch.zeros(self.H, e - s, device=gq.device)
        if end_of_call:
            log.info("memory: question vector built at the end of the call (the span ends after the sink-fill point)")
        self.set_question(question_vector(gq, score, self.cfg.repr_topk))
        self.question_source = "span"

    def set_question(self, vec: torch.Tensor) -> None:
        self.question = vec.float()
        if len(self.store):
            qs = self.reps.value @ self.question
            self.qscore = Growable((), torch.float32, self.device)
            self.qscore.append(qs)

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict:
        return {"tokens": self.seen, "sinks": int(self.init_k.shape[1]), "blocks": len(self.store),
                "remainder": int(self.rem_k.shape[1]), "resident": len(self.cache.slot_of),
                "loads": self.cache.loads, "hits": self.cache.hits, "retrievals": self.retrievals,
                "blocks_chosen": self.blocks_chosen, "question": self.question_source}


def question_vector(gq: torch.Tensor, score: torch.Tensor, repr_topk: int) -> torch.Tensor:
    """gq (H, n, D) global queries of the question tokens, score (H, n): per head the mean of the repr_topk
    highest-scored rows, concatenated over heads -> (H * D) fp32."""
    H, n, D = gq.shape
    r = min(repr_topk, n)
    idx = score.topk(r, -1).indices
    return gq.float().gather(1, idx[..., None].expand(-1, -1, D)).mean(1).reshape(-1)

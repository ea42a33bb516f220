"""Merging evicted KV entries into kept ones (LOOK-M, arXiv 2406.18139; the `merge` option of the KV methods).

Per sample and KV head, every evicted real slot `e` joins the kept slot `p` whose key is most cosine-similar
to its key (keys as stored, post-RoPE; ties to the earlier kept slot). With `n_p` slots joining `p`:

* `"pivot"` (LOOK-M's pivotal merging, every public LOOK-M code path): each evicted entry is first averaged
  with its pivot, then the pivot becomes the mean of itself and those averages:
  `k_p' = (k_p + sum_e (k_e + k_p) / 2) / (1 + n_p)`, values alike.
* `"average"` (LOOK-M's averaged merging): `k_p' = (k_p + sum_e k_e) / (1 + n_p)`.

`same_modality=True` only merges text into text and visual into visual (an evicted slot with no kept slot
of its modality is dropped). Keys and values of a slot always travel together (same pivot, same weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MERGE_CHUNK = 512
MODES = ("pivot", "average")


def merge_evicted(inp, idx: torch.Tensor, valid: torch.Tensor, how: str = "pivot",
                  same_modality: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (B, Hkv, K, D) of the kept slots `idx` (B, Hc, K) after merging every evicted real slot
    of each KV head into its most similar kept key. `valid` (B, Hc, K) marks real kept slots (not fillers)."""
    key, value = inp.key, inp.value
    B, Hkv, S, D = key.shape
    idx = idx.expand(B, Hkv, -1)
    valid = valid.expand(B, Hkv, -1)
    K = idx.shape[-1]
    kept_k = key.gather(2, idx[..., None].expand(-1, -1, -1, D)).float()
    kept_v = value.gather(2, idx[..., None].expand(-1, -1, -1, value.shape[-1])).float()
    # scatter_add: filler slots point at slot 0 with valid False and must not unmark a kept slot 0
    kept = torch.zeros(B, Hkv, S, dtype=torch.long, device=key.device).scatter_add(2, idx, valid.long()) > 0
    evicted = inp.real[:, None] & ~kept  # per head: a slot another head kept is still evicted here
    pivots = F.normalize(kept_k, dim=-1)
    kept_visual = None
    if same_modality and inp.visual is not None:
        kept_visual = inp.visual.gather(1, idx.reshape(B, -1)).view(B, Hkv, K)
    sum_k, sum_v = torch.zeros_like(kept_k), torch.zeros_like(kept_v)
    count = torch.zeros(B, Hkv, K, device=key.device)
    for start in range(0, S, MERGE_CHUNK):
        sl = slice(start, min(start + MERGE_CHUNK, S))
        k_e = key[:, :, sl].float()
        sim = F.normalize(k_e, dim=-1) @ pivots.transpose(-1, -2)  # (B, Hkv, c, K)
        allowed = valid[:, :, None, :]
        if kept_visual is not None:
            allowed = allowed & (inp.visual[:, None, sl, None] == kept_visual[:, :, None, :])
        best_sim, best = sim.masked_fill(~allowed, float("-inf")).max(-1)
        w = (evicted[:, :, sl] & (best_sim > float("-inf"))).float()
        count.scatter_add_(2, best, w)
        sum_k.scatter_add_(2, best[..., None].expand(-1, -1, -1, D), k_e * w[..., None])
        v_e = value[:, :, sl].float()
        sum_v.scatter_add_(2, best[..., None].expand(-1, -1, -1, v_e.shape[-1]), v_e * w[..., None])
    n = count[..., None]
    if how == "pivot":  # sum_e (x_e + x_p) / 2 = (sum_e x_e + n x_p) / 2
        sum_k, sum_v = (sum_k + n * kept_k) / 2, (sum_v + n * kept_v) / 2
    denom = 1 + n
    return ((kept_k + sum_k) / denom).to(key.dtype), ((kept_v + sum_v) / denom).to(value.dtype)


def merge_fn(how: str, same_modality: bool = False):
    """The `Selection.merge` callable for a `merge` setting (None for "none")."""
    if how == "none":
        return None
    return lambda inp, idx, valid: merge_evicted(inp, idx, valid, how, same_modality)

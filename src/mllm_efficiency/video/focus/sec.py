"""Focus's semantic concentration (SEC): prompt-guided progressive pruning on the shared pruning engine.

At every `selected_layers[i]` the text rows after the visual span score each surviving grid token (attention
probabilities, max over heads then max over rows, computed from the post-RoPE q/k by the method, never as an
L x L matrix); the top `max(1, int(alpha_i * n_visual_original))` survive. Pruning runs at the input of the next
layer; with `placement="mid_layer"` (the reference's semantics) the selected layer's MLP runs on the surviving
rows only (gathered before it; the rows the next layer drops get a zero MLP output) and its similarity matching
sees only them; `placement="next_layer"` runs that MLP on every row. The MLP is row-wise, so kept states are
equal either way. Keep counts and the first scoring row are known on the host from the engine's visual counts.
"""
from __future__ import annotations

import torch
from torch import nn

from ...core.attention_rows import key_scores
from ...pruning.engine import PruningEngine, StepResult
from ..common import DelegateStep, current_visual, topk_keep


class _Compaction:
    """Rows a selected layer's MLP computes: every slot but the visual tokens its SEC step drops (kept slots in
    order first; in a ragged batch a sample with fewer drops also computes some of its dropped rows, harmlessly:
    the next layer's input drops them). The MLP output of the other rows is zero (they are dropped next)."""

    def __init__(self, layer: int, index: torch.Tensor, length: int):
        self.layer, self.index, self.length = layer, index, length

    @classmethod
    def of(cls, layer: int, keep: torch.Tensor, rows: int) -> "_Compaction":
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :rows]
        return cls(layer, order, keep.shape[1])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return x.index_select(1, self.index[0])
        return x.gather(1, self.index[..., None].expand(-1, -1, x.shape[-1]))

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        full = y.new_zeros(y.shape[0], self.length, y.shape[-1])
        if y.shape[0] == 1:
            return full.index_copy_(1, self.index[0], y)
        return full.scatter_(1, self.index[..., None].expand(-1, -1, y.shape[-1]), y)


def text_row_max_scores(query, key, attention_mask, scaling: float, row_start: torch.Tensor,
                        first: int) -> torch.Tensor:
    """`key_scores(..., "text_rows", "max", "max", row_start)` with its first row `first` (= min(row_start))
    given by the caller, so no device-to-host transfer: the same chunks, the same arithmetic, bit-identical."""
    return key_scores(query, key, attention_mask, scaling, "text_rows", "max", "max", row_start, first=first)


class SEC:
    """The SEC steps of one model (owner of their `DelegateStep`s) and the selected layers' MLP compaction.
    Per prefill: keep targets per stage, host-side keep counts, and per selected layer the keep mask over its
    current slots and the rows its MLP computes (mid_layer); `mlp_live` is the compaction of the MLP running now."""
    method_name = "focus"
    # the fast path gives model.generate's tokens (its prefill runs eagerly: the steps decide on the host). The
    # different tokens once measured came from model.generate hiding the frame grid (video.layout), not from
    # state the slot decoder misses: Focus's hooks are idle after the prefill
    fast_decode = True

    def __init__(self, model, adapter, config, stats, trace, layout_source):
        self.config, self.stats, self.trace, self.layout_source = config, stats, trace, layout_source
        self.targets: list[list[int]] = []  # per stage: keep target per sample
        self.kept: dict[int, list[int]] = {}  # stage -> kept visual tokens per sample (host, from the targets)
        self.pending: dict[int, torch.Tensor] = {}  # selected layer -> keep over current slots (mid_layer)
        self.mlp_plan: dict[int, _Compaction] = {}  # selected layer -> rows its MLP computes (mid_layer)
        self.mlp_live: _Compaction | None = None
        self.steps = [DelegateStep(self, layer + 1, layer, tag=i) for i, layer in enumerate(config.selected_layers)]
        self.engine = None
        for step in self.steps:
            self.engine = PruningEngine.attach(model, adapter, step)
        if self.engine is None:  # no SEC stage: the engine still gives the prefill bookkeeping
            self.steps = [DelegateStep(self, 0, None, tag=None)]
            self.engine = PruningEngine.attach(model, adapter, self.steps[0])
        self._handles = []
        if config.placement == "mid_layer":
            for layer in config.selected_layers:
                mlp = getattr(adapter.layers[layer], "mlp", None)
                if isinstance(mlp, nn.Module) and hasattr(mlp, "down_proj"):  # a row-wise (dense) MLP
                    self._handles += [mlp.register_forward_pre_hook(self._mlp_in(layer)),
                                      mlp.register_forward_hook(self._mlp_out(layer))]

    def reset(self) -> None:
        self.pending.clear()
        self.mlp_plan.clear()
        self.mlp_live = None
        self.kept.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for step in self.steps:
            self.engine.detach(step)

    # ----------------------------------------------------------------- the engine's steps
    def step_plan(self, step, visual, counts) -> bool:
        if step.tag is None:
            self.stats.num_visual = list(counts)
            return bool(self.config.sic_on and sum(counts))
        alpha = self.config.alpha_list[step.tag]
        targets = [max(1, int(alpha * n)) if n else 0 for n in counts]
        if step.tag == 0:
            self.targets = []
        self.targets.append(targets)
        return any(k < n for k, n in zip(targets, counts)) or self.config.sic_on

    def _host_counts(self, req) -> bool:
        """True when the engine's host-side visual counts are this method's (only these steps act on the request,
        all of them in place): keep counts and score rows then need no device-to-host transfer."""
        return bool(req.visual_counts) and all(getattr(s, "owner", None) is self for s in req.active_steps)

    def step_score(self, step, req, module, query, key, attention_mask, kwargs):
        if step.tag is None:
            return None
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        visual = current_visual(req)
        Lcur = visual.shape[1]
        idx = torch.arange(Lcur, device=query.device)
        row_start = (torch.where(visual, idx, -1).amax(1) + 1).clamp(max=Lcur - 1)
        host = self._host_counts(req)
        first = self._first_text_row(req, Lcur, query.shape[2]) if host else None
        if first is None:
            score = key_scores(query, key, attention_mask, scaling, "text_rows", "max", "max", row_start)
        else:
            score = text_row_max_scores(query, key, attention_mask, scaling, row_start, first)
        score = score[:, -Lcur:]
        counts = list(req.visual_counts) if host else visual.sum(1).tolist()
        targets = [min(t, int(c)) for t, c in zip(self.targets[step.tag], counts)]
        keep = topk_keep(score, visual, targets)  # exactly targets[b] of the visual slots per sample
        if host:
            self.kept[step.tag] = targets
        if self.config.placement == "mid_layer":
            pend = ~visual | keep
            self.pending[step.score_layer] = pend
            dropped = [int(c) - t for c, t in zip(counts, targets)]
            if min(dropped) > 0:
                self.mlp_plan[step.score_layer] = _Compaction.of(step.score_layer, pend, Lcur - min(dropped))
        return keep

    def _first_text_row(self, req, Lcur: int, Lq: int) -> int | None:
        """`min(row_start)` of `key_scores` known on the host: with one grid per sample and at least one of its
        tokens alive (SEC keeps >= 1), the rows after the last surviving grid token are the prompt's tokens
        after the grid (never pruned; slots are right-aligned). None when that does not hold."""
        layout = self.layout_source.layout
        if layout is None or req.length != layout.grid_index.shape[1] or any(len(g) > 1 for g in layout.grids):
            return None
        starts = []
        for b, grids in enumerate(layout.grids):
            if not grids or not req.visual_counts[b]:
                starts.append(0)  # no visual slot: row_start = 0
            else:
                g = grids[0]
                starts.append(Lcur - (req.length - g.start - g.size))
        return max(0, min(min(starts), Lcur - 1, Lq - 1))

    def step_select(self, step, req, hidden):
        if step.tag is None:
            return StepResult(None, list(req.visual_counts))
        keep_vis = req.scores.pop(step, None)
        if keep_vis is None:
            raise RuntimeError(f"focus: no scores were recorded at layer {step.score_layer}")
        self.pending.pop(step.score_layer, None)
        self.mlp_plan.pop(step.score_layer, None)
        visual = current_visual(req)
        counts = self.kept.pop(step.tag, None)
        if counts is not None and self._host_counts(req):
            before = list(req.visual_counts)
        else:
            counts, before = keep_vis.sum(1).tolist(), visual.sum(1).tolist()
        self.stats.keep_per_stage[step.tag] = counts
        if self.config.record_trace:
            grid = self.layout_source.layout.grid_index.gather(1, req.kept)[0]
            kept = grid[keep_vis[0]]
            self.trace.kept[step.score_layer] = torch.sort(kept).values.to(torch.int32).cpu()
        if all(k == n for k, n in zip(counts, before)):
            return StepResult(None, counts)
        return StepResult(~visual | keep_vis, counts)

    def step_finish(self, step, req, cache_lengths) -> None:
        if step is self.steps[-1]:
            self.stats.cache_lengths = cache_lengths
            self.stats.prefills += 1

    # ----------------------------------------------------------------- the selected layers' MLPs (mid_layer)
    def _mlp_in(self, layer: int):
        def hook(module, args):
            plan = self.mlp_plan.get(layer)
            if plan is None or not args or args[0].dim() != 3 or args[0].shape[1] != plan.length:
                return None
            self.mlp_live = plan
            B, L = plan.index.shape[0], plan.length
            self.stats.mlp_rows[layer] = [B * plan.index.shape[1], B * L]
            return (plan.gather(args[0]),) + tuple(args[1:])

        return hook

    def _mlp_out(self, layer: int):
        def hook(module, args, output):
            plan, self.mlp_live = self.mlp_live, None
            if plan is None or plan.layer != layer:
                return None
            return plan.scatter(output)

        return hook

    # ----------------------------------------------------------------- the current rows, for SIC
    def rows(self, layer: int, mlp: bool, B: int, Lcur: int, device):
        """(grid index per current row or -1, alive per row) for a GEMM of `layer` (`mlp`: an MLP input)."""
        plan = self.mlp_live if mlp else None
        if plan is not None and plan.layer == layer and plan.index.shape[1] == Lcur:  # compacted MLP input
            grid, alive = self.rows(layer, mlp, B, plan.length, device)  # plan.length > Lcur: no recursion
            return grid.gather(1, plan.index), alive.gather(1, plan.index)
        layout = self.layout_source.layout
        req = self.engine.req
        if req is not None and req.kept.shape[1] == Lcur:
            grid = layout.grid_index.to(device).gather(1, req.kept)
            grid = torch.where(req.valid, grid, torch.full_like(grid, -1))
        else:
            grid = layout.grid_index.to(device)[:, :Lcur] if layout.grid_index.shape[1] == Lcur else \
                torch.full((B, Lcur), -1, dtype=torch.long, device=device)
        alive = grid >= 0
        if mlp and layer in self.pending:
            alive = alive & self.pending[layer]
        return grid, alive

    def rows_key(self, layer: int, mlp: bool, B: int, Lcur: int) -> tuple:
        """What `rows` depends on: the kept set (and mid-layer pending set / MLP compaction)."""
        req = self.engine.req
        pend = self.pending.get(layer) if mlp else None
        plan = self.mlp_live if mlp else None
        if req is not None and req.kept.shape[1] in (Lcur, getattr(plan, "length", -1)):
            return (req.kept, req.valid, pend, getattr(plan, "index", None), B, Lcur)
        return (self.layout_source.layout, None, pend, None, B, Lcur)

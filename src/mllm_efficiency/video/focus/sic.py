"""Focus's similarity concentration (SIC, prefill only): the GEMM points and what runs at them.

The linear layers at the GEMM inputs `q_proj` (shared by q/k/v), `o_proj`, `gate_proj` (shared by gate/up) and
`down_proj` are wrapped (`SICLinear`, one `Site` per input), and Q after RoPE (`query`) is transformed through the
attention hub:
- `sic_mode="emulate"`: matched vectors are replaced by their group mean in grid space (`GridMatching`), the GEMM
  runs densely (accuracy of the accelerator, no speedup; the savings are simulated from the recorded sparsity);
- `sic_mode="token_dedup"`: whole-token matching, the GEMM runs on the unique rows only and the result is
  expanded to every member (real savings; `query` is not deduplicated: fused attention kernels). Which points
  are matched and deduplicated, and when the host reads their counts, is `dedup_schedule.DedupSchedule`'s.
  `whole_mlp` runs gate, up and down once on the gate/up point's unique rows.
- `sic_mode="off"`: SEC only.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import similarity as S
from .config import MLP_GEMMS


class Site:
    """One dedup point of one layer, shared by the linear layers that read the same input. Its owner has
    `sic_live`, `prepare_site(x, layer, gemm)` or `prepare(x, layer, gemm)` (the mean-replaced input, a
    DedupPlan, or None for dense) and optionally `enter(site)` (called when the site starts on a new input)."""

    def __init__(self, owner, layer: int, gemm: str):
        self.owner, self.layer, self.gemm = owner, layer, gemm
        self._x = None
        self._prepared = None
        self._means = None

    def reset(self) -> None:
        self._x = self._prepared = self._means = None

    def run(self, inner: nn.Module, x: torch.Tensor) -> torch.Tensor:
        owner = self.owner
        if not owner.sic_live or x.dim() != 3 or x.shape[1] < 2:
            return inner(x)
        if self._x is not x:  # first linear layer of this input: match once, the others reuse it
            enter = getattr(owner, "enter", None)  # owners other than Focus (CMC) only have `prepare`
            if enter is not None:
                enter(self)
            self._x, self._means = x, None
            prepare = getattr(owner, "prepare_site", None) or owner.prepare  # CMC: `prepare` only
            self._prepared = prepare(x, self.layer, self.gemm)
        prep = self._prepared
        if prep is None:
            return inner(x)
        if isinstance(prep, torch.Tensor):
            return inner(prep)
        B, L, C = x.shape
        x2d = x.reshape(B * L, C)
        if self._means is None:
            self._means = S.group_means_rows(x2d, prep)
        y = S.dedup_linear(inner, x2d, prep, self._means)
        return y.view(B, L, y.shape[-1])


class SICLinear(nn.Module):
    """A linear layer whose input passes through a `Site` (emulation or gather -> GEMM -> scatter)."""

    def __init__(self, inner: nn.Module, site: Site):
        super().__init__()
        self.inner = inner
        self.site = site

    @property
    def weight(self):
        return self.inner.weight

    @property
    def bias(self):
        return getattr(self.inner, "bias", None)

    def forward(self, x):
        return self.site.run(self.inner, x)



class SICSites:
    """The SIC points of one model: the wrapped linear layers, the whole_mlp hooks and the Q transform.
    `prepare_site(x, layer, gemm)` says what a point runs on; `grid` is the full-grid path (the `query` point).
    `sic_live` is set by the owner for a prefill with visual tokens; `active` is the site whose input is cached
    (released when the next one starts), `whole` the MLP running on its unique rows (whole_mlp)."""

    def __init__(self, adapter, config, stats, hub, prepare_site, grid: "GridMatching"):
        self.adapter, self.config, self.stats, self.hub = adapter, config, stats, hub
        self.prepare_site, self.grid = prepare_site, grid
        self.sic_live = False
        self.active: Site | None = None
        self.whole: tuple | None = None  # whole_mlp: (layer, plan, B, L) of the MLP running on its unique rows
        self._sites: list[Site] = []
        self._wrapped: list[tuple[nn.Module, str, nn.Module]] = []
        self._handles = []
        self._query = self._query_transform  # one bound method: the hub removes it by identity
        self._wrap_linears()
        if "query" in config.active_gemms:
            hub.add_query_transform(self._query)

    def _wrap_linears(self) -> None:
        gemms = self.config.active_gemms
        if self.config.whole_mlp:
            gemms = tuple(g for g in gemms if g not in MLP_GEMMS)
        for i, layer in enumerate(self.adapter.layers):
            attn, mlp = layer.self_attn, getattr(layer, "mlp", None)
            if self.config.whole_mlp:
                if not (isinstance(mlp, nn.Module) and all(isinstance(getattr(mlp, n, None), nn.Module)
                                                           for n in ("gate_proj", "up_proj", "down_proj"))):
                    raise NotImplementedError(f"focus whole_mlp: layer {i} has no gate/up/down MLP")
                # after the mid-layer compaction's pre-hook, and undone before its scatter (prepend)
                self._handles += [mlp.register_forward_pre_hook(self._whole_mlp_in(i)),
                                  mlp.register_forward_hook(self._whole_mlp_out(i), prepend=True)]
            plan = {"q_proj": (attn, ("q_proj", "k_proj", "v_proj")), "o_proj": (attn, ("o_proj",)),
                    "gate_proj": (mlp, ("gate_proj", "up_proj")), "down_proj": (mlp, ("down_proj",))}
            for gemm, (parent, names) in plan.items():
                if gemm not in gemms:
                    continue
                if parent is None or not all(isinstance(getattr(parent, n, None), nn.Module) for n in names):
                    raise NotImplementedError(f"focus: layer {i} has no {'/'.join(names)} linear layers")
                site = Site(self, i, gemm)
                self._sites.append(site)
                for n in names:
                    inner = getattr(parent, n)
                    setattr(parent, n, SICLinear(inner, site))
                    self._wrapped.append((parent, n, inner))

    def remove(self) -> None:
        for parent, name, inner in reversed(self._wrapped):
            setattr(parent, name, inner)
        self._wrapped.clear()
        self.hub.remove_query_transform(self._query)
        for h in self._handles:
            h.remove()

    def reset(self) -> None:
        for site in self._sites:
            site.reset()
        self.active = None
        self.whole = None

    def enter(self, site: Site) -> None:
        """`site` starts on a new input: the previous site's cached input and means are no longer needed."""
        if self.active is not None and self.active is not site:
            self.active.reset()
        self.active = site

    def _whole_mlp_in(self, layer: int):
        """whole_mlp: the MLP input's gate/up point; when deduplicated the MLP runs on its U group means."""
        def hook(module, args):
            self.whole = None
            if not self.sic_live or not args or args[0].dim() != 3 or args[0].shape[1] < 2:
                return None
            if self.active is not None:  # the attention's cached site input is no longer needed
                self.active.reset()
                self.active = None
            x = args[0]
            B, L, C = x.shape
            plan = self.prepare_site(x, layer, "gate_proj")
            for stats in (self.stats.dedup_rows, self.stats.duplicates):
                if ("gate_proj", layer) in stats:
                    stats[("down_proj", layer)] = list(stats[("gate_proj", layer)])
            if plan is None:
                return None
            self.whole = (layer, plan, B, L)
            return (S.group_means_rows(x.reshape(B * L, C), plan)[None],) + tuple(args[1:])

        return hook

    def _whole_mlp_out(self, layer: int):
        def hook(module, args, output):
            whole, self.whole = self.whole, None
            if whole is None or whole[0] != layer:
                return None
            _, plan, B, L = whole
            return output[0].index_select(0, plan.expand).view(B, L, output.shape[-1])

        return hook

    def _query_transform(self, module, query, kwargs):
        if not self.sic_live or query.shape[2] < 2:
            return query
        B, H, L, D = query.shape
        flat = query.transpose(1, 2).reshape(B, L, H * D)
        out = self.grid(flat, module.layer_idx, "query")
        return out.view(B, L, H, D).transpose(1, 2)


class GridMatching:
    """Full-grid path (emulation; token_dedup with `record_trace`): each grid of the prompt is matched in grid
    space (`vector_size`-wide vectors in T x S x S blocks); returns the mean-replaced input (emulation) or a
    DedupPlan over the flattened rows (token_dedup). `rows(layer, mlp, B, L, device)` maps the current rows to
    grid indices (SEC's kept set)."""

    def __init__(self, config, layout_source, rows, stats, trace):
        self.config, self.layout_source, self.rows, self.stats, self.trace = config, layout_source, rows, stats, trace

    def __call__(self, x: torch.Tensor, layer: int, gemm: str):
        cfg = self.config
        B, Lcur, C = x.shape
        grid, alive = self.rows(layer, gemm in MLP_GEMMS, B, Lcur, x.device)
        layout = self.layout_source.layout
        emulate = cfg.sic_mode == "emulate"
        out = x.clone() if emulate else None
        root_rows = None if emulate else torch.arange(B * Lcur, device=x.device)
        counts = [0, 0, 0]
        for b in range(B):
            live = (alive[b]).nonzero().flatten()
            n = layout.n_grid[b]
            if n == 0:
                continue
            G = x.new_zeros(n, C)
            G[grid[b, live]] = x[b, live]
            offset = 0
            codes, roots, new = [], [], []
            for g in layout.grids[b]:
                sub = G[offset:offset + g.size]
                m = S.match_vectors(sub, g.frames, g.height, g.width, vector_size=cfg.vector,
                                    threshold=cfg.similarity_threshold, frame_block=cfg.frame_block_size,
                                    block=cfg.block, m_size=cfg.gemm_m_size, mask_row_wrap=cfg.mask_row_wrap)
                codes.append(m.code)
                roots.append(m.root + offset)
                if emulate:
                    new.append(S.group_mean(sub, m, cfg.vector))
                offset += g.size
            code = torch.cat(codes)
            root = torch.cat(roots)
            counts[0] += int(((code > 0) & (code != S.ZERO_CODE)).sum())
            counts[1] += int((code == S.ZERO_CODE).sum())
            counts[2] += code.numel()
            if emulate:
                out[b, live] = torch.cat(new)[grid[b, live]]
            else:
                row_of = torch.full((n,), -1, dtype=torch.long, device=x.device)
                row_of[grid[b, live]] = live
                root_rows[b * Lcur + live] = b * Lcur + row_of[root[grid[b, live], 0]]
            if b == 0 and cfg.record_trace:
                stored = torch.sort(grid[b, live]).values
                self.trace.codes[(gemm, layer)] = code[stored].cpu()
                self.trace.roots[(gemm, layer)] = root.cpu()
                self.trace.widths[gemm] = C
        prev = self.stats.sic_counts.get((gemm, layer), [0, 0, 0])
        self.stats.sic_counts[(gemm, layer)] = [p + c for p, c in zip(prev, counts)]
        if emulate:
            return out
        plan = S.dedup_plan(root_rows)
        self.stats.dedup_rows[(gemm, layer)] = [plan.unique.numel(), B * Lcur]
        return plan

"""Focus attached to one model: SEC's steps, SIC's sites and token_dedup's schedule, put together around each
prefill (which prefills they act on, what is reset between them, the per-layer token counts)."""
from __future__ import annotations

from ...errors import ConfigError
from ..common import PromptLayout
from .config import FocusConfig, resolve_ratio
from .dedup_schedule import CandidateTables, DedupSchedule
from .sec import SEC
from .sic import GridMatching, SICSites
from .stats import FocusStats, TraceRecorder


class AttachedFocus:
    def __init__(self, model, adapter, config: FocusConfig):
        T = adapter.num_layers
        config, note = resolve_ratio(config, T)  # ratio without alpha_list: the schedule solved for this model
        for i, layer in enumerate(config.selected_layers):
            if layer > T - 2:
                raise ConfigError(f"selected_layers[{i}] must be in [0, {T - 2}] for this model ({T} decoder "
                                  f"layers; pruning acts from the next layer on), got {layer}")
        if adapter.sliding_window_layers():
            raise NotImplementedError("focus on models with sliding-window layers is not supported")
        self.config = config
        self.adapter = adapter
        self.stats = FocusStats(num_layers=T, requested_ratio=config.ratio, ratio_note=note)
        self.trace = TraceRecorder()
        self.layout_source = PromptLayout(adapter, config.frames, config.allow_text_only, "focus")
        self.sec = SEC(model, adapter, config, self.stats, self.trace, self.layout_source)
        self.steps, self.engine = self.sec.steps, self.sec.engine
        self._handles = [adapter.text_model.register_forward_pre_hook(self._on_text_model, with_kwargs=True),
                         adapter.text_model.register_forward_hook(self._after_text_model)]
        for i, layer in enumerate(adapter.layers):
            self._handles.append(layer.register_forward_pre_hook(self._count_layer(i), with_kwargs=True))
        self.grid = GridMatching(config, self.layout_source, self.sec.rows, self.stats, self.trace)
        self.dedup = DedupSchedule(config, self.stats,
                                   CandidateTables(config, self.layout_source, self.sec.rows, self.sec.rows_key),
                                   self.grid)
        self.sic = None
        if config.sic_on:  # after SEC's mid-layer MLP hooks: whole_mlp's run inside them
            prepare = self.dedup.prepare if config.sic_mode == "token_dedup" else self.grid
            self.sic = SICSites(adapter, config, self.stats, self.engine.hub, prepare, self.grid)

    def remove(self) -> None:
        if self.sic is not None:
            self.sic.remove()
        for h in self._handles:
            h.remove()
        self.sec.remove()
        self.layout_source.remove()
        self.dedup.tables.forget()

    # ----------------------------------------------------------------- prefill bookkeeping
    def _set_live(self, live: bool) -> None:
        if self.sic is not None:
            self.sic.sic_live = live

    def _release(self) -> None:
        if self.sic is not None:
            self.sic.reset()
        self.sec.reset()
        self.dedup.reset()

    def _on_text_model(self, module, args, kwargs):
        self._set_live(False)
        self._release()
        req = self.engine.req
        ctx = self.layout_source.ctx
        if req is None and not ctx.fresh:
            return None
        if ctx.fresh and ctx.input_ids is not None:
            ids = ctx.input_ids
            layout = self.layout_source.get(ids.shape[0], ids.shape[1], ids.device)
            if layout is not None and sum(layout.n_grid) and ids.shape[1] > 1:
                self._set_live(True)
                self.trace.clear()
                self.stats.start_prefill(layout.n_grid, len(self.config.selected_layers))
        return None

    def _after_text_model(self, module, args, output):
        self.dedup.finish()
        self._set_live(False)
        self._release()
        return None

    def _count_layer(self, i: int):
        def hook(module, args, kwargs):
            if not self.layout_source.ctx.fresh or self.layout_source.layout is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] < 2 or len(self.stats.tokens_per_layer) != i:
                return None
            # layer i's pre-hook order: the engine shrank the input first (its hooks were registered first)
            req = self.engine.req
            if req is not None and req.kept.shape[1] == hidden.shape[1] and req.visual_counts:
                n = int(req.visual_counts[0])  # host-side count: no synchronisation per layer
            else:
                grid, _ = self.sec.rows(i, mlp=False, B=hidden.shape[0], Lcur=hidden.shape[1], device=hidden.device)
                n = int((grid[0] >= 0).sum())
            self.stats.tokens_per_layer.append(int(hidden.shape[1]))
            self.stats.visual_per_layer.append(n)
            return None

        return hook

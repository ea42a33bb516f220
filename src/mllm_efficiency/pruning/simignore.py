"""SimIgnore (arXiv 2412.09817): ignore the image tokens least similar to the text, from layer 0 on.

At the LLM input, image token embeddings E_img (N x d, after the projector) and text token embeddings E_txt
(T x d, from the LLM's input embedding table) are L2-normalised; the N*T cosine pairs are sorted in
descending order and walked from rank `start` with step `stride`, collecting distinct image tokens until
`keep` are found. The other image tokens are masked as keys (`action="mask"`, the paper's setting) or
removed before layer 0 (`action="drop"`, the variant that saves compute). Spec: docs/token_pruning.md.

Text side (`text_source`): "text_after_image" (prompt tokens after the last visual token: the question of a
free-form prompt), "prompt" (every non-visual prompt token), "span" (an explicit prompt span), or "explicit"
(token ids given in the config or per request with `set_text()`, e.g. ScienceQA's answer options).
Composes with FastV: apply `simignore`, then `fastv` with its own K and R.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig, check_choice, check_int, check_ratio, check_token_ids
from ..errors import ConfigError, NoVisualTokensError
from ..registry import register_method
from ..core.context import ModelContext
from ..core.device import device_ints
from .engine import AttachedStep, PruningStats, PruningStep, Request, StepResult
from ..flops import visual_keep_count

TEXT_SOURCES = ("text_after_image", "prompt", "span", "explicit")


@dataclasses.dataclass(frozen=True)
class SimIgnoreConfig(MethodConfig):
    ratio: float = 0.2153  # fraction of image tokens ignored (124 of 576 in the paper's 7B setting)
    keep: int | None = None  # absolute number kept instead of `ratio` (the reference's k2, e.g. 452)
    text_source: str = "text_after_image"
    text_token_ids: tuple[int, ...] | None = None  # for text_source="explicit"
    text_span_start: int | None = None  # for text_source="span"
    text_span_length: int | None = None
    start: int = 1
    stride: int = 1
    action: str = "mask"
    allow_text_only: bool = False

    def validate(self) -> None:
        check_ratio("ratio", self.ratio)
        if self.keep is not None:
            check_int("keep", self.keep, 1)
        check_choice("text_source", self.text_source, TEXT_SOURCES)
        check_choice("action", self.action, ("mask", "drop"))
        check_int("start", self.start, 0)
        check_int("stride", self.stride, 1)
        if self.text_source == "span":
            if self.text_span_start is None or self.text_span_length is None:
                raise ConfigError("text_source='span' needs text_span_start and text_span_length")
            check_int("text_span_start", self.text_span_start, 0)
            check_int("text_span_length", self.text_span_length, 1)
        if self.text_token_ids is not None:
            if self.text_source != "explicit":
                raise ConfigError(f"text_token_ids is used only with text_source='explicit', got "
                                  f"text_source={self.text_source!r}: drop text_token_ids or set text_source='explicit'")
            object.__setattr__(self, "text_token_ids", check_token_ids("text_token_ids", self.text_token_ids))


@dataclasses.dataclass
class SimIgnoreStats(PruningStats):
    text_length: list[int] = dataclasses.field(default_factory=list)


def walk_keep(sim: torch.Tensor, keep: int, start: int, stride: int) -> torch.Tensor:
    """Bool (N,): the first `keep` distinct image rows met walking the sorted (N x T) pairs from rank
    `start` with step `stride` (descending similarity, ties in row-major order)."""
    N, T = sim.shape
    order = torch.sort(sim.flatten(), descending=True, stable=True).indices[start::stride]
    rows = order // T
    first = torch.full((N,), order.numel(), dtype=torch.long, device=sim.device)
    first.scatter_reduce_(0, rows, torch.arange(rows.numel(), device=sim.device), reduce="amin")
    chosen = torch.sort(first, stable=True).indices[:keep]
    out = torch.zeros(N, dtype=torch.bool, device=sim.device)
    return out.scatter_(0, chosen, first[chosen] < order.numel())  # no boolean indexing: no host sync


def _true_positions(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending positions of the `n` True entries of a 1-D bool mask, found on the device (`nonzero` would
    synchronise with the host to learn `n`)."""
    return torch.sort((~mask).to(torch.int8), stable=True).indices[:n]


class SimIgnoreStep(PruningStep):
    score_layer = None

    def __init__(self, config: SimIgnoreConfig, embed: torch.nn.Module):
        self.config = config
        self.mode = "mask" if config.action == "mask" else "inplace"
        self.layer = 0
        self.embed = embed
        self.stats = SimIgnoreStats()
        self._text_ids: list[list[int]] | None = None
        # every host-side number comes from the prompt's layout (routed through `host_values`), the rest stays on
        # the device: the fast path may capture this step in a CUDA graph
        self.graph_capture = True
        self.method_name = "simignore"
        self.host_values = None  # core.context.HostValues of the model, set on attach

    def set_text(self, token_ids) -> None:
        """Text tokens for `text_source="explicit"`: one list for every sample, or one list per sample."""
        if token_ids and isinstance(token_ids[0], int):
            token_ids = [list(token_ids)]
        self._text_ids = [list(t) for t in token_ids]

    def visual_positions(self, detected, B: int, L: int, device):
        if detected is None:
            if self.config.allow_text_only:
                return torch.zeros(B, L, dtype=torch.bool, device=device)
            raise NoVisualTokensError("simignore: no image or video tokens found (the model config names no "
                                      "image token id)")
        return detected

    def plan(self, visual: torch.Tensor, counts: list[int], real_lengths: list[int]) -> bool:
        if sum(counts) == 0 and not self.config.allow_text_only:
            raise NoVisualTokensError("simignore: no image or video tokens found in the prompt")
        self._keep = [self._keep_of(n) for n in counts]
        self.stats.num_visual, self.stats.keep_count = counts, list(self._keep)
        self.stats.kept_visual_mask, self.stats.cache_lengths = visual, None
        return any(k < n for k, n in zip(self._keep, counts))

    def _keep_of(self, n: int) -> int:
        if n == 0:
            return 0
        return min(n, self.config.keep) if self.config.keep is not None else visual_keep_count(n, self.config.ratio)

    def _text_mask(self, req: Request, b: int) -> torch.Tensor | None:
        cfg = self.config
        visual = req.visual[b]
        L = visual.shape[0]
        real = torch.zeros(L, dtype=torch.bool, device=visual.device)
        real[req.padding[b]:] = True
        if cfg.text_source == "span":
            m = torch.zeros_like(real)
            m[cfg.text_span_start:cfg.text_span_start + cfg.text_span_length] = True
            return m & real & ~visual
        if cfg.text_source == "prompt":
            return real & ~visual
        idx = torch.arange(L, device=visual.device)
        last = torch.where(visual, idx, -1).max()  # stays on the device
        return (idx > last) & real

    def _text_embeddings(self, req: Request, b: int, hidden: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.text_source == "explicit":
            ids = self._text_ids or ([list(cfg.text_token_ids)] if cfg.text_token_ids else None)
            if not ids:
                raise ConfigError("simignore: text_source='explicit' needs text_token_ids (config) or set_text()")
            row = ids[b] if len(ids) > 1 else ids[0]
            return self.embed(device_ints(row, hidden.device))
        if req.input_ids is None:
            raise ConfigError(f"simignore: text_source={cfg.text_source!r} needs input_ids; pass text_token_ids "
                              "with text_source='explicit'")
        mask = self._text_mask(req, b)
        n = self._host_read("simignore_text_tokens", lambda: int(mask.sum()))
        if n == 0:
            raise ConfigError(f"simignore: text_source={cfg.text_source!r} found no text tokens in sample {b}; "
                              "use text_source='explicit' with text_token_ids")
        return self.embed(req.input_ids[b].gather(0, _true_positions(mask, n)))

    def _host_read(self, name: str, compute):
        return self.host_values.read(name, compute) if self.host_values is not None else compute()

    def select(self, req: Request, hidden: torch.Tensor):
        visual_cur = req.visual.gather(1, req.kept) & req.valid
        keep = torch.ones_like(visual_cur)
        kept_vis = torch.zeros_like(visual_cur)
        text_lengths = []
        counts = self._host_read("simignore_visual", lambda: visual_cur.sum(1).tolist())
        for b in range(hidden.shape[0]):
            if counts[b] == 0:
                text_lengths.append(0)
                continue
            pos = _true_positions(visual_cur[b], counts[b])
            img = torch.nn.functional.normalize(hidden[b, pos].float(), dim=-1)
            txt = torch.nn.functional.normalize(self._text_embeddings(req, b, hidden).float(), dim=-1)
            text_lengths.append(txt.shape[0])
            chosen = walk_keep(img @ txt.T, self._keep[b], self.config.start, self.config.stride)
            keep[b, pos] = chosen
            kept_vis[b, pos] = chosen
        st = self.stats
        st.text_length = text_lengths
        mask = torch.zeros(req.batch, req.length + 1, dtype=torch.bool, device=hidden.device)
        mask.scatter_(1, torch.where(req.valid, req.kept, req.length), kept_vis)
        st.kept_visual_mask = mask[:, :req.length]
        return StepResult(keep, list(self._keep))

    def finish(self, req: Request, cache_lengths) -> None:
        self.stats.cache_lengths = cache_lengths
        self.stats.prefills += 1


class AttachedSimIgnore(AttachedStep):
    def __init__(self, model, adapter, config: SimIgnoreConfig):
        if config.action == "mask" and "flash" in (adapter.text_config._attn_implementation or ""):
            raise ConfigError("simignore action='mask' needs a 4-D attention mask: use 'sdpa' or 'eager'")
        self.attach_step(model, adapter, SimIgnoreStep(config, adapter.text_model.get_input_embeddings()))
        self.step.host_values = ModelContext.of(adapter).host_values

    def set_text(self, token_ids) -> None:
        self.step.set_text(token_ids)


@register_method("simignore", family="pruning", config_cls=SimIgnoreConfig,
                 summary="SimIgnore: ignore the image tokens least similar to the text embeddings (mask or drop)")
def attach_simignore(model, adapter, config: SimIgnoreConfig) -> AttachedSimIgnore:
    return AttachedSimIgnore(model, adapter, config)

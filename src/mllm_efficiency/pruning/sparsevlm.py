"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417): text-guided progressive visual-token pruning with
token recycling.

1. Raters (once per prefill, at the LLM input): the question tokens are the prompt tokens after the last visual
   token. With the input embeddings H_v (visual, N x d) and H_t (question, T_q x d),
   M = softmax over the question axis of H_v H_t^T (unscaled, as the authors' code computes it), and each question
   token's relevance is its mean over the visual rows, r_t = mean_v M[v, t]. The raters are the question tokens
   with r_t above the mean of r (strictly). No token above the mean (equal relevances): every question token
   rates; a prompt without question tokens: its last token is the one rater.
2. At each pruning layer l_s (`pruning_loc`, the authors' LLaVA-1.5 layers 2, 6, 15 of 32; other depths get the
   same fractions of their depth) every visual token still present is scored by the attention the raters give it
   in layer l_s (post-RoPE q/k of that layer, softmax over all keys, mean over heads and raters; computed from q/k
   by core.attention_rows, no eager attention). The best k_s stay; the tokens leave at the input of layer l_s + 1
   (the authors prune the output of layer l_s).
3. Recycling: of the P_s pruned tokens, the m_s = min(P_s, int(recycle_ratio * P_s) + 1) with the highest scores
   are clustered into c_s = min(m_s, int(cluster_ratio * m_s) + 1) groups by density-peak clustering (DPC-KNN,
   as the authors: distances ||x_i - x_j|| / sqrt(d) on the hidden states entering layer l_s + 1, local density
   rho_i = exp(-mean of the squared distances to its c_s nearest points, itself included), delta_i = distance to
   the nearest point of higher density (the largest distance for the densest point), centers = top c_s of
   rho * delta, every point joins its nearest center). Each group is averaged into one recycled token, which
   takes the slot (and position id) of its center; the others leave. Ties are broken by index instead of the
   authors' random noise, so the result is deterministic. After stage s, k_s + c_s visual tokens are alive;
   recycled tokens are visual tokens for the later stages.

Per-layer budgets k_s, in order of precedence:
- `sparse_token_list`: absolute counts (the authors' lists, e.g. (66, 30, 17) for their 64-token setting);
- `retained_tokens` (64, 128 or 192): the authors' LLaVA-1.5 lists (66, 30, 17), (303, 110, 36), (300, 200, 110)
  for 576 visual tokens, scaled by N / 576;
- `ratio` (default 0.778, i.e. 128 of 576 equivalent tokens): k_s = round(N * lam^s) with lam chosen so that
  the visual tokens alive per layer (recycled ones included), averaged over the T decoder layers, are closest to
  (1 - ratio) N: [(l_1 + 1) N + sum_s (l_{s+1} - l_s) a_s] / T with a_s = k_s + c_s and l_{S+1} = T - 1.
  ratio 0 keeps everything (the model's outputs are unchanged). Ratios above 1 - (l_1 + 1) / T are unreachable
  (refused); the default is capped there on shallow models.
The paper's adaptive per-layer count (from the rank of the rater attention matrix) reads data-dependent numbers on
the host; it is not implemented: the schedule is static (fixed by N), so the prefill can be graph-captured.
Spec: docs/token_pruning.md.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ..config import MethodConfig, check_choice, check_fraction, check_int, check_ratio, layer_tuple
from ..core.attention_rows import ROW_CHUNK, attention_rows
from ..core.context import ModelContext
from ..errors import ConfigError, NoVisualTokensError
from ..registry import register_method
from .engine import (
    PruningEngine,
    PruningStats,
    PruningStep,
    Request,
    StepResult,
    _to_original,
)
from .simignore import _true_positions

# The authors' LLaVA-1.5 schedules (576 visual tokens, pruning after layers 2, 6, 15 of 32): top-k kept per stage.
RETAINED_TOKENS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
PAPER_LAYERS, PAPER_DEPTH, PAPER_TOKENS = (2, 6, 15), 32, 576
DEFAULT_RATIO = 0.778  # 128 of 576 equivalent visual tokens


@dataclasses.dataclass(frozen=True)
class SparseVLMConfig(MethodConfig):
    ratio: float | None = None  # fraction of visual tokens removed, averaged over the layers (None: 0.778)
    pruning_loc: tuple[int, ...] | None = None  # layers whose attention scores; tokens leave after them
    sparse_token_list: tuple[int, ...] | None = None  # visual tokens kept (top-k) at each pruning layer
    retained_tokens: int | None = None  # the authors' preset lists: 64, 128 or 192
    recycle_ratio: float = 0.3  # fraction of the pruned tokens (best scores) that are recycled; 0: none
    cluster_ratio: float = 0.1  # clusters per recycled candidate (int(cluster_ratio * m) + 1 clusters)
    positions: str = "original"  # "original" position ids, or "renumber"ed contiguously (the authors' code)
    allow_text_only: bool = False

    def validate(self) -> None:
        if self.ratio is not None:
            check_ratio("ratio", self.ratio)
        if self.pruning_loc is not None:
            object.__setattr__(self, "pruning_loc", layer_tuple("sparsevlm", "pruning_loc", self.pruning_loc, 0))
        if self.sparse_token_list is not None:
            if not isinstance(self.sparse_token_list, (tuple, list)):
                raise ConfigError(f"sparsevlm: sparse_token_list must be a tuple or list, got "
                                  f"{self.sparse_token_list!r}")
            object.__setattr__(self, "sparse_token_list", tuple(self.sparse_token_list))
            if not self.sparse_token_list:
                raise ConfigError("sparsevlm: sparse_token_list needs at least one entry")
            for i, k in enumerate(self.sparse_token_list):
                check_int(f"sparse_token_list[{i}]", k, 1)
            if list(self.sparse_token_list) != sorted(self.sparse_token_list, reverse=True):
                raise ConfigError(f"sparsevlm: sparse_token_list must not increase, got {self.sparse_token_list}")
            if self.retained_tokens is not None:
                raise ConfigError("sparsevlm: give sparse_token_list or retained_tokens, not both")
            if self.pruning_loc is not None and len(self.pruning_loc) != len(self.sparse_token_list):
                raise ConfigError("sparsevlm: pruning_loc and sparse_token_list need the same length")
        if self.retained_tokens is not None:
            check_choice("retained_tokens", self.retained_tokens, sorted(RETAINED_TOKENS))
            if self.pruning_loc is not None and len(self.pruning_loc) != 3:
                raise ConfigError("sparsevlm: retained_tokens gives three budgets; pruning_loc needs three layers")
        check_fraction("recycle_ratio", self.recycle_ratio)
        check_fraction("cluster_ratio", self.cluster_ratio, low_open=True)
        check_choice("positions", self.positions, ("original", "renumber"))


# ----------------------------------------------------------------------------------------- schedule
def default_layers(num_layers: int) -> tuple[int, ...]:
    """The authors' layers 2, 6, 15 of 32 as the same fractions of any depth, in [0, T - 2]."""
    if num_layers < 2:
        raise ConfigError(f"sparsevlm needs at least 2 decoder layers, the model has {num_layers}")
    return tuple(sorted({min(num_layers - 2, round(l * num_layers / PAPER_DEPTH)) for l in PAPER_LAYERS}))


def recycle_counts(pruned: int, recycle_ratio: float, cluster_ratio: float) -> tuple[int, int]:
    """(m, c): recycling candidates among `pruned` tokens and the clusters they are merged into."""
    if pruned <= 0 or recycle_ratio == 0:
        return 0, 0
    m = min(pruned, int(recycle_ratio * pruned) + 1)
    return m, min(m, int(cluster_ratio * m) + 1)


def alive_after(n: int, budgets, recycle_ratio: float, cluster_ratio: float) -> list[int]:
    """Visual tokens alive after each stage (top-k kept + recycled), from n and the top-k budgets."""
    alive, out = n, []
    for k in budgets:
        k = min(k, alive)
        alive = k + recycle_counts(alive - k, recycle_ratio, cluster_ratio)[1]
        out.append(alive)
    return out


def average_tokens(n: int, alive: list[int], layers: tuple[int, ...], num_layers: int) -> float:
    """Visual tokens per decoder layer, averaged: layers 0..l_1 see n, layers l_s+1..l_{s+1} see alive[s]."""
    bounds = tuple(layers) + (num_layers - 1,)
    total = (layers[0] + 1) * n + sum((bounds[s + 1] - bounds[s]) * a for s, a in enumerate(alive))
    return total / num_layers


@functools.lru_cache(maxsize=256)
def budgets_for_ratio(n: int, ratio: float, layers: tuple[int, ...], num_layers: int, recycle_ratio: float,
                      cluster_ratio: float) -> tuple[tuple[int, ...], float]:
    """(top-k budgets, lam): k_s = clamp(round(n lam^s), 1, alive), lam chosen (bisection) so the layer-averaged
    visual tokens are closest to (1 - ratio) n."""
    if ratio == 0 or n == 0:
        return tuple([n] * len(layers)), 1.0

    def budgets(lam):
        return [max(1, round(n * lam ** (s + 1))) for s in range(len(layers))]

    def avg(lam):
        return average_tokens(n, alive_after(n, budgets(lam), recycle_ratio, cluster_ratio), layers, num_layers)

    target = (1.0 - ratio) * n
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if avg(mid) >= target:
            hi = mid
        else:
            lo = mid
    lam = lo if abs(avg(lo) - target) < abs(avg(hi) - target) else hi
    alive = n
    out = []
    for k in budgets(lam):
        k = min(k, alive)
        out.append(k)
        alive = k + recycle_counts(alive - k, recycle_ratio, cluster_ratio)[1]
    return tuple(out), lam


# ----------------------------------------------------------------------------------------- selection rules
def select_raters(hidden: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Bool (B, Tq): the raters among the last Tq slots. `hidden` (B, L, d) LLM-input states, `visual` (B, L)
    bool, `text` (B, Tq) bool: which of the last Tq slots are question tokens. Device-side only."""
    Tq = text.shape[1]
    h = hidden.float()
    logits = h @ h[:, -Tq:].transpose(1, 2)  # (B, L, Tq): visual x question products
    logits = logits.masked_fill(~text[:, None, :], float("-inf"))
    m = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0) * visual[:, :, None]
    rel = m.sum(1) / visual.sum(1, keepdim=True).clamp_min(1)  # (B, Tq): mean over the visual rows
    mean = (rel * text).sum(1, keepdim=True) / text.sum(1, keepdim=True).clamp_min(1)
    raters = text & (rel > mean)
    return torch.where(raters.any(1, keepdim=True), raters, text)


def rater_scores(query, key, attention_mask, rater_rows: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, Lk): attention of the rater rows (bool (B, Tq) over the last Tq query rows) to every key, mean over
    heads and raters."""
    B, _, Lq, _ = query.shape
    Tq = rater_rows.shape[1]
    w = rater_rows.float()
    total = torch.zeros(B, key.shape[2], dtype=torch.float32, device=query.device)
    for start in range(0, Tq, ROW_CHUNK):
        stop = min(start + ROW_CHUNK, Tq)
        rows = torch.arange(Lq - Tq + start, Lq - Tq + stop, device=query.device)
        probs = attention_rows(query, key, attention_mask, rows, scaling)  # (B, Hkv, G, r, Lk)
        probs = probs.mean(dim=(1, 2))  # (B, r, Lk)
        total += (probs * w[:, start:stop, None]).sum(1)
    return total / w.sum(1, keepdim=True).clamp_min(1)


def density_peak_clusters(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN on the rows of `x` (m, d): (centers (c,) row indices, assignment (m,) in [0, c)). Ties: lower index
    first (higher density among equals; center order; nearest center). Device-side only."""
    m, d = x.shape
    x = x.float()
    sq = (x * x).sum(-1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0).sqrt() / math.sqrt(d)
    idx = torch.arange(m, device=x.device)
    dist = dist.masked_fill(idx[:, None] == idx[None, :], 0.0)
    nearest = torch.sort(dist, dim=-1).values[:, :c]  # itself (0) and its c - 1 nearest
    density = torch.exp(-(nearest ** 2).mean(-1))
    higher = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    delta = dist.masked_fill(~higher, float("inf")).amin(-1)
    delta = torch.where(torch.isinf(delta), dist.amax(), delta)
    centers = torch.sort(density * delta, descending=True, stable=True).indices[:c]
    assign = dist.index_select(1, centers).argmin(-1)
    assign = assign.index_copy(0, centers, torch.arange(c, device=x.device))
    return centers, assign


def merge_clusters(x: torch.Tensor, assign: torch.Tensor, c: int) -> torch.Tensor:
    """(c, d): the mean of each cluster's rows, in x's dtype."""
    onehot = torch.nn.functional.one_hot(assign, c).float()  # (m, c)
    sums = onehot.T @ x.float()
    return (sums / onehot.sum(0)[:, None].clamp_min(1)).to(x.dtype)


# ----------------------------------------------------------------------------------------- steps
@dataclasses.dataclass
class SparseVLMStats(PruningStats):
    pruning_loc: tuple[int, ...] = ()
    lambda_: float = float("nan")  # the solved lam (ratio mode), per the last prefill's first sample
    sparse_token_list: list[list[int]] = dataclasses.field(default_factory=list)  # top-k per stage, per sample
    stage_keep_counts: list[list[int]] = dataclasses.field(default_factory=list)  # alive after each stage
    recycled_counts: list[list[int]] = dataclasses.field(default_factory=list)  # recycled tokens per stage
    rater_mask: torch.Tensor | None = None  # (B, L) bool: the raters, original positions
    recycled_mask: torch.Tensor | None = None  # (B, L) bool: slots holding a recycled token after the last stage


class _Shared:
    """What the stages of one attachment share during a prefill."""

    def __init__(self, config: SparseVLMConfig, layers: tuple[int, ...], num_layers: int, host_values, ratio):
        self.config, self.layers, self.num_layers, self.host_values = config, layers, num_layers, host_values
        self.ratio = ratio  # the effective ratio (ratio mode)
        self.budgets: list[tuple[int, ...]] = []  # per sample
        self.lambda_ = float("nan")
        self.raters: torch.Tensor | None = None  # (B, L) original positions
        self.tq = 0
        self.recycled: torch.Tensor | None = None  # (B, L) original positions

    def plan(self, counts: list[int]) -> None:
        cfg = self.config
        self.budgets = []
        for n in counts:
            if cfg.sparse_token_list is not None:
                budgets = cfg.sparse_token_list
            elif cfg.retained_tokens is not None:
                budgets = tuple(max(1, round(k * n / PAPER_TOKENS)) for k in RETAINED_TOKENS[cfg.retained_tokens])
            else:
                budgets, lam = budgets_for_ratio(n, float(self.ratio), self.layers, self.num_layers,
                                                 float(cfg.recycle_ratio), float(cfg.cluster_ratio))
                if n:
                    self.lambda_ = lam
            self.budgets.append(tuple(budgets))

    def host_read(self, name: str, compute):
        return self.host_values.read(name, compute) if self.host_values is not None else compute()


class RaterStep(PruningStep):
    """At the input of layer 0: choose the raters (nothing is removed here)."""

    score_layer = None

    def __init__(self, shared: _Shared, stats: SparseVLMStats):
        self.shared, self.stats = shared, stats
        self.layer = 0
        self.mode = "inplace"
        self.positions = shared.config.positions
        self.graph_capture = True  # host reads: the question-token counts (prompt layout, through HostValues)
        self.method_name = "sparsevlm"

    def visual_positions(self, detected, B: int, L: int, device) -> torch.Tensor:
        if detected is None:
            if self.shared.config.allow_text_only:
                return torch.zeros(B, L, dtype=torch.bool, device=device)
            raise NoVisualTokensError("sparsevlm: no image or video tokens found (the model config names no image "
                                      "token id)")
        return detected

    def plan(self, visual: torch.Tensor, counts: list[int], real_lengths: list[int]) -> bool:
        if sum(counts) == 0 and not self.shared.config.allow_text_only:
            raise NoVisualTokensError("sparsevlm: no image or video tokens found in the prompt (pass "
                                      "allow_text_only=True to run such prompts unchanged)")
        sh = self.shared
        sh.plan(counts)
        sh.raters = sh.recycled = None
        st = self.stats
        st.num_visual, st.keep_count, st.kept_visual_mask, st.cache_lengths = list(counts), list(counts), visual, None
        st.sparse_token_list = [list(b) for b in sh.budgets]
        st.lambda_ = sh.lambda_
        cfg = sh.config
        # what the schedule predicts; each stage that runs overwrites its entry with what it did
        alive = [alive_after(n, b, cfg.recycle_ratio, cfg.cluster_ratio) for n, b in zip(counts, sh.budgets)]
        before = [[n] + a for n, a in zip(counts, alive)]
        st.stage_keep_counts = [[a[s] for a in alive] for s in range(len(sh.layers))]
        st.recycled_counts = [[a[s + 1] - min(b[s], a[s]) for a, b in zip(before, sh.budgets)]
                              for s in range(len(sh.layers))]
        st.rater_mask = st.recycled_mask = None
        return any(k < n for n, b in zip(counts, sh.budgets) for k in b)

    def finish(self, req: Request, cache_lengths) -> None:
        self.stats.cache_lengths = cache_lengths
        self.stats.prefills += 1

    def select(self, req: Request, hidden: torch.Tensor) -> StepResult:
        sh = self.shared
        visual = req.present_visual()
        Lcur = visual.shape[1]
        idx = torch.arange(Lcur, device=visual.device)
        last = torch.where(visual, idx, -1).amax(1, keepdim=True)
        text = req.valid & ~visual & (idx.unsqueeze(0) > last)
        n_text = sh.host_read("sparsevlm_question_tokens", lambda: text.sum(1).tolist())
        tq = max(1, max(n_text))
        tail = text[:, -tq:]
        if min(n_text) == 0:  # a prompt without question tokens: its last token rates
            none = device_bool([n == 0 for n in n_text], visual.device)
            last_only = torch.zeros_like(tail)
            last_only[:, -1] = True
            tail = torch.where(none[:, None], last_only, tail)
        raters = select_raters(hidden, visual, tail)
        full = torch.zeros_like(visual)
        full[:, -tq:] = raters
        sh.raters, sh.tq = _to_original(req, full, False), tq
        self.stats.rater_mask = sh.raters
        return StepResult(None, list(req.visual_counts))


def device_bool(values: list[bool], device) -> torch.Tensor:
    from ..core.device import device_ints

    return device_ints([int(v) for v in values], device).bool()


class StageStep(PruningStep):
    """Pruning stage s: scores from layer l_s's attention, removal (and recycling) at the input of l_s + 1."""

    def __init__(self, shared: _Shared, stats: SparseVLMStats, stage: int):
        self.shared, self.stats, self.stage = shared, stats, stage
        self.score_layer = shared.layers[stage]
        self.layer = self.score_layer + 1
        self.mode = "inplace"
        self.positions = shared.config.positions
        self.graph_capture = True  # every count is a host int fixed by the visual counts
        self.method_name = "sparsevlm"

    def plan(self, visual: torch.Tensor, counts: list[int], real_lengths: list[int]) -> bool:
        cfg = self.shared.config
        for n, b in zip(counts, self.shared.budgets):
            if not n:
                continue
            before = ([n] + alive_after(n, b, cfg.recycle_ratio, cfg.cluster_ratio))[self.stage]
            if min(b[self.stage], before) < before:
                return True
        return False

    def score(self, req: Request, module, query, key, attention_mask, kwargs) -> torch.Tensor:
        sh = self.shared
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        raters = (sh.raters.gather(1, req.kept) & req.valid)[:, -sh.tq:]
        return rater_scores(query, key, attention_mask, raters, scaling)

    def select(self, req: Request, hidden: torch.Tensor) -> StepResult:
        cfg = self.shared.config
        visual = req.present_visual()
        B = visual.shape[0]
        score = req.take_scores(self, "sparsevlm")
        counts = list(req.visual_counts)
        keep = torch.ones_like(visual)
        kept_vis = visual.clone()
        recycled = torch.zeros_like(visual)
        new_hidden = None
        alive, n_recycled = [], []
        for b in range(B):
            a = counts[b]
            k = min(self.shared.budgets[b][self.stage], a) if a else 0
            m, c = recycle_counts(a - k, cfg.recycle_ratio, cfg.cluster_ratio)
            alive.append(k + c)
            n_recycled.append(c)
            if k >= a:
                continue
            pos = _true_positions(visual[b], a)
            order = pos.index_select(0, torch.sort(score[b].index_select(0, pos), descending=True,
                                                   stable=True).indices)
            row = torch.zeros_like(visual[b]).index_fill_(0, order[:k], True)
            if c:
                cand = order[k:k + m]
                states = hidden[b].index_select(0, cand)
                centers, assign = density_peak_clusters(states, c)
                slots = cand.index_select(0, centers)
                if new_hidden is None:
                    new_hidden = hidden.clone()
                new_hidden[b].index_copy_(0, slots, merge_clusters(states, assign, c))
                row.index_fill_(0, slots, True)
                recycled[b].index_fill_(0, slots, True)
            keep[b] = ~visual[b] | row
            kept_vis[b] = row
        # recycled tokens of earlier stages that survive stay marked
        prev = self.shared.recycled
        recycled_orig = _to_original(req, recycled, False)
        if prev is not None:
            recycled_orig = recycled_orig | (prev & _to_original(req, kept_vis, False))
        self.shared.recycled = recycled_orig
        st = self.stats
        st.num_visual = list(req.prompt_visual_counts)
        st.keep_count = list(alive)
        st.kept_visual_mask = _to_original(req, kept_vis, False)
        st.recycled_mask = recycled_orig
        st.stage_keep_counts[self.stage] = list(alive)
        st.recycled_counts[self.stage] = n_recycled
        return StepResult(keep, alive, new_hidden)

    def finish(self, req: Request, cache_lengths) -> None:
        pass  # the rater step records the prefill


class AttachedSparseVLM:
    def __init__(self, model, adapter, config: SparseVLMConfig):
        T = adapter.num_layers
        if adapter.sliding_window_layers():
            raise NotImplementedError("sparsevlm on models with sliding-window layers is not supported")
        if config.positions == "renumber" and adapter.uses_mrope:
            raise ConfigError("positions='renumber' is not defined for M-RoPE models (Qwen2-VL family)")
        layers = config.pruning_loc if config.pruning_loc is not None else default_layers(T)
        if layers[-1] > T - 2:
            raise ConfigError(f"sparsevlm: pruning_loc entries must be in [0, {T - 2}] for this model ({T} decoder "
                              f"layers; tokens leave at the input of the next layer), got {layers}")
        if config.sparse_token_list is not None and len(config.sparse_token_list) != len(layers):
            raise ConfigError(f"sparsevlm: sparse_token_list needs one entry per pruning layer {layers}")
        if config.retained_tokens is not None and len(layers) != 3:
            raise ConfigError(f"sparsevlm: retained_tokens gives three budgets; this model's default pruning_loc "
                              f"is {layers}: give three layers in pruning_loc")
        ratio = config.ratio
        if config.sparse_token_list is None and config.retained_tokens is None:
            floor = (layers[0] + 1) / T
            if ratio is None:  # the default, capped at what shallow models can reach
                ratio = min(DEFAULT_RATIO, 1.0 - floor)
            elif 1.0 - ratio < floor:
                raise ConfigError(f"sparsevlm: ratio={ratio} is not reachable with pruning_loc={layers} on {T} "
                                  f"layers (every visual token stays up to layer {layers[0]}: at most "
                                  f"{1 - floor:.3f}); give an earlier pruning_loc")
        self.layers = layers
        self.stats = SparseVLMStats(pruning_loc=layers)
        self.shared = _Shared(config, layers, T, None, ratio)
        self.steps = [RaterStep(self.shared, self.stats)]
        self.steps += [StageStep(self.shared, self.stats, s) for s in range(len(layers))]
        if config.positions == "renumber":  # the fast path's slot decoder keeps the original positions
            for step in self.steps:
                step.fast_decode = False
                step.fast_decode_reason = "positions='renumber': the slot decoder keeps original positions"
        self.engine = None
        for step in self.steps:
            self.engine = PruningEngine.attach(model, adapter, step)
        self.shared.host_values = ModelContext.of(adapter).host_values

    def remove(self) -> None:
        for step in self.steps:
            self.engine.detach(step)


@register_method("sparsevlm", family="pruning", config_cls=SparseVLMConfig,
                 summary="SparseVLM: text raters score visual tokens at several layers; pruned tokens partly "
                         "recycled (clustered and merged)")
def attach_sparsevlm(model, adapter, config: SparseVLMConfig) -> AttachedSparseVLM:
    return AttachedSparseVLM(model, adapter, config)

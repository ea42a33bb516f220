"""Theoretical FLOPs accounting for visual-token pruning (FastV and peers). Spec: docs/token_pruning.md.

Three numbers are reported side by side; each has a fixed definition.

1. ``paper_eq5_*`` -- FastV paper Eq. 5, a MAC-style count per decoder layer with ``n`` tokens,
   hidden size ``d`` and FFN width ``m``::

       F(n) = 4*n*d^2 + 2*n^2*d + 2*n*d*m

   (Q/K/V/O as ``4nd^2`` with full multi-head widths, attention as ``2n^2d``, a two-matrix FFN, no LM head,
   no vision tower, prefill only). After pruning from layer ``K`` of ``T`` the per-layer average is
   ``[K*F(n) + (T-K)*F(n_hat)] / T``; the paper's "Flops(B)" column is this average in units of 1e9, and the
   reduction is ``1 - average / F(n)``. The published numbers are reproduced with ``n = prefix + N`` (text
   after the image ignored) and ``n_hat = n - (N - keep)`` (only image tokens leave); for the paper's own table
   ``n_hat = n - R*N`` is fractional, so :func:`paper_eq5` takes ``n_hat`` as a float.

2. ``exact_prefill_flops_*`` -- 2 x multiply-accumulates of one prefill forward on the real sequence
   ``n_total = prefix + N + text`` (all text included), per layer with ``n`` tokens::

       q and o projections   2 * n * d * (H * hd)            each
       k and v projections   2 * n * d * (H_kv * hd)         each (GQA widths)
       attention QK^T, AV    2 * H * hd * n^2 / 2            each (causal: half the square)
       MLP                   2 * n * d * m * (3 if gated_mlp (SwiGLU) else 2)

   plus the LM head ``2 * d * vocab`` on the last position only (when ``vocab > 0``). Norms, RoPE, softmax,
   activations, embeddings and the vision tower are not counted. Layers ``< K`` see ``n_total`` tokens,
   layers ``>= K`` see ``n_total - (N - keep)``. ``exact_ratio = pruned / baseline``.

3. ``equivalent_tokens`` -- visual tokens averaged over layers, as used by SparseVLM and later papers:
   ``(K*N + (T-K)*keep) / T`` (FastV K=2 keeping 144 of 576 over 32 layers gives 171).

Keep count (docs/token_pruning.md): ``keep = max(1, min(N, round(N * (1 - R))))`` for ``N > 0`` (Python ``round``,
ties to even) and ``0`` for ``N = 0``; an explicit ``keep`` overrides the rule.

Input errors raise :class:`mllm_efficiency.errors.ConfigError` (a ``ValueError``) naming the parameter.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from .config import to_int, to_ratio, to_real
from .errors import ConfigError

__all__ = [
    "LayerShape",
    "FlopsReport",
    "keep_count",
    "visual_keep_count",
    "paper_eq5_layer_flops",
    "paper_eq5",
    "exact_layer_flops",
    "exact_prefill_flops",
    "equivalent_tokens",
    "fastv_flops",
    "fastv_table",
]


# --------------------------------------------------------------------------------------------- validation
# --------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class LayerShape:
    """Shape of one decoder layer of the language model, plus the layer count and vocabulary size."""

    hidden: int  # d
    intermediate: int  # m (FFN width)
    num_layers: int  # T
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int = 0  # 0: no LM head counted
    gated_mlp: bool = True  # SwiGLU (gate, up, down) vs a two-matrix FFN

    def __post_init__(self) -> None:
        to_int("hidden", self.hidden, 1)
        to_int("intermediate", self.intermediate, 0)
        to_int("num_layers", self.num_layers, 1)
        to_int("num_heads", self.num_heads, 1)
        to_int("num_kv_heads", self.num_kv_heads, 1, self.num_heads)
        to_int("head_dim", self.head_dim, 1)
        to_int("vocab", self.vocab, 0)
        if not isinstance(self.gated_mlp, bool):
            raise ConfigError(f"gated_mlp must be a bool, got {self.gated_mlp!r}")

    @classmethod
    def from_config(cls, config: Any, *, gated_mlp: bool | None = None) -> "LayerShape":
        """Shape of the text decoder described by an HF config (text config, or a VLM config with a text part).

        ``head_dim`` comes from ``config.head_dim`` when set, else ``hidden // num_heads``;
        ``num_kv_heads`` from ``num_key_value_heads`` when set, else ``num_heads``. ``gated_mlp`` defaults to
        True (Llama/Qwen2/Mistral SwiGLU) unless the text config's ``model_type`` is a known two-matrix FFN
        family (GPT-2, OPT, ...); pass it explicitly to override.
        """
        if config is None:
            raise ConfigError("config must be a transformers config (or a dict), got None")
        if isinstance(config, dict):
            from types import SimpleNamespace

            config = SimpleNamespace(**config)
        get_text = getattr(config, "get_text_config", None)
        text = get_text() if callable(get_text) else getattr(config, "text_config", None) or config
        if isinstance(text, dict):
            from types import SimpleNamespace

            text = SimpleNamespace(**text)

        def first(*names: str, default: Any = None) -> Any:
            for name in names:
                value = getattr(text, name, None)
                if value is not None:
                    return value
            return default

        hidden = first("hidden_size", "n_embd", "d_model")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        heads = first("num_attention_heads", "n_head", "num_heads")
        if hidden is None or layers is None or heads is None:
            raise ConfigError(
                "config must define hidden_size, num_hidden_layers and num_attention_heads "
                f"(text config of type {type(text).__name__} lacks one of them)"
            )
        intermediate = first("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
        kv_heads = first("num_key_value_heads", "num_kv_heads", default=heads)
        head_dim = first("head_dim", default=None)
        if head_dim is None:
            head_dim = hidden // heads
        vocab = first("vocab_size", default=0)
        if gated_mlp is None:
            model_type = str(getattr(text, "model_type", "") or "")
            gated_mlp = model_type not in _TWO_MATRIX_FFN
        return cls(
            hidden=int(hidden),
            intermediate=int(intermediate),
            num_layers=int(layers),
            num_heads=int(heads),
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab=int(vocab),
            gated_mlp=bool(gated_mlp),
        )

    @classmethod
    def from_model(cls, model: Any, *, gated_mlp: bool | None = None) -> "LayerShape":
        """Shape from ``model.config``."""
        config = getattr(model, "config", None)
        if config is None:
            raise ConfigError(f"model must have a .config, got {type(model).__name__}")
        return cls.from_config(config, gated_mlp=gated_mlp)


# families whose FFN is up -> act -> down (two matrices)
_TWO_MATRIX_FFN = frozenset({"gpt2", "gpt_neox", "gptj", "opt", "phi", "starcoder2", "bloom", "falcon", "mpt"})


# --------------------------------------------------------------------------------------------- keep rule
def visual_keep_count(num_visual: int, ratio: float) -> int:
    """Token pruning's keep rule (docs/token_pruning.md): visual tokens kept, N * (1 - R) rounded to the nearest
    integer, ``max(1, min(N, round(N * (1 - R))))`` for N > 0, else 0. KV compression floors instead
    (`kv.primitives.prompt_keep_count`): a different rule for a different quantity."""
    n = to_int("num_visual", num_visual, 0)
    r = to_ratio(ratio)
    if n == 0:
        return 0
    return max(1, min(n, round(n * (1.0 - r))))


keep_count = visual_keep_count  # the name the FLOPs API has always exported


# --------------------------------------------------------------------------------------------- paper Eq. 5
def paper_eq5_layer_flops(n: float, d: float, m: float) -> float:
    """FastV Eq. 5 for one layer: ``F(n) = 4*n*d^2 + 2*n^2*d + 2*n*d*m`` (``n`` may be fractional)."""
    n = to_real("n", n, 0.0)
    d = to_real("d", d, 0.0)
    m = to_real("m", m, 0.0)
    return 4.0 * n * d * d + 2.0 * n * n * d + 2.0 * n * d * m


def paper_eq5(num_layers: int, k: int, n: float, n_hat: float, d: float, m: float) -> dict:
    """Eq. 5 layer-averaged FLOPs with pruning from layer ``k`` of ``num_layers``.

    Returns ``{"baseline": F(n), "pruned": [k*F(n) + (T-k)*F(n_hat)]/T, "ratio": pruned/baseline,
    "reduction": 1 - ratio}``. ``n_hat`` may be fractional (the paper uses ``n - R*576``).
    """
    t = to_int("num_layers", num_layers, 1)
    k = to_int("k", k, 0, t - 1)
    n = to_real("n", n, 0.0)
    n_hat = to_real("n_hat", n_hat, 0.0)
    if n_hat > n:
        raise ConfigError(f"n_hat must be <= n (pruning never adds tokens), got n_hat={n_hat}, n={n}")
    d = to_real("d", d, 0.0)
    if d <= 0:
        raise ConfigError(f"d must be > 0, got {d}")
    m = to_real("m", m, 0.0)
    full = paper_eq5_layer_flops(n, d, m)
    pruned_layer = paper_eq5_layer_flops(n_hat, d, m)
    pruned = (k * full + (t - k) * pruned_layer) / t
    ratio = pruned / full if full > 0 else 1.0
    return {"baseline": full, "pruned": pruned, "ratio": ratio, "reduction": 1.0 - ratio}


# --------------------------------------------------------------------------------------------- exact count
def exact_layer_flops(shape: LayerShape, n: int) -> float:
    """2 x MACs of one decoder layer on ``n`` tokens in a causal prefill (definition in the module docstring)."""
    n = to_int("n", n, 0)
    d = shape.hidden
    q_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    proj = 2.0 * n * d * (2 * q_width + 2 * kv_width)  # q, o + k, v
    attn = 2 * (2.0 * q_width * n * n / 2.0)  # QK^T and AV, causal half
    mlp = 2.0 * n * d * shape.intermediate * (3 if shape.gated_mlp else 2)
    return proj + attn + mlp


def _lm_head_flops(shape: LayerShape) -> float:
    return 2.0 * shape.hidden * shape.vocab if shape.vocab > 0 else 0.0


def exact_prefill_flops(shape: LayerShape, n_total: int, k: int | None = None, n_pruned: int | None = None) -> float:
    """Prefill FLOPs of the whole decoder: layers ``< k`` on ``n_total`` tokens, layers ``>= k`` on ``n_pruned``.

    With ``k=None`` (or ``n_pruned=None``) every layer sees ``n_total`` tokens. Includes the LM head on the
    last position when ``shape.vocab > 0``.
    """
    t = shape.num_layers
    n_total = to_int("n_total", n_total, 0)
    if k is None or n_pruned is None:
        k, n_pruned = t, n_total
    else:
        k = to_int("k", k, 0, t - 1)
        n_pruned = to_int("n_pruned", n_pruned, 0, n_total)
    return k * exact_layer_flops(shape, n_total) + (t - k) * exact_layer_flops(shape, n_pruned) + _lm_head_flops(shape)


def equivalent_tokens(num_layers: int, k: int, num_visual: int, keep: int) -> float:
    """Visual tokens averaged over layers: ``(k*N + (T-k)*keep) / T``."""
    t = to_int("num_layers", num_layers, 1)
    k = to_int("k", k, 0, t - 1)
    n = to_int("num_visual", num_visual, 0)
    keep = to_int("keep", keep, 0, n)
    return (k * n + (t - k) * keep) / t


# --------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one FastV setting; see the module docstring for each definition. Raw FLOPs (not 1e9 units)."""

    k: int
    ratio: float
    keep: int
    num_visual: int
    num_layers: int
    prefix_len: int
    text_len: int
    # paper Eq. 5 (per-layer average, n = prefix + N, text ignored)
    paper_eq5_n: int
    paper_eq5_n_hat: int
    paper_eq5_baseline: float
    paper_eq5_pruned: float
    paper_eq5_ratio: float
    # exact prefill (whole model, full sequence)
    n_total: int
    n_pruned: int
    exact_layer_flops_full: float
    exact_layer_flops_pruned: float
    lm_head_flops: float
    exact_prefill_flops_baseline: float
    exact_prefill_flops_pruned: float
    exact_ratio: float
    # layer-averaged visual tokens
    equivalent_tokens: float

    @property
    def paper_eq5_reduction(self) -> float:
        return 1.0 - self.paper_eq5_ratio

    @property
    def exact_reduction(self) -> float:
        return 1.0 - self.exact_ratio

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["paper_eq5_reduction"] = self.paper_eq5_reduction
        out["exact_reduction"] = self.exact_reduction
        return out

    def describe(self) -> str:
        return (
            f"FastV K={self.k} R={self.ratio:g}: keep {self.keep}/{self.num_visual} visual tokens "
            f"({self.equivalent_tokens:.1f} equivalent over {self.num_layers} layers); "
            f"paper Eq.5 {self.paper_eq5_pruned / 1e9:.2f}/{self.paper_eq5_baseline / 1e9:.2f} GFLOPs per layer "
            f"(ratio {self.paper_eq5_ratio:.3f}); exact prefill {self.exact_prefill_flops_pruned / 1e12:.3f}/"
            f"{self.exact_prefill_flops_baseline / 1e12:.3f} TFLOPs (ratio {self.exact_ratio:.3f})"
        )


def fastv_flops(
    shape: LayerShape,
    prefix_len: int,
    num_visual: int,
    text_len: int,
    k: int,
    ratio: float,
    keep: int | None = None,
) -> FlopsReport:
    """FLOPs report for FastV pruning from layer ``k`` dropping fraction ``ratio`` of ``num_visual`` tokens.

    ``prefix_len`` tokens precede the visual span and ``text_len`` follow it. ``keep`` overrides the keep rule
    (``ratio`` is then only validated and recorded).
    """
    if not isinstance(shape, LayerShape):
        raise ConfigError(f"shape must be a LayerShape, got {type(shape).__name__}")
    t = shape.num_layers
    prefix_len = to_int("prefix_len", prefix_len, 0)
    num_visual = to_int("num_visual", num_visual, 0)
    text_len = to_int("text_len", text_len, 0)
    k = to_int("k", k, 0, t - 1)
    ratio = to_ratio(ratio)
    if keep is None:
        keep = visual_keep_count(num_visual, ratio)
    else:
        keep = to_int("keep", keep, 0, num_visual)
    n_total = prefix_len + num_visual + text_len
    if n_total == 0:
        raise ConfigError("prefix_len + num_visual + text_len must be > 0 (empty sequence)")
    dropped = num_visual - keep

    n_paper = prefix_len + num_visual
    n_hat = n_paper - dropped
    if n_paper > 0:
        eq5 = paper_eq5(t, k, n_paper, n_hat, shape.hidden, shape.intermediate)
    else:  # text-only prompt: Eq. 5 has nothing to count
        eq5 = {"baseline": 0.0, "pruned": 0.0, "ratio": 1.0}

    n_pruned = n_total - dropped
    base = exact_prefill_flops(shape, n_total)
    pruned = exact_prefill_flops(shape, n_total, k, n_pruned)
    return FlopsReport(
        k=k,
        ratio=ratio,
        keep=keep,
        num_visual=num_visual,
        num_layers=t,
        prefix_len=prefix_len,
        text_len=text_len,
        paper_eq5_n=n_paper,
        paper_eq5_n_hat=n_hat,
        paper_eq5_baseline=eq5["baseline"],
        paper_eq5_pruned=eq5["pruned"],
        paper_eq5_ratio=eq5["ratio"],
        n_total=n_total,
        n_pruned=n_pruned,
        exact_layer_flops_full=exact_layer_flops(shape, n_total),
        exact_layer_flops_pruned=exact_layer_flops(shape, n_pruned),
        lm_head_flops=_lm_head_flops(shape),
        exact_prefill_flops_baseline=base,
        exact_prefill_flops_pruned=pruned,
        exact_ratio=pruned / base,
        equivalent_tokens=equivalent_tokens(t, k, num_visual, keep),
    )


def fastv_table(
    shape: LayerShape,
    prefix_len: int,
    num_visual: int,
    ks: Iterable[int],
    ratios: Iterable[float],
    text_len: int = 0,
) -> list[dict]:
    """One row per (k, ratio), k outer: the report's :meth:`FlopsReport.as_dict` plus Eq. 5 in GFLOPs.

    Extra keys: ``paper_eq5_baseline_gflops`` / ``paper_eq5_pruned_gflops`` (per-layer average / 1e9, the
    paper's "Flops(B)") and ``exact_prefill_tflops_baseline`` / ``exact_prefill_tflops_pruned`` (/ 1e12).
    """
    ks = list(ks)
    ratios = list(ratios)
    if not ks:
        raise ConfigError("ks must list at least one layer index")
    if not ratios:
        raise ConfigError("ratios must list at least one ratio")
    rows = []
    for k in ks:
        for ratio in ratios:
            rep = fastv_flops(shape, prefix_len, num_visual, text_len, k, ratio)
            row = rep.as_dict()
            row["paper_eq5_baseline_gflops"] = rep.paper_eq5_baseline / 1e9
            row["paper_eq5_pruned_gflops"] = rep.paper_eq5_pruned / 1e9
            row["exact_prefill_tflops_baseline"] = rep.exact_prefill_flops_baseline / 1e12
            row["exact_prefill_tflops_pruned"] = rep.exact_prefill_flops_pruned / 1e12
            rows.append(row)
    return rows

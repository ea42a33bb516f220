"""Focus's options (docs/video.md, "focus"): one frozen, validated config; `sic_mode="off"` is the one spelling of
SEC only (`sec_only=True` is accepted with a DeprecationWarning)."""
from __future__ import annotations

import dataclasses
import warnings

from ...config import (MethodConfig, check_bool, check_choice, check_int, check_similarity, check_unit_fraction,
                       is_number)
from ...errors import ConfigError
from .. import dedup_kernels as DK
from ..ratio import check_optional_ratio, explicit_note, unreachable

PAPER_LAYERS = (2, 5, 8, 16, 25)  # Focus's schedule for Qwen2.5-VL-7B's 28 layers
PAPER_ALPHAS = (0.4, 0.3, 0.2, 0.15, 0.1)
PAPER_NUM_LAYERS = 28

GEMMS = ("q_proj", "query", "o_proj", "gate_proj", "down_proj")
MLP_GEMMS = ("gate_proj", "down_proj")
DEDUP_GEMMS = ("q_proj", "o_proj", "gate_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class FocusConfig(MethodConfig):
    # None: the paper's (2, 5, 8, 16, 25) and (0.4, 0.3, 0.2, 0.15, 0.1), or, with `ratio`, a schedule solved for
    # it on the model at attach time (`ratio_schedule`)
    selected_layers: tuple | None = None
    alpha_list: tuple | None = None
    similarity_threshold: float = 0.9
    vector_size: int | None = None  # None: 32 (emulate) / full width (token_dedup); 0 = full width
    block_size: int | None = None  # S of the T x S x S block; None: 2 (emulate) / 1 (token_dedup)
    frame_block_size: int = 2  # T
    gemm_m_size: int = 1024  # unpruned tokens per M-tile; -1 = one tile
    sic_mode: str = "emulate"
    gemms: tuple = GEMMS
    mask_row_wrap: bool = False
    min_dedup_fraction: float = 0.15  # token_dedup: duplicate-row fraction below which GEMMs run dense
    fused_kernels: bool | None = None  # token_dedup: Triton matching / group means (None: on CUDA with Triton)
    whole_mlp: bool = False  # token_dedup: the gate/up groups carry through the MLP (down_proj not matched)
    min_dedup_rows: int = 0  # token_dedup: GEMM inputs with fewer rows run dense, unmatched
    dedup_stages: str = "each"  # token_dedup: "each" stage decides for itself; "until_dense": none after a dense one
    placement: str = "mid_layer"
    frames: int | None = None  # frame count when the processor's grid information is not available
    record_trace: bool = False
    allow_text_only: bool = False
    ratio: float | None = None  # fraction of visual tokens removed, layer-averaged: solves the alpha schedule

    def validate(self) -> None:
        check_optional_ratio(self.ratio)
        object.__setattr__(self, "_ratio_note", explicit_note(
            "focus", self.ratio, ["alpha_list"] if self.alpha_list is not None else []))
        if self.ratio is None or self.alpha_list is not None:  # the paper's schedule wherever one is missing
            if self.selected_layers is None:
                object.__setattr__(self, "selected_layers", PAPER_LAYERS)
            if self.alpha_list is None:
                object.__setattr__(self, "alpha_list", PAPER_ALPHAS)
        if self.selected_layers is not None:
            object.__setattr__(self, "selected_layers", tuple(self.selected_layers))
        if self.alpha_list is not None:
            object.__setattr__(self, "alpha_list", tuple(self.alpha_list))
        object.__setattr__(self, "gemms", tuple(self.gemms))
        if self.selected_layers is None or self.alpha_list is None:  # ratio: solved at attach time
            for i, layer in enumerate(self.selected_layers or ()):
                check_int(f"selected_layers[{i}]", layer, 0)
            self._validate_rest()
            return
        if len(self.selected_layers) != len(self.alpha_list):
            raise ConfigError(f"selected_layers and alpha_list must have the same length, got "
                              f"{len(self.selected_layers)} and {len(self.alpha_list)}")
        for i, layer in enumerate(self.selected_layers):
            check_int(f"selected_layers[{i}]", layer, 0)
        if list(self.selected_layers) != sorted(set(self.selected_layers)):
            raise ConfigError(f"selected_layers must be strictly increasing, got {list(self.selected_layers)}")
        for i, a in enumerate(self.alpha_list):
            check_unit_fraction(f"alpha_list[{i}]", a)
        self._validate_rest()

    def _validate_rest(self) -> None:
        check_similarity("similarity_threshold", self.similarity_threshold)
        if self.vector_size is not None:
            check_int("vector_size", self.vector_size, 0)
        if self.block_size is not None:
            check_int("block_size", self.block_size, 1, 8)
        check_int("frame_block_size", self.frame_block_size, 1, 8)
        if (self.block_size or 2) == 1 and self.frame_block_size == 1:
            raise ConfigError("block_size=1 with frame_block_size=1 leaves no neighbour to match: "
                              "use a T x S x S block with T >= 2 or S >= 2")
        f = self.min_dedup_fraction
        if not is_number(f) or not (0.0 <= float(f) <= 1.0):
            raise ConfigError(f"min_dedup_fraction must be in [0, 1], got {f!r}")
        if self.gemm_m_size != -1:
            check_int("gemm_m_size", self.gemm_m_size, 1)
        check_choice("sic_mode", self.sic_mode, ("emulate", "token_dedup", "off"))
        check_choice("placement", self.placement, ("mid_layer", "next_layer"))
        check_choice("dedup_stages", self.dedup_stages, ("each", "until_dense"))
        for g in self.gemms:
            check_choice("gemms", g, GEMMS)
        if self.frames is not None:
            check_int("frames", self.frames, 1)
        if self.fused_kernels not in (None, True, False):
            raise ConfigError(f"fused_kernels must be None (auto), True or False, got {self.fused_kernels!r}")
        check_int("min_dedup_rows", self.min_dedup_rows, 0)
        if self.whole_mlp and (self.sic_mode != "token_dedup" or "gate_proj" not in self.gemms):
            raise ConfigError("whole_mlp needs sic_mode='token_dedup' with 'gate_proj' in gemms, got "
                              f"sic_mode={self.sic_mode!r}, gemms={list(self.gemms)}")
        if self.fused_kernels and DK.triton is None:
            raise ConfigError("fused_kernels=True needs Triton (pip install triton); use None (auto) or False")

    @classmethod
    def from_kwargs(cls, method: str, **kwargs) -> "FocusConfig":
        """`sec_only=True` is the deprecated spelling of `sic_mode="off"`."""
        if "sec_only" in kwargs:
            sec_only = kwargs.pop("sec_only")
            check_bool("sec_only", sec_only)
            warnings.warn(f'{method}: sec_only is deprecated; use sic_mode="off"', DeprecationWarning, stacklevel=3)
            if sec_only:
                if kwargs.get("sic_mode", "off") != "off":
                    raise ConfigError(f"{method}: sec_only=True contradicts sic_mode={kwargs['sic_mode']!r}; "
                                      'use sic_mode="off" alone')
                kwargs["sic_mode"] = "off"
        return super().from_kwargs(method, **kwargs)

    @property
    def sic_on(self) -> bool:
        return self.sic_mode != "off"

    @property
    def vector(self) -> int:
        if self.vector_size is not None:
            return self.vector_size
        return 32 if self.sic_mode == "emulate" else 0

    @property
    def block(self) -> int:
        if self.block_size is not None:
            return self.block_size
        return 2 if self.sic_mode == "emulate" else 1

    @property
    def active_gemms(self) -> tuple:
        if self.sic_mode == "token_dedup":
            return tuple(g for g in self.gemms if g in DEDUP_GEMMS)
        return self.gemms


def schedule_removed(layers, alphas, num_layers: int) -> float:
    """Layer-averaged fraction of the visual tokens SEC removes (fractions, before the keep counts' rounding):
    layers 0..s_1 compute every token, layers after stage i the smallest alpha so far."""
    total, keep, prev = 0.0, 1.0, -1
    for s, a in zip(layers, alphas):
        total += (s - prev) * keep
        keep, prev = min(keep, a), s
    total += (num_layers - 1 - prev) * keep
    return 1.0 - total / num_layers


def ratio_schedule(ratio: float, num_layers: int, layers=None) -> tuple[tuple, tuple, str | None]:
    """(selected_layers, alpha_list, note) removing `ratio` of the visual tokens averaged over `num_layers`.

    Layers: the given ones, else the paper's scaled to the model (l * T / 28 rounded, at most T - 2, duplicates
    merged; the first moves to layer 0 when the scaled one leaves less than 0.05 above `ratio`). Alphas: c times a geometric
    shape from 0.4 to 0.1 over the stages (the paper's endpoints), c solved by bisection; `note` says when even the
    smallest keep (one token) cannot reach `ratio` (layers 0..s_1 compute every token)."""
    T = num_layers
    derived = layers is None
    if derived:
        layers = tuple(sorted({min(T - 2, round(l * T / PAPER_NUM_LAYERS)) for l in PAPER_LAYERS}))
        if schedule_removed(layers, [0.0] * len(layers), T) < ratio + 0.05 and layers[0] > 0:  # room for rounding
            layers = tuple(sorted({0, *layers[1:]}))
    layers = tuple(layers)
    m = len(layers)
    shape = [0.4 * (0.1 / 0.4) ** (i / (m - 1)) if m > 1 else 0.4 for i in range(m)]
    floor = 1e-6  # (0, 1]: the keep count's max(1, ...) keeps one token at least

    def alphas(c):
        return tuple(min(1.0, max(floor, c * a)) for a in shape)

    best = schedule_removed(layers, alphas(0.0), T)
    note = None
    if ratio > best + 1e-4:
        note = unreachable("focus", ratio, best, "this model", f"layers 0..{layers[0]} before the first selected layer compute "
                                                 f"every visual token, of {T} layers")
        return layers, alphas(0.0), note
    lo, hi = 0.0, 1.0 / min(shape)
    for _ in range(60):
        mid = (lo + hi) / 2
        if schedule_removed(layers, alphas(mid), T) > ratio:
            lo = mid
        else:
            hi = mid
    return layers, alphas((lo + hi) / 2), note


def resolve_ratio(config: "FocusConfig", num_layers: int) -> tuple["FocusConfig", str | None]:
    """The config with its schedule filled for this model (unchanged when it has one), and the ratio note."""
    note = getattr(config, "_ratio_note", None)
    if config.alpha_list is not None:
        return config, note
    layers, alphas, why = ratio_schedule(float(config.ratio), num_layers, config.selected_layers)
    resolved = dataclasses.replace(config, selected_layers=layers, alpha_list=alphas)
    object.__setattr__(resolved, "_ratio_note", why or note)
    return resolved, why or note

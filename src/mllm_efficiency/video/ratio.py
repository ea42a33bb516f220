"""RATIO for the video methods: `ratio` = fraction of the visual tokens removed, averaged over the LLM's decoder
layers the way the FLOPs are counted (`flops.equivalent_tokens`: visual tokens each layer computes, summed over
layers, over T * N). Each method maps it to its own budget (docs/video.md, "RATIO"); its budget parameter, when
given, wins (the stats say so in `ratio_note`). Every method reports `stats.removed_fraction` (sample 0 of the
last prefill), measured the same way."""
from __future__ import annotations

import warnings

from ..config import check_ratio


def check_optional_ratio(value) -> None:
    if value is not None:
        check_ratio("ratio", value)


def explicit_note(method: str, ratio, explicit: list[str]) -> str | None:
    """The note a config keeps when `ratio` comes with the method's own budget parameters (those win)."""
    if ratio is None or not explicit:
        return None
    return (f"{method}: ratio={ratio:g} ignored: the explicit {', '.join(explicit)} set(s) the budget "
            "(method-specific parameters win)")


def layer_removed_fraction(per_layer: list[int], num_visual: int, num_layers: int) -> float | None:
    """1 - sum(visual tokens computed by each layer) / (T * N); layers without a record count as unpruned."""
    if not num_visual or num_layers <= 0:
        return None
    counts = list(per_layer[:num_layers]) + [num_visual] * max(0, num_layers - len(per_layer))
    return 1.0 - sum(counts) / (num_layers * num_visual)


def unreachable(method: str, ratio: float, reachable: float, where: str, why: str) -> str:
    """The note (also warned once) when `ratio` exceeds what the method can remove on this prompt."""
    note = (f"{method}: ratio={ratio:g} cannot be reached on {where}: at most {reachable:.3f} of the visual "
            f"tokens can be removed ({why})")
    warnings.warn(note, stacklevel=3)
    return note

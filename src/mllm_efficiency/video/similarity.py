"""Similarity concentration (Focus levels 2+3, VIDEO.md section 3): vector-wise matching of a GEMM input
against its causal spatio-temporal neighbours, grouping, group means; and the token-level fast path
(gather unique rows -> dense GEMM -> scatter).

Everything works on one token grid `x` of shape (N, width), rows in grid order (frame, row, column), pruned
tokens as all-zero rows. A vector is a `vector_size`-wide channel slice of one token.
"""
from __future__ import annotations

import dataclasses

import torch

ZERO_CODE = 255  # lean-trace code of an all-zero vector


def neighbour_offsets(frame_block: int, block: int) -> list[tuple[int, int, int]]:
    """(dt, dh, dw) candidates in the fixed order of the spec: for 2x2x2 left, up, up-left, prev-same,
    prev-left, prev-up, prev-up-left."""
    return [(dt, dh, dw) for dt in range(frame_block) for dh in range(block) for dw in range(block)
            if (dt, dh, dw) != (0, 0, 0)]


@dataclasses.dataclass
class Matching:
    """Result of matching one grid: per (token, vector)."""

    code: torch.Tensor  # uint8 (N, n_vec): 0 unique, 1..K chosen offset, 255 all-zero
    root: torch.Tensor  # long (N, n_vec): grid token index of the group root (own index if unique)
    n_vec: int

    @property
    def similar(self) -> torch.Tensor:
        return (self.code > 0) & (self.code != ZERO_CODE)

    @property
    def zero(self) -> torch.Tensor:
        return self.code == ZERO_CODE

    def sparsity(self) -> float:
        return float((self.code > 0).float().mean()) if self.code.numel() else 0.0


def tile_ids(alive: torch.Tensor, m_size: int) -> torch.Tensor:
    """M-tile of every grid token: consecutive ranges holding `m_size` unpruned tokens each (-1: one tile)."""
    if m_size < 0:
        return torch.zeros_like(alive, dtype=torch.long)
    before = torch.cumsum(alive.long(), 0) - alive.long()
    return before // m_size


def match_vectors(x: torch.Tensor, frames: int, height: int, width: int, *, vector_size: int, threshold: float,
                  frame_block: int, block: int, m_size: int = -1, mask_row_wrap: bool = False) -> Matching:
    """Match every vector of the grid `x` (N = frames*height*width rows) to its best causal neighbour.

    Offsets are applied on the flattened grid with zero fill; without `mask_row_wrap` a "left" of column 0
    is the previous row's last token (as the reference). Candidates in another M-tile are masked. A vector is
    similar when its best cosine is strictly greater than `threshold`; ties pick the first offset in order.
    """
    N, C = x.shape
    if N != frames * height * width:
        raise ValueError(f"grid of {frames}x{height}x{width} tokens does not match {N} rows")
    vs = C if vector_size <= 0 else vector_size
    n_vec = -(-C // vs)
    xf = x.float()
    if n_vec * vs != C:
        xf = torch.nn.functional.pad(xf, (0, n_vec * vs - C))
    v = xf.view(N, n_vec, vs)
    norm = v.norm(dim=-1)  # (N, n_vec)
    zero = norm == 0
    alive = ~(x == 0).all(dim=1)
    tiles = tile_ids(alive, m_size)
    idx = torch.arange(N, device=x.device)
    t_of, r_of, c_of = idx // (height * width), (idx // width) % height, idx % width
    offsets = neighbour_offsets(frame_block, block)
    best = torch.zeros(N, n_vec, device=x.device)
    choice = torch.zeros(N, n_vec, dtype=torch.long, device=x.device)
    for k, (dt, dh, dw) in enumerate(offsets):
        o = dt * height * width + dh * width + dw
        src = idx - o
        ok = src >= 0
        if mask_row_wrap:
            ok &= (c_of >= dw) & (r_of >= dh) & (t_of >= dt)
        srcc = src.clamp_min(0)
        ok &= tiles[srcc] == tiles
        cand, cnorm = v[srcc], norm[srcc]
        dot = (v * cand).sum(-1)
        denom = norm * cnorm
        # clamped to 1 so that rounding never makes threshold 1.0 match
        cos = torch.where((denom > 0) & ok[:, None], (dot / denom.clamp_min(1e-30)).clamp_max(1.0),
                          torch.zeros_like(dot))
        better = cos > best
        best = torch.where(better, cos, best)
        choice = torch.where(better, torch.full_like(choice, k + 1), choice)
    similar = (best > threshold) & ~zero
    code = torch.where(similar, choice, torch.zeros_like(choice))
    code = torch.where(zero, torch.full_like(code, ZERO_CODE), code).to(torch.uint8)
    return Matching(code, roots_from_codes(code, offsets, height, width), n_vec)


def roots_from_codes(code: torch.Tensor, offsets, height: int, width: int) -> torch.Tensor:
    """Group root (grid token index) of every vector, by pointer jumping from the neighbour codes."""
    N, n_vec = code.shape
    flat = torch.tensor([0] + [dt * height * width + dh * width + dw for dt, dh, dw in offsets], device=code.device)
    c = code.long()
    similar = (c > 0) & (c != ZERO_CODE)
    step = flat[torch.where(similar, c, torch.zeros_like(c))]
    ptr = torch.arange(N, device=code.device)[:, None] - step  # (N, n_vec) token index pointed at
    col = torch.arange(n_vec, device=code.device)[None, :].expand(N, -1)
    while True:
        nxt = ptr[ptr, col]
        if torch.equal(nxt, ptr):
            return ptr
        ptr = nxt


def group_mean(x: torch.Tensor, m: Matching, vector_size: int) -> torch.Tensor:
    """Replace every vector (root included) by its group's mean, accumulated in fp32, cast back."""
    N, C = x.shape
    vs = C if vector_size <= 0 else vector_size
    n_vec = m.n_vec
    xf = x.float()
    if n_vec * vs != C:
        xf = torch.nn.functional.pad(xf, (0, n_vec * vs - C))
    v = xf.view(N, n_vec, vs)
    col = torch.arange(n_vec, device=x.device)[None, :].expand(N, -1)
    key = (m.root * n_vec + col).reshape(-1)
    sums = torch.zeros(N * n_vec, vs, device=x.device).index_add_(0, key, v.reshape(-1, vs))
    counts = torch.zeros(N * n_vec, device=x.device).index_add_(0, key, torch.ones_like(key, dtype=torch.float))
    mean = (sums / counts.clamp_min(1)[:, None])[key].view(N, n_vec * vs)[:, :C]
    return mean.to(x.dtype)


# ----------------------------------------------------------------------------- token-level fast path
def token_roots(x: torch.Tensor, frames: int, height: int, width: int, *, threshold: float, frame_block: int,
                block: int, m_size: int = -1) -> torch.Tensor:
    """Root grid index of every token under whole-token matching (vector = full width)."""
    m = match_vectors(x, frames, height, width, vector_size=0, threshold=threshold, frame_block=frame_block,
                      block=block, m_size=m_size)
    return m.root[:, 0]


@dataclasses.dataclass
class DedupPlan:
    """Rows of a flattened (M, K) GEMM input: `unique` rows computed, `expand` maps every row to its result."""

    unique: torch.Tensor  # long (U,) row indices whose group means are computed
    expand: torch.Tensor  # long (M,) position in `unique` of every row's root
    root: torch.Tensor  # long (M,) root row of every row (own index for text / unique rows)

    @property
    def removed(self) -> int:
        return self.root.numel() - self.unique.numel()


def dedup_plan(root: torch.Tensor) -> DedupPlan:
    """From per-row roots (a root points at itself) build the gather/scatter plan."""
    M = root.numel()
    is_root = root == torch.arange(M, device=root.device)
    unique = is_root.nonzero().flatten()
    pos = torch.full((M,), -1, dtype=torch.long, device=root.device)
    pos[unique] = torch.arange(unique.numel(), device=root.device)
    return DedupPlan(unique, pos[root], root)


def group_means_rows(x2d: torch.Tensor, plan: DedupPlan) -> torch.Tensor:
    """(U, K): mean of each group's rows (fp32 accumulation, cast back)."""
    U = plan.unique.numel()
    sums = torch.zeros(U, x2d.shape[1], device=x2d.device, dtype=torch.float32).index_add_(0, plan.expand, x2d.float())
    counts = torch.bincount(plan.expand, minlength=U).clamp_min(1).to(torch.float32)
    return (sums / counts[:, None]).to(x2d.dtype)


def dedup_linear(linear: torch.nn.Module, x2d: torch.Tensor, plan: DedupPlan) -> torch.Tensor:
    """linear(group means) on the unique rows only, expanded to every row (= linear on the mean-replaced input)."""
    y = linear(group_means_rows(x2d, plan))
    return y.index_select(0, plan.expand)

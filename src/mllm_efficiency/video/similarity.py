"""Similarity concentration (Focus levels 2+3, docs/video.md): vector-wise matching of a GEMM input
against its causal spatio-temporal neighbours, grouping, group means; and the token-level fast path
(gather unique rows -> dense GEMM -> scatter).

Everything works on one token grid `x` of shape (N, width), rows in grid order (frame, row, column), pruned
tokens as all-zero rows. A vector is a `vector_size`-wide channel slice of one token. The token-level fast path
(`row_neighbours` + `match_rows`) gives the same whole-token matching directly on the current (pruned) rows of a
flattened GEMM input, without building the full grid.
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


@dataclasses.dataclass
class RowNeighbours:
    """Candidate rows of every row of a flattened (B * L) GEMM input under one kept set: structure only (no
    activations), so it is built once per SEC stage and shared by every GEMM point and layer until the next one.

    Equivalent to `match_vectors(vector_size=0)` on each sample's full token grid (pruned tokens as zero rows):
    a candidate that is pruned, outside the grid or masked (`mask_row_wrap`) is absent; the M-tile test, which
    depends on which rows are all-zero, is left to `match_rows`. Only the `P` rows that have a candidate at all
    are matched.
    """

    rows: torch.Tensor  # long (P,): flat rows with at least one candidate (ascending)
    cand: torch.Tensor  # long (P, K): flat row of their k-th candidate (spec order) or -1
    live: torch.Tensor  # bool (M,): unpruned grid tokens
    slot: torch.Tensor  # long (M,): b * (n_max + 1) + grid index (live rows; a dummy slot otherwise)
    base: torch.Tensor  # long (M,): slot of the first token of the row's grid
    n_slots: int
    jumps: int  # pointer-jumping rounds that resolve the longest possible chain
    n_grid: int  # grid tokens of the original grids, all samples (the denominator of the sparsity counts)
    tiled: bool  # False when no sample has more than `m_size` live tokens (tile masking cannot act)
    sample: torch.Tensor | None = None  # long (S,): evenly spread positions in `rows` (None: S = P, exact)


SAMPLE_ROWS = 512  # rows matched to estimate a GEMM input's duplicate fraction (`count_duplicates`)


@dataclasses.dataclass
class GridGeometry:
    """What the candidate tables of one prompt layout share whatever the kept set: per sample slot, the start,
    height and width of the grid holding it (on the device), built once per layout and device."""

    geo: torch.Tensor  # long (3, B, n_max + 1): grid start, height, width (the last column: a dummy slot)
    n_max: int
    n_grid: int
    longest: int  # the longest possible chain of candidate links (pointer jumping rounds needed)

    @classmethod
    def of(cls, grids, frame_block: int, block: int, device) -> "GridGeometry":
        sizes = [sum(g.size for g in row) for row in grids]
        n_max = max(sizes, default=0)
        W = n_max + 1
        geo = torch.zeros(3, len(grids), W, dtype=torch.long)
        geo[1:] = 1
        offsets = neighbour_offsets(frame_block, block)
        longest = 0
        for b, row in enumerate(grids):
            off = 0
            for g in row:
                geo[0, b, off:off + g.size] = off
                geo[1, b, off:off + g.size] = g.height
                geo[2, b, off:off + g.size] = g.width
                step = min(dt * g.height * g.width + dh * g.width + dw for dt, dh, dw in offsets)
                longest = max(longest, (g.size - 1) // step)  # chain edges go back >= `step` tokens
                off += g.size
        return cls(geo.to(device), n_max, sum(sizes), longest)


@dataclasses.dataclass
class RowCandidates:
    """The candidate table of a kept set before its compaction: every row's candidates and the two counts the
    compaction needs, still on the device (`counts`), so that their host read can share a synchronisation."""

    cand: torch.Tensor  # long (M, K): flat row of each row's k-th candidate or -1
    has: torch.Tensor  # bool (M,): rows with at least one candidate
    counts: torch.Tensor  # long (2,) on the device: [rows with a candidate (P), most live tokens of a sample]
    live: torch.Tensor
    slot: torch.Tensor
    base: torch.Tensor
    n_slots: int
    jumps: int
    n_grid: int

    def table(self, P: int, most: int, m_size: int) -> "RowNeighbours":
        """The compacted table, given `counts` read on the host (no sync)."""
        rows = _compact(self.has, torch.cumsum(self.has, 0) - 1, P)
        sample = (torch.arange(SAMPLE_ROWS, device=rows.device) * P) // SAMPLE_ROWS if P > SAMPLE_ROWS else None
        return RowNeighbours(rows, self.cand[rows], self.live, self.slot, self.base, self.n_slots, self.jumps,
                             self.n_grid, m_size >= 0 and most > m_size, sample)


def row_candidates(grid: torch.Tensor, alive: torch.Tensor, grids, *, frame_block: int, block: int,
                   mask_row_wrap: bool = False, geometry: GridGeometry | None = None) -> RowCandidates:
    """`row_neighbours` without its host sync (the compaction is `RowCandidates.table`)."""
    B, L = grid.shape
    dev = grid.device
    geom = geometry if geometry is not None else GridGeometry.of(grids, frame_block, block, dev)
    n_max, W = geom.n_max, geom.n_max + 1
    offsets = neighbour_offsets(frame_block, block)
    g = torch.where(alive, grid, n_max)
    start, h, w = (geom.geo[i].gather(1, g) for i in range(3))
    local = g - start
    hw = h * w
    t, r, c = (local // hw, (local // w) % h, local % w) if mask_row_wrap else (None, None, None)
    flat = torch.arange(B * L, device=dev).view(B, L)
    row_of = torch.full((B, W), -1, dtype=torch.long, device=dev).scatter_(1, g, flat)
    row_of[:, n_max] = -1  # dummy slot (written by every text / pruned row)
    cands = []
    for dt, dh, dw in offsets:
        src = local - (dt * hw + dh * w + dw)
        ok = alive & (src >= 0)
        if mask_row_wrap:
            ok &= (c >= dw) & (r >= dh) & (t >= dt)
        cand = row_of.gather(1, (start + src).clamp(0, n_max))
        cands.append(torch.where(ok, cand, -1))
    cand = torch.stack(cands, -1).view(B * L, len(offsets))
    has = (cand >= 0).any(1)
    most = alive.sum(1).max() if B * L else torch.zeros((), dtype=torch.long, device=dev)
    slot = g + torch.arange(0, B * W, W, device=dev)[:, None]
    base = start + torch.arange(0, B * W, W, device=dev)[:, None]
    return RowCandidates(cand, has, torch.stack([has.sum(), most]), alive.reshape(-1), slot.reshape(-1),
                         base.reshape(-1), B * W, max(0, geom.longest - 1).bit_length(), geom.n_grid)


def _row_tiles(nb, counted: torch.Tensor, m_size: int) -> torch.Tensor:
    """(M,) M-tile of every row of a candidate table `nb` (its slots): the `counted` rows before it in its grid,
    floor-divided by `m_size`."""
    per_slot = torch.zeros(nb.n_slots, dtype=torch.long, device=counted.device)
    per_slot[nb.slot] = counted.long()  # dummy slots only receive zeros (pruned / text rows)
    before = torch.cumsum(per_slot, 0) - per_slot
    return (before[nb.slot] - before[nb.base]) // m_size


@dataclasses.dataclass
class FusedCandidates:
    """The candidate table of a kept set as the fused matching reads it (`dedup_kernels.choose_roots`): every row
    (no compaction, so no host sync), M-tile masking folded in as absent candidates. Its M-tiles count the live
    rows, all-zero or not (the eager path leaves all-zero rows out of the count; a normed hidden state or an
    activation is never all-zero), and tile masking is applied whether or not a sample exceeds one tile (it
    then changes nothing)."""

    rows: torch.Tensor  # long (M,): 0..M-1
    cand: torch.Tensor  # long (M, K): flat row of each row's k-th candidate, -1 when absent or in another tile
    live: torch.Tensor  # 0-dim long: live rows (the zero-vector statistics count them as nonzero)
    n_grid: int

    @classmethod
    def of(cls, c: RowCandidates, m_size: int) -> "FusedCandidates":
        cand = c.cand
        M = cand.shape[0]
        rows = torch.arange(M, device=cand.device)
        if m_size >= 0:
            tile = _row_tiles(c, c.live, m_size)
            cand = torch.where((cand >= 0) & (tile[cand.clamp_min(0)] == tile[:, None]), cand, -1)
        return cls(rows, cand, c.live.sum(), c.n_grid)


def row_neighbours(grid: torch.Tensor, alive: torch.Tensor, grids, *, frame_block: int, block: int,
                   m_size: int = -1, mask_row_wrap: bool = False,
                   geometry: GridGeometry | None = None) -> RowNeighbours:
    """`grid` (B, L): grid index of every current row (-1: text / filler); `alive` (B, L): unpruned grid tokens;
    `grids[b]`: the `layout.Grid`s of sample b in grid-index order. One host sync (`P` and the tile test)."""
    c = row_candidates(grid, alive, grids, frame_block=frame_block, block=block, mask_row_wrap=mask_row_wrap,
                       geometry=geometry)
    P, most = c.counts.tolist()  # the one host sync of a kept set
    return c.table(P, most, m_size)


@dataclasses.dataclass
class RowMatching:
    """Whole-token matching of the rows of a flattened GEMM input (no host sync)."""

    code: torch.Tensor  # long (P,): per row of `RowNeighbours.rows`, 0 unique, 1..K chosen candidate
    root: torch.Tensor  # long (M,): flat row of the group root (own index when unique / text / pruned)
    nonzero: torch.Tensor  # bool (M,): rows that are not all-zero

    def removed(self) -> torch.Tensor:
        """0-dim: rows whose GEMM result is another row's (M - unique rows)."""
        return (self.code > 0).sum()


def _nonzero_rows(x2d: torch.Tensor) -> torch.Tensor:
    """(M,) bool: rows that are not all-zero; = (x2d != 0).any(1), NaN included, one read and no temporary."""
    lo, hi = torch.aminmax(x2d, dim=1)
    return (hi != 0) | (lo != 0)


def _choose(x2d: torch.Tensor, nb, rows: torch.Tensor, cand: torch.Tensor, nonzero, *, threshold: float,
            m_size: int, tiled: bool | None = None) -> torch.Tensor:
    """(len(rows),) long code of `rows` (their candidates `cand`): 0 unique, 1..K the chosen candidate.
    `match_vectors(vector_size=0)`'s fp32 arithmetic per row, strict `>` threshold, first offset wins ties.
    `nb`: a `RowNeighbours` or `RowCandidates` (its slots); `tiled` overrides `nb.tiled` (tile masking where it
    cannot act changes nothing). `dedup_kernels.choose_codes` is the fused equivalent."""
    P, C = rows.numel(), x2d.shape[1]
    dev = x2d.device
    ok = cand >= 0
    safe = cand.clamp_min(0)
    if nb.tiled if tiled is None else tiled:  # tiles count the unpruned tokens that are not all-zero
        tile = _row_tiles(nb, nb.live & nonzero, m_size)
        ok &= tile[safe] == tile[rows, None]
    v = x2d.index_select(0, rows).float().view(P, 1, C)
    norm = v.norm(dim=-1)  # (P, 1)
    best = choice = None  # both start at 0: "better" is a cosine > 0 first
    for k in range(cand.shape[1]):
        c = x2d.index_select(0, safe[:, k]).float().view(P, 1, C)
        cnorm = c.norm(dim=-1)
        dot = (v * c).sum(-1)
        denom = norm * cnorm
        cos = torch.where((denom > 0) & ok[:, k:k + 1], (dot / denom.clamp_min(1e-30)).clamp_max(1.0), 0.0)
        if best is None:
            better = cos > 0
            best, choice = torch.where(better, cos, 0.0), better.long()
        else:
            better = cos > best
            best = torch.where(better, cos, best)
            choice = torch.where(better, k + 1, choice)
    if best is None:
        return torch.zeros(P, dtype=torch.long, device=dev)
    return torch.where((best > threshold) & (norm > 0), choice, 0)[:, 0]


def match_rows(x2d: torch.Tensor, nb: RowNeighbours, *, threshold: float, m_size: int = -1,
               code: torch.Tensor | None = None, nonzero: torch.Tensor | None = None) -> RowMatching:
    """`match_vectors(vector_size=0)` + `roots_from_codes` restricted to the rows that have a candidate: the same
    fp32 cosines (same arithmetic per row), strict `>` threshold, first offset wins ties, tile masking, pointer
    jumping with a fixed round count (no host sync). `code` (and `nonzero`): the rows' codes when already chosen
    (`sample_duplicates` on a table it covered), only the roots are then computed."""
    M = x2d.shape[0]
    if nonzero is None:
        nonzero = _nonzero_rows(x2d)
    if code is None:
        code = _choose(x2d, nb, nb.rows, nb.cand, nonzero, threshold=threshold, m_size=m_size)
    target = nb.cand.gather(1, (code - 1).clamp_min(0)[:, None])[:, 0]
    ptr = torch.arange(M, device=x2d.device).index_copy_(0, nb.rows, torch.where(code > 0, target, nb.rows))
    for _ in range(nb.jumps):
        ptr = ptr[ptr]
    return RowMatching(code, ptr, nonzero)


def count_duplicates(x2d: torch.Tensor, nb: RowNeighbours, *, threshold: float, m_size: int = -1):
    """(0-dim count of duplicate rows among the matched ones, rows matched, whether that is every row with a
    candidate). Matches only `nb.sample` (at most `SAMPLE_ROWS` evenly spread rows) when the table has one:
    the duplicate fraction of the input is then estimated as count / matched * P / M. No host sync."""
    if nb.sample is None:
        code = _choose(x2d, nb, nb.rows, nb.cand, _nonzero_rows(x2d) if nb.tiled else None, threshold=threshold,
                       m_size=m_size)
        return (code > 0).sum(), nb.rows.numel(), True
    rows, cand = nb.rows[nb.sample], nb.cand[nb.sample]
    code = _choose(x2d, nb, rows, cand, _nonzero_rows(x2d) if nb.tiled else None, threshold=threshold,
                   m_size=m_size)
    return (code > 0).sum(), rows.numel(), False


def sample_duplicates(x2d: torch.Tensor, c: RowCandidates, *, threshold: float, m_size: int = -1):
    """`count_duplicates` on a table not compacted yet (P still on the device): the same `SAMPLE_ROWS` rows
    (positions i * P // SAMPLE_ROWS among the rows with a candidate; every one of them when P <= SAMPLE_ROWS),
    found with `searchsorted` instead of the compaction. No host sync. Returns (0-dim count, codes
    (SAMPLE_ROWS,): their first min(P, SAMPLE_ROWS) are the codes `match_rows` gives those rows, the rest 0,
    nonzero rows or None)."""
    dev = x2d.device
    S, M = SAMPLE_ROWS, x2d.shape[0]
    P = c.counts[0]
    j = torch.arange(S, device=dev)
    pos = torch.where(P > S, (j * P) // S, j)  # position among the rows with a candidate
    valid = pos < P
    rows = torch.searchsorted(torch.cumsum(c.has, 0), pos + 1).clamp_max(M - 1)
    cand = torch.where(valid[:, None], c.cand.index_select(0, rows), -1)
    tiled = m_size >= 0  # `most` is not known yet: masking where it cannot act changes nothing
    nonzero = _nonzero_rows(x2d) if tiled else None
    code = _choose(x2d, c, rows, cand, nonzero, threshold=threshold, m_size=m_size, tiled=tiled)
    return (code > 0).sum(), code, nonzero


@dataclasses.dataclass
class DedupPlan:
    """Rows of a flattened (M, K) GEMM input: `unique` rows computed, `expand` maps every row to its result."""

    unique: torch.Tensor  # long (U,) row indices whose group means are computed (the roots, ascending)
    expand: torch.Tensor  # long (M,) position in `unique` of every row's root
    root: torch.Tensor  # long (M,) root row of every row (own index for text / unique rows)
    dups: torch.Tensor | None = None  # long (M - U,) the other rows, ascending
    means: torch.Tensor | None = None  # (U, K): the group means when computed with the plan (`group_means_rows`)

    @property
    def removed(self) -> int:
        return self.root.numel() - self.unique.numel()


def _compact(mask: torch.Tensor, rank: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the `n` True entries of `mask` (ascending), `rank` = their position; no host sync."""
    out = torch.empty(n + 1, dtype=torch.long, device=mask.device)
    idx = torch.arange(mask.numel(), device=mask.device)
    return out.scatter_(0, torch.where(mask, rank, n), idx)[:n]


@dataclasses.dataclass
class PlanDraft:
    """Everything of a `DedupPlan` that does not need the unique-row count U on the host, so that it is queued
    before the host sync that reads U; `finish` only slices."""

    order: torch.Tensor  # long (M,): the roots (ascending), then the other rows (ascending)
    expand: torch.Tensor
    root: torch.Tensor
    is_root: torch.Tensor
    # the groups as lists (`lists=True`, for `dedup_kernels.group_means`), sized M: group g < U is
    # members[starts[g] : starts[g] + sizes[g]], every row by group, ascending within a group (root first)
    members: torch.Tensor | None = None
    starts: torch.Tensor | None = None
    sizes: torch.Tensor | None = None

    @classmethod
    def of(cls, root: torch.Tensor, lists: bool = False) -> "PlanDraft":
        """`lists`: also the member lists of `dedup_kernels.group_means` (sized M: the first U entries are the
        groups')."""
        M = root.numel()
        ar = torch.arange(M, device=root.device)
        is_root = root == ar
        rank = torch.cumsum(is_root, 0) - 1  # position among the roots (valid at roots)
        U = rank[-1:] + 1  # on the device
        # a root goes to its rank, another row to U + its position among the others (i - rank - 1)
        order = torch.empty(M, dtype=torch.long, device=root.device).scatter_(
            0, torch.where(is_root, rank, ar + U - 1 - rank), ar)
        expand = rank[root]
        draft = cls(order, expand, root, is_root)
        if lists:
            draft.sizes = torch.zeros(M, dtype=torch.long, device=root.device).index_add_(
                0, expand, torch.ones_like(expand))
            draft.starts = torch.cumsum(draft.sizes, 0) - draft.sizes
            draft.members = torch.sort(expand, stable=True).indices
        return draft

    def finish(self, removed: int | None = None) -> DedupPlan:
        """The plan, given the count of rows that are not roots (counted here, a host sync, when None)."""
        M = self.root.numel()
        if removed is None:
            removed = M - int(self.is_root.sum())
        U = M - removed
        return DedupPlan(self.order[:U], self.expand, self.root, self.order[U:])


def dedup_plan(root: torch.Tensor, removed: int | None = None) -> DedupPlan:
    """From per-row roots (a root points at itself) build the gather/scatter plan. Pass `removed` (rows that are
    not roots) when already known to avoid the host sync that counting it costs. One scatter orders the rows:
    the roots (ascending), then the others (ascending)."""
    return PlanDraft.of(root).finish(removed)


def group_means_rows(x2d: torch.Tensor, plan: DedupPlan) -> torch.Tensor:
    """(U, K): mean of each group's rows (fp32 accumulation in row order, cast back).

    Singleton groups are the rows themselves; only the groups with members are accumulated (root, then the
    members in row order: the fp32 sums of accumulating every row in row order), so the cost is O(U + 3 * removed)
    rows rather than O(M) fp32 rows. No host sync when the plan carries its `dups`. A plan that carries its
    `means` (the fused path computed them with `dedup_kernels.group_means`) returns them."""
    if plan.means is not None:
        return plan.means
    U = plan.unique.numel()
    dups = plan.dups
    if dups is None:
        dups = (plan.root != torch.arange(plan.root.numel(), device=plan.root.device)).nonzero().flatten()
    D = dups.numel()
    if D == 0:
        return x2d.index_select(0, plan.unique)
    dev = x2d.device
    # U + 1 rows: the last one takes the writes of the members that do not hold their group's sum
    means = x2d.index_select(0, torch.cat([plan.unique, plan.unique[:1]]))
    gpos = plan.expand[dups]  # group of every member
    ar = torch.arange(D, device=dev)
    first = torch.full((U,), D, dtype=torch.long, device=dev).scatter_reduce_(0, gpos, ar, "amin")
    slot = first[gpos]  # each group accumulates in the slot of its first member
    sums = x2d.index_select(0, plan.root[dups]).float()  # every slot starts from its root (= 0 + root)
    sums.index_add_(0, slot, x2d.index_select(0, dups).float())
    # members per slot + the root (no bincount: on CUDA it reads its input's maximum on the host)
    counts = torch.ones(D, device=dev).index_add_(0, slot, torch.ones(D, device=dev))
    mean = (sums / counts[:, None]).to(x2d.dtype)
    means.index_copy_(0, torch.where(slot == ar, gpos, U), mean)
    return means[:U]


def dedup_linear(linear: torch.nn.Module, x2d: torch.Tensor, plan: DedupPlan,
                 means: torch.Tensor | None = None) -> torch.Tensor:
    """linear(group means) on the unique rows only, expanded to every row (= linear on the mean-replaced input).
    `means` = `group_means_rows(x2d, plan)` when already computed (linear layers sharing one input)."""
    y = linear(group_means_rows(x2d, plan) if means is None else means)
    return y.index_select(0, plan.expand)

"""Fused Triton kernels of the token_dedup fast path (docs/video.md, "focus"): what eager PyTorch does in many
full-width fp32 passes, one pass over the GEMM input in its own dtype.

- `choose_codes`: per row, the cosine to each of its K candidate rows (fp32 accumulation of the norms and dot
  products read once from the bf16/fp16 rows), the best candidate (first wins ties), strict `>` threshold; the
  eager `similarity._choose` semantics with another summation order (cosines equal up to fp32 rounding).
- `choose_roots` (what Focus runs): the same choice written as each row's link to its chosen candidate, with the
  match count accumulated on the device, then a second kernel that follows every row's links to its group root
  (the eager path's pointer jumping, in one launch). No host sync.
- `group_means`: the mean of every duplicate group (fp32 sums in row order, root first, cast back), written
  straight to the compact (U, C) GEMM input: one read of the group's rows, one write of the mean.

Used on CUDA when Triton imports; on CPU only under Triton's interpreter (`TRITON_INTERPRET=1`, for tests).
The kernels are compiled on first use, so that the interpreter setting in force then is the one that counts.
"""
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager path is used
    triton = tl = None
constexpr = tl.constexpr if tl is not None else object  # kernel annotations (evaluated at definition)

BLOCK = 1024  # channels per step of a row loop (C up to the MLP width: 18,944 for a 7B -> 19 steps)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable(x: torch.Tensor) -> bool:
    """The fused kernels can run on `x`: Triton imports and `x` is on a CUDA device (any device when
    interpreting) in a floating dtype."""
    if triton is None or not x.is_floating_point():
        return False
    return x.is_cuda or interpreting()


def _choose_kernel(x_ptr, rows_ptr, cand_ptr, code_ptr, ptr_ptr, count_ptr, C, stride, threshold,
                   K: constexpr, KP: constexpr, BLOCK: constexpr, LINK: constexpr):
    p = tl.program_id(0)
    row = tl.load(rows_ptr + p)
    ks = tl.arange(0, KP)
    cand = tl.load(cand_ptr + p * K + ks, mask=ks < K, other=-1)
    has = cand >= 0
    safe = tl.where(has, cand, 0)
    acc_n = tl.zeros([BLOCK], dtype=tl.float32)
    acc_d = tl.zeros([KP, BLOCK], dtype=tl.float32)
    acc_c = tl.zeros([KP, BLOCK], dtype=tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < C
        v = tl.load(x_ptr + row * stride + cols, mask=inside, other=0.0).to(tl.float32)
        c = tl.load(x_ptr + safe[:, None] * stride + cols[None, :], mask=has[:, None] & inside[None, :],
                    other=0.0).to(tl.float32)
        acc_n += v * v
        acc_d += c * v[None, :]
        acc_c += c * c
    norm = tl.sqrt_rn(tl.sum(acc_n, axis=0))  # IEEE-rounded sqrt and division, as torch's
    denom = norm * tl.sqrt_rn(tl.sum(acc_c, axis=1))
    cos = tl.minimum(tl.div_rn(tl.sum(acc_d, axis=1), tl.maximum(denom, 1e-30)), 1.0)
    cos = tl.where(has & (denom > 0), cos, 0.0)
    best = tl.max(cos, axis=0)
    first = tl.min(tl.where(cos == best, ks, KP), axis=0)  # the first candidate reaching the best cosine
    code = tl.where((best > threshold) & (best > 0) & (norm > 0), first + 1, 0)
    if LINK:  # the row's link (its chosen candidate, or itself) and the count of linked rows
        target = tl.sum(tl.where(ks == first, safe, 0), axis=0)
        tl.store(ptr_ptr + row, tl.where(code > 0, target, row).to(tl.int64))
        tl.atomic_add(count_ptr, (code > 0).to(tl.int64))
    else:
        tl.store(code_ptr + p, code.to(tl.int64))


def _root_kernel(link_ptr, root_ptr, M, BLOCK: constexpr):
    """Follows every row's links to the end of its chain (links point at earlier rows: chains end)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < M
    at = tl.load(link_ptr + offs, mask=inside, other=0)
    nxt = tl.load(link_ptr + at, mask=inside, other=0)
    while tl.max((nxt != at).to(tl.int32), axis=0) > 0:
        at = nxt
        nxt = tl.load(link_ptr + at, mask=inside, other=0)
    tl.store(root_ptr + offs, at, mask=inside)


def _mean_kernel(x_ptr, out_ptr, members_ptr, starts_ptr, sizes_ptr, C, stride, BLOCK: constexpr):
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < C
    start = tl.load(starts_ptr + g)
    size = tl.load(sizes_ptr + g)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, size):
        row = tl.load(members_ptr + start + j)
        acc += tl.load(x_ptr + row * stride + cols, mask=inside, other=0.0).to(tl.float32)
    mean = tl.div_rn(acc, tl.zeros([BLOCK], dtype=tl.float32) + tl.maximum(size, 1).to(tl.float32))  # as torch
    tl.store(out_ptr + g * C + cols, mean.to(out_ptr.dtype.element_ty), mask=inside & (size > 0))


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    del interpret  # the cache key: triton.jit reads the interpreter setting when it wraps
    return triton.jit(_choose_kernel), triton.jit(_mean_kernel), triton.jit(_root_kernel)


def _rows_contiguous(x2d: torch.Tensor) -> torch.Tensor:
    return x2d if x2d.stride(1) == 1 else x2d.contiguous()


def choose_codes(x2d: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor, threshold: float) -> torch.Tensor:
    """(P,) long: 0 unique, 1..K the chosen candidate of each of `rows`; `cand` (P, K) long, -1 = absent (masked
    candidates included). A row matches when its best cosine is > `threshold` and > 0 and the row is not zero."""
    x2d = _rows_contiguous(x2d)
    P, K = cand.shape
    code = torch.zeros(P, dtype=torch.long, device=x2d.device)
    if P == 0 or K == 0:
        return code
    choose = _kernels(interpreting())[0]
    choose[(P,)](x2d, rows.contiguous(), cand.contiguous(), code, code, code, x2d.shape[1], x2d.stride(0),
                 float(threshold), K=K, KP=triton.next_power_of_2(K), BLOCK=BLOCK, LINK=False)
    return code


def choose_roots(x2d: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor, threshold: float):
    """`choose_codes` on `rows`, then every row's group root (M,) (a row without a match is its own root) and the
    count of matched rows (0-dim, on the device): two kernels, no host sync. Candidates must be earlier rows."""
    x2d = _rows_contiguous(x2d)
    M = x2d.shape[0]
    P, K = cand.shape
    choose, _, root_of = _kernels(interpreting())
    link = torch.arange(M, device=x2d.device)
    count = torch.zeros(1, dtype=torch.long, device=x2d.device)
    if P and K:
        choose[(P,)](x2d, rows.contiguous(), cand.contiguous(), link, link, count, x2d.shape[1], x2d.stride(0),
                     float(threshold), K=K, KP=triton.next_power_of_2(K), BLOCK=BLOCK, LINK=True)
    root = torch.empty_like(link)
    if M:
        root_of[(triton.cdiv(M, BLOCK),)](link, root, M, BLOCK=BLOCK)
    return root, count[0]


def group_means(x2d: torch.Tensor, members: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor,
                groups: int) -> torch.Tensor:
    """(groups, C) in x2d's dtype: row g is the mean of rows members[starts[g] : starts[g] + sizes[g]]. `groups`
    may be a capacity (the group count not read on the host yet): rows of empty groups are left unwritten."""
    x2d = _rows_contiguous(x2d)
    C = x2d.shape[1]
    # the interpreter truncates fp32 -> bf16 stores: there the means are stored in fp32 and rounded by torch
    interpret = interpreting()
    out = torch.empty(groups, C, dtype=torch.float32 if interpret else x2d.dtype, device=x2d.device)
    if groups > 0:
        mean = _kernels(interpret)[1]
        mean[(groups, triton.cdiv(C, BLOCK))](x2d, out, members, starts, sizes, C, x2d.stride(0), BLOCK=BLOCK)
    return out.to(x2d.dtype)

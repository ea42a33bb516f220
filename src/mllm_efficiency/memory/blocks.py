"""Where memory blocks live (docs/long_context_memory.md, "Block cache").

`BlockStore`: every block's K/V of one layer in one growable tensor, on CPU (offload="cpu", optionally pinned)
or on the GPU (offload="gpu"). `BlockCache`: up to `max_cached_block` resident blocks in fixed device slots,
with the eviction policies `lru` (oldest selection stamp), `fifo` (earliest made resident) and `lru-s` (decayed
attention mass). A block chosen for the current step is never evicted.
"""
from __future__ import annotations

import torch


class Growable:
    """A tensor that grows along dim 0 by doubling its capacity (no per-append reallocation)."""

    def __init__(self, row_shape, dtype, device, pin: bool = False):
        self.row_shape = tuple(row_shape)
        self.dtype, self.device, self.pin = dtype, torch.device(device), pin
        self.data = self._alloc(4)
        self.n = 0

    def _alloc(self, cap: int) -> torch.Tensor:
        t = torch.empty((cap, *self.row_shape), dtype=self.dtype, device=self.device)
        return t.pin_memory() if self.pin and self.device.type == "cpu" and torch.cuda.is_available() else t

    def append(self, rows: torch.Tensor) -> None:
        m = rows.shape[0]
        if self.n + m > self.data.shape[0]:
            new = self._alloc(max(2 * self.data.shape[0], self.n + m))
            new[: self.n].copy_(self.data[: self.n])
            self.data = new
        self.data[self.n:self.n + m].copy_(rows, non_blocking=self.pin)
        self.n += m

    @property
    def value(self) -> torch.Tensor:
        return self.data[: self.n]


class BlockStore:
    """All blocks of one layer: rows (2, Hkv, block_size, D) = stacked K and V.

    A CPU store fed from the GPU keeps new blocks in a GPU staging buffer until `flush()` (the memory unit calls
    it once per call), so a prefill chunk pays one device-to-host copy instead of one blocking copy per block;
    `fetch` reads blocks not flushed yet from the staging buffer. Block ids are append order either way."""

    def __init__(self, shape, dtype, device, pin: bool):
        self.rows = Growable((2, *shape), dtype, device, pin)
        self.pending: Growable | None = None  # GPU staging of blocks not yet in `rows`

    def __len__(self) -> int:
        return self.rows.n + (self.pending.n if self.pending is not None else 0)

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.add_many(k[None], v[None])

    def add_many(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (n, Hkv, bs, D): n blocks in order."""
        rows = torch.stack((k, v), 1)
        if self.rows.device.type == "cpu" and rows.device.type != "cpu":
            if self.pending is None:
                self.pending = Growable(self.rows.row_shape, self.rows.dtype, rows.device)
            self.pending.append(rows)
        else:
            self.rows.append(rows)

    def flush(self) -> None:
        if self.pending is not None and self.pending.n:
            src = self.pending.value
            if src.device.type == "cuda":  # via pinned memory: a device-to-pageable copy runs at ~1.5 GB/s
                stage = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
                stage.copy_(src)
                src = stage
            self.rows.append(src)
        self.pending = None  # staging memory back to the allocator (no per-layer buffer kept alive)

    def fetch(self, ids: list[int], device) -> torch.Tensor:
        """(len(ids), 2, Hkv, bs, D) on `device`."""
        n_stored = self.rows.n
        if self.pending is not None and self.pending.n and max(ids) >= n_stored:
            staged = [j for j, b in enumerate(ids) if b >= n_stored]
            stored = [j for j, b in enumerate(ids) if b < n_stored]
            out = torch.empty((len(ids), *self.rows.row_shape), dtype=self.rows.dtype, device=device)
            src = torch.tensor([ids[j] - n_stored for j in staged], dtype=torch.long, device=self.pending.device)
            out[torch.tensor(staged, device=device)] = self.pending.value.index_select(0, src).to(device)
            if stored:
                out[torch.tensor(stored, device=device)] = self._fetch_stored([ids[j] for j in stored], device)
            return out
        return self._fetch_stored(ids, device)

    def _fetch_stored(self, ids: list[int], device) -> torch.Tensor:
        rows = self.rows.value
        idx = torch.tensor(ids, dtype=torch.long, device=rows.device)
        if rows.device.type == "cpu" and torch.device(device).type == "cuda":
            # gather straight into pinned memory (host caching allocator: reused, and not handed out again
            # before the asynchronous copy has read it)
            out = torch.empty((len(ids), *rows.shape[1:]), dtype=rows.dtype, pin_memory=True)
            torch.index_select(rows, 0, idx, out=out)
            return out.to(device, non_blocking=True)
        return rows.index_select(0, idx).to(device)


class BlockCache:
    """Resident blocks of one layer in `capacity` device slots, evicted by `strategy`."""

    def __init__(self, capacity: int, strategy: str, decay: float):
        self.capacity, self.strategy, self.decay = capacity, strategy, decay
        self.slots: torch.Tensor | None = None  # (capacity, 2, Hkv, bs, D)
        self.slot_of: dict[int, int] = {}  # block id -> slot
        self.rank: dict[int, float] = {}  # block id -> lru stamp / fifo arrival / lru-s score
        self.clock = 0
        self.loads = self.hits = 0
        self.evicted: list[int] = []  # eviction order (inspected by tests and stats)

    def resident(self) -> list[int]:
        return sorted(self.slot_of)

    def _victims(self, n: int, protected: set[int]) -> list[int]:
        candidates = [b for b in self.slot_of if b not in protected]
        # lru/fifo: smallest stamp first; lru-s: lowest score (ties: lower id) first
        candidates.sort(key=lambda b: (self.rank[b], b))
        return candidates[:n]

    def select(self, chosen: list[int], store: BlockStore, device) -> torch.Tensor:
        """Make `chosen` resident (loading the missing ones from `store`); returns their slot indices."""
        chosen_set = set(chosen)
        missing = [b for b in chosen if b not in self.slot_of]
        self.hits += len(chosen) - len(missing)
        overflow = len(self.slot_of) + len(missing) - self.capacity
        if overflow > 0:
            for b in self._victims(overflow, chosen_set):
                self.slot_of.pop(b)
                self.rank.pop(b)
                self.evicted.append(b)
        if missing:
            data = store.fetch(missing, device)
            if self.slots is None:
                self.slots = torch.empty((self.capacity, *data.shape[1:]), dtype=data.dtype, device=device)
            free = sorted(set(range(self.capacity)) - set(self.slot_of.values()))
            for j, b in enumerate(missing):
                self.slot_of[b] = free[j]
            idx = torch.tensor(free[: len(missing)], device=device)
            self.slots.index_copy_(0, idx, data)
            self.loads += len(missing)
        self.clock += 1
        for b in chosen:
            if self.strategy == "lru":
                self.rank[b] = self.clock
            elif b not in self.rank:  # fifo keeps the arrival stamp, lru-s starts a new block at score 0
                self.rank[b] = self.clock if self.strategy == "fifo" else 0.0
        return torch.tensor([self.slot_of[b] for b in chosen], device=device)

    def add_mass(self, chosen: list[int], mass: list[float]) -> None:
        """lru-s: decay every resident block's score, then add the attention mass each chosen block received."""
        if self.strategy != "lru-s":
            return
        for b in self.rank:
            self.rank[b] *= self.decay
        for b, m in zip(chosen, mass):
            self.rank[b] += float(m)

    def reset(self) -> None:
        self.slot_of.clear()
        self.rank.clear()
        self.evicted.clear()
        self.clock = self.loads = self.hits = 0

"""Paged KV cache: a fixed pool of blocks per layer and the allocator that hands them out.

Layout (per layer) is what the kernels contract fixes: `k_cache[num_blocks, block_size,
num_kv_heads, head_dim]`, same for `v_cache`. A token at position p of a sequence lives in
block `block_table[p // block_size]` at offset `p % block_size`; its flat *slot* is
`block * block_size + offset` (what `store_kv` takes). On the CPU's torch path the same
shape is a view of head-major storage (`KVLayout.head_major`, see `KVCache`).

The allocator is pure bookkeeping (no tensors), so the scheduler and the transformers
fallback (which keeps its own cache but still budgets tokens) share it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Free blocks, lowest id first, and the block right after a sequence's last when free.

    Preferring low ids and the next id keeps a sequence's blocks consecutive most of the
    time, which lets the CPU decode path read its K/V as a view instead of gathering.
    """

    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._heap = list(range(num_blocks))     # may hold stale ids (taken by allocate_after)
        self._free: set[int] = set(self._heap)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def _pop(self) -> int:
        while True:
            b = heapq.heappop(self._heap)
            if b in self._free:
                self._free.remove(b)
                return b

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV pool exhausted: asked {n} blocks, {len(self._free)} free")
        return [self._pop() for _ in range(n)]

    def allocate_spread(self, n: int) -> list[int]:
        """n consecutive blocks in the middle of the largest free run (else `allocate(n)`).

        Used when admitting a prompt on the CPU path: the sequence before the run and this
        one both keep room to grow into consecutive blocks. O(free blocks) per call.
        """
        if n > len(self._free):
            raise RuntimeError(f"KV pool exhausted: asked {n} blocks, {len(self._free)} free")
        best_start, best_len, run_start, prev = 0, 0, None, None
        for b in sorted(self._free):
            if prev is None or b != prev + 1:
                run_start = b
            prev = b
            if b - run_start + 1 > best_len:
                best_start, best_len = run_start, b - run_start + 1
        if best_len < n:
            return self.allocate(n)
        start = best_start if best_start == 0 else best_start + (best_len - n) // 2
        out = list(range(start, start + n))
        self._free.difference_update(out)   # their heap entries go stale; _pop skips them
        return out

    def allocate_after(self, prev: int | None) -> int:
        """One block, `prev + 1` when that one is free."""
        if not self._free:
            raise RuntimeError("KV pool exhausted: asked 1 block, 0 free")
        if prev is not None and prev + 1 in self._free:
            self._free.remove(prev + 1)
            return prev + 1
        return self._pop()

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert 0 <= b < self.num_blocks and b not in self._free, f"double free of block {b}"
            self._free.add(b)
            heapq.heappush(self._heap, b)
        if len(self._heap) > 4 * self.num_blocks:   # drop stale entries now and then
            self._heap = sorted(self._free)
        blocks.clear()


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    head_major: bool = False    # storage [Hk, NB*BS, D] per layer (CPU torch path); see KVCache

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.num_blocks * self.block_size


class KVCache:
    """The tensors: one (k, v) pair per layer, allocated once up front."""

    def __init__(self, layout: KVLayout, device: torch.device | str):
        self.layout = layout
        nl, nb, bs, hk, d = layout.num_layers, layout.num_blocks, layout.block_size, layout.num_kv_heads, \
            layout.head_dim
        # One allocation per side keeps the pool contiguous and makes `nbytes` exact.
        shape = (nl, hk, nb, bs, d) if layout.head_major else (nl, nb, bs, hk, d)
        self._k = torch.zeros(shape, dtype=layout.dtype, device=device)
        self._v = torch.zeros(shape, dtype=layout.dtype, device=device)
        if layout.head_major:
            # Still [NB, BS, Hk, D] to every reader (a permuted view; `.view(NB * BS, Hk, D)`
            # works too), but a sequence's consecutive blocks are, per head, one contiguous
            # run of D-element rows: the CPU decode attention reads them ~20% faster than
            # token-major rows Hk*D apart. The Triton kernels want token-major (CUDA).
            per_layer = [(k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)) for k, v in zip(self._k, self._v)]
        else:
            per_layer = list(zip(self._k, self._v))
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = per_layer

    @property
    def nbytes(self) -> int:
        if self._k is None:
            return 0
        return self._k.nbytes + self._v.nbytes

    def gather(self, layer: int, block_table: list[int] | torch.Tensor, num_tokens: int):
        """Contiguous K, V of one sequence's first `num_tokens` tokens: [num_tokens, Hk, D]."""
        k_cache, v_cache = self.layers[layer]
        return gather_kv(k_cache, v_cache, block_table, num_tokens)

    def release(self) -> None:
        self.layers = []
        self._k = self._v = None


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int):
    """[NB, BS, Hk, D] caches + a sequence's block ids -> its first `num_tokens` K and V."""
    bs = k_cache.shape[1]
    nb = blocks_for(num_tokens, bs)
    idx = block_table[:nb]
    k = k_cache.index_select(0, idx).flatten(0, 1)[:num_tokens]
    v = v_cache.index_select(0, idx).flatten(0, 1)[:num_tokens]
    return k, v


def num_blocks_for_budget(kv_cache_tokens: int, block_size: int) -> int:
    """Pool size in blocks for a token budget (rounded up so the budget is honoured)."""
    if kv_cache_tokens <= 0:
        raise ValueError(f"kv_cache_tokens must be > 0, got {kv_cache_tokens}")
    return blocks_for(kv_cache_tokens, block_size)

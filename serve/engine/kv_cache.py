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
from typing import Mapping

import torch

BLOCK_SIZE = 16          # tokens per block: the engine's default, and the unit the memory planner sizes pools in
DEFAULT_MAX_BATCH = 64   # sequences per step when neither the caller nor serving.json says


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Reference-counted blocks; free ones lowest id first, the block after a sequence's last when free.

    Preferring low ids and the next id keeps a sequence's blocks consecutive most of the
    time, which lets the CPU decode path read its K/V as a view instead of gathering.

    Prefix caching (see prefix_cache.py) registers a full, computed block under a
    content key. A block whose last holder frees it keeps its key and K/V: it is free
    (counted in `num_free`, allocatable) but *evictable*, and a later request with the
    same key can take it back with `share`. Fresh allocations take blocks that hold
    nothing cached first and evict cached ones least recently used first (on the CPU's
    `allocate_spread`, by consecutive windows; see there).
    """

    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._heap = list(range(num_blocks))     # may hold stale ids (taken by allocate_after/spread)
        self._free: set[int] = set(self._heap)   # free blocks that hold nothing cached
        self._refs = [0] * num_blocks            # holders of each block (sequences)
        self._lru: dict[int, int] = {}           # free blocks holding cached K/V -> release number, oldest first
        self._releases = 0                       # `free` calls so far
        self._key_of: dict[int, bytes] = {}      # registered block -> its content key (used or free)
        self._block_of: dict[bytes, int] = {}    # content key -> block
        self.num_evicted = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        """Blocks holding registered content, held by a sequence or free (evictable)."""
        return len(self._key_of)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def _take(self) -> int:
        """One free block: the lowest id holding nothing cached, else evict the least recently used."""
        while self._heap:
            b = heapq.heappop(self._heap)
            if b in self._free:
                self._free.remove(b)
                return self._hold(b)
        return self._hold(self._evict(next(iter(self._lru))))

    def _evict(self, b: int) -> int:
        del self._lru[b]
        del self._block_of[self._key_of.pop(b)]   # its key will never match again
        self.num_evicted += 1
        return b

    def _hold(self, b: int) -> int:
        assert self._refs[b] == 0, f"block {b} handed out while held"
        self._refs[b] = 1
        return b

    def _check(self, n: int) -> None:
        if n > self.num_free:
            raise RuntimeError(f"KV pool exhausted: asked {n} blocks, {self.num_free} free")

    def allocate(self, n: int) -> list[int]:
        self._check(n)
        return [self._take() for _ in range(n)]

    def allocate_spread(self, n: int, room: int = 0) -> list[int]:
        """n consecutive blocks for a new sequence on the CPU path -> n, or n + room with cache in the pool.

        Without cached free blocks: the middle of the largest run of blocks holding nothing
        cached, so the sequence before the run and this one both keep room to grow into
        consecutive blocks (else `allocate(n)`).

        With cached free blocks the empty runs are short (cache fills the gaps), so the
        sequence gets n + `room` consecutive blocks and holds the room from the start (a
        free room would be taken by the next allocation): from an empty run when one is
        long enough, else the window of free blocks that evicts the fewest cached blocks,
        the least recently released on a tie. Evicting block by block instead would hand
        every sequence a scattered table once the pool is full, and the CPU decode would
        gather them all (~10% fewer tokens/s measured on the 2-core VM). O(free blocks).
        """
        self._check(n)
        want = n + room if self._lru else n
        best_start, best_len = _largest_run(sorted(self._free))
        if best_len >= want:
            slack = best_len - want
            start = best_start if best_start == 0 else best_start + slack // 2
            window = list(range(start, start + want))
        elif self._lru and (window := self._cheapest_window(n, want)) is not None:
            for b in window:
                if b in self._lru:
                    self._evict(b)
        else:
            return self.allocate(n)
        self._free.difference_update(window)   # their heap entries go stale; _take skips them
        return [self._hold(b) for b in window]

    def _cheapest_window(self, n: int, want: int) -> list[int] | None:
        """The run of min(want, run length) >= n free blocks minimizing (short of `want`,
        cached blocks in it, their summed release numbers), or None if no run fits n."""
        free = sorted(self._free | self._lru.keys())
        best, best_cost = None, None
        i = 0
        while i < len(free):
            j = i
            while j + 1 < len(free) and free[j + 1] == free[j] + 1:
                j += 1
            run, i = free[i:j + 1], j + 1
            if len(run) < n:
                continue
            w = min(want, len(run))
            cached, age = [0], [0]           # prefix sums over the run
            for b in run:
                r = self._lru.get(b, 0)
                cached.append(cached[-1] + (r > 0))
                age.append(age[-1] + r)
            for s in range(len(run) - w + 1):
                cost = (w < want, cached[s + w] - cached[s], age[s + w] - age[s])
                if best_cost is None or cost < best_cost:
                    best, best_cost = run[s:s + w], cost
        return best

    def allocate_after(self, prev: int | None) -> int:
        """One block, `prev + 1` when that one is free and holds nothing cached."""
        self._check(1)
        if prev is not None and prev + 1 in self._free:
            self._free.remove(prev + 1)
            return self._hold(prev + 1)
        return self._take()

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block (and empty the list). A block nobody holds any
        more is free; if it is registered it keeps its key and K/V until evicted.

        The last block is released first, so a sequence's tail is evicted before its
        prefix, which more requests share."""
        self._releases += 1
        for b in reversed(blocks):
            assert 0 <= b < self.num_blocks and self._refs[b] > 0, f"double free of block {b}"
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            if b in self._key_of:
                self._lru[b] = self._releases       # newest: evicted last (release numbers start at 1)
            else:
                self._free.add(b)
                heapq.heappush(self._heap, b)
        if len(self._heap) > 4 * self.num_blocks:   # drop stale entries now and then
            self._heap = sorted(self._free)
        blocks.clear()

    # --- prefix caching: content keys of full, computed blocks ---------------------------
    def lookup(self, key: bytes) -> int | None:
        """The block registered under `key` (held or free-but-cached), or None."""
        return self._block_of.get(key)

    def share(self, block: int) -> None:
        """Take a reference on a registered block (a prefix-cache hit); a free one leaves the free pool."""
        assert block in self._key_of, f"block {block} is not cached"
        if self._refs[block] == 0:
            del self._lru[block]
        self._refs[block] += 1

    def register(self, block: int, key: bytes) -> bool:
        """Record that held `block` is full and computed with content `key` -> registered now.

        False when another block already holds that content (two sequences computed the
        same prefix at once): the first stays the cached one, this one stays private."""
        assert self._refs[block] > 0, f"registering block {block} that nobody holds"
        if key in self._block_of:
            return self._block_of[key] == block
        assert block not in self._key_of, f"block {block} registered twice"   # full blocks never change
        self._key_of[block], self._block_of[key] = key, block
        return True

    def clear_cached(self) -> None:
        """Forget every registered key (the KV pool was dropped): cached free blocks become plain free."""
        for b in self._lru:
            self._free.add(b)
            heapq.heappush(self._heap, b)
        self._lru.clear()
        self._key_of.clear()
        self._block_of.clear()


def _largest_run(ids: list[int]) -> tuple[int, int]:
    """(start, length) of the longest run of consecutive ids in sorted `ids`; (0, 0) if empty."""
    best_start, best_len, run_start, prev = 0, 0, None, None
    for b in ids:
        if prev is None or b != prev + 1:
            run_start = b
        prev = b
        if b - run_start + 1 > best_len:
            best_start, best_len = run_start, b - run_start + 1
    return best_start, best_len


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


def pool_tokens(serving: Mapping, bytes_per_token: int, max_batch: int, max_model_len: int, device) -> int:
    """How many tokens a KV pool holds, the one rule for the engine and the memory planner:
    serving.json's `kv_cache_tokens`, or its `kv_cache_bytes` at `bytes_per_token`. With
    neither (a plain HF directory; a published bundle always has one) every batch row at
    full length, capped by a memory budget (30% of what is free on CUDA, 512 MiB on CPU),
    and never less than one full-length sequence."""
    if serving.get("kv_cache_tokens"):
        return int(serving["kv_cache_tokens"])
    if serving.get("kv_cache_bytes"):
        return max(1, int(serving["kv_cache_bytes"]) // bytes_per_token)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.3)
    else:
        budget = 512 << 20
    return max(min(max_batch * max_model_len, budget // bytes_per_token), min(max_model_len, 1 << 20))


def num_blocks_for_budget(kv_cache_tokens: int, block_size: int) -> int:
    """Pool size in blocks for a token budget (rounded up so the budget is honoured)."""
    if kv_cache_tokens <= 0:
        raise ValueError(f"kv_cache_tokens must be > 0, got {kv_cache_tokens}")
    return blocks_for(kv_cache_tokens, block_size)

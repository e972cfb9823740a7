"""Automatic prefix caching: a new sequence reuses the KV blocks of token blocks already computed.

Only *full* blocks are shared. Each is identified by a chained content key,
`key_i = sha256(key_{i-1} || token ids of block i)`, so a key names the whole prefix up
to the end of its block, not just the block's own tokens. A cryptographic hash (never
Python's `hash`, which is 64-bit and collides) is what makes serving another prefix's
K/V by accident practically impossible.

Shared blocks are immutable: a sequence writes only at positions >= its `num_cached`,
i.e. into its own last, non-full block, and a hit never covers the last prompt token
(its logits are needed, so at least it is computed). So no copy-on-write is needed.

The lifecycle of a block's key (the allocator in kv_cache.py keeps the table):
- registered after a step that computed the block succeeded (`Scheduler.postprocess`),
  never for a failed step, a request cancelled while its step ran, or a partial block;
- a sequence that finishes, is cancelled or preempted drops its references; a
  registered block nobody holds stays free-but-cached until a fresh allocation evicts
  it (least recently used first, after blocks that hold nothing cached);
- everything is forgotten when the KV pool is dropped (parking).

This file holds the keys and the two decisions (what an admission can reuse, what a
finished step registers); it owns no tensors, the scheduler calls it under the engine's lock.
"""

from __future__ import annotations

import hashlib
import struct

from slotserve.engine.kv_cache import BlockAllocator

_ROOT = b"slotserve-prefix-v1"     # key of the empty prefix (per engine: pools are never shared)


def block_key(parent: bytes, tokens) -> bytes:
    """Content key of a full block: sha256 over the previous block's key and its token ids (int64 LE)."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


def adapter_root(digest: str | None) -> bytes:
    """The key chain's root for a sequence decoded with the LoRA adapter of content `digest`
    (None: the base model): the same tokens under another adapter have other K/V."""
    return _ROOT if digest is None else hashlib.sha256(_ROOT + digest.encode()).digest()


def prefix_keys(token_ids, block_size: int, num_blocks: int, known: list[bytes] | None = None,
                root: bytes | None = None) -> list[bytes]:
    """Keys of the first `num_blocks` full blocks of `token_ids`, extending `known` (the keys
    computed so far for the same tokens; token ids only ever grow, so they stay valid);
    `root` scopes them (`adapter_root`)."""
    keys = known if known is not None else []
    assert num_blocks * block_size <= len(token_ids)
    while len(keys) < num_blocks:
        i = len(keys)
        keys.append(block_key(keys[-1] if keys else (root or _ROOT), token_ids[i * block_size:(i + 1) * block_size]))
    return keys


class PrefixCache:
    """The scheduler's view of prefix caching over one engine's `BlockAllocator`."""

    def __init__(self, allocator: BlockAllocator):
        self.alloc = allocator
        self.block_size = allocator.block_size

    def match(self, seq) -> list[int]:
        """Blocks holding the longest cached prefix of `seq`: at most (len - 1) // block_size
        full blocks, so the last token is always computed. Takes no references (see `share`)."""
        limit = (len(seq) - 1) // self.block_size
        out: list[int] = []
        for i in range(limit):
            key = prefix_keys(seq.token_ids, self.block_size, i + 1, seq.block_keys, seq.prefix_root)[i]
            block = self.alloc.lookup(key)
            if block is None:
                break
            out.append(block)
        return out

    def reclaimed(self, blocks: list[int]) -> int:
        """How many of the hit `blocks` are free now: sharing them takes them out of the free pool."""
        return sum(1 for b in blocks if self.alloc.refcount(b) == 0)

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self.alloc.share(b)

    def register(self, seq) -> None:
        """After a successful step: key every block of `seq` that is now full and computed."""
        full = seq.num_cached // self.block_size
        if full <= seq.num_registered:
            return
        keys = prefix_keys(seq.token_ids, self.block_size, full, seq.block_keys, seq.prefix_root)
        for i in range(seq.num_registered, full):
            self.alloc.register(seq.block_table[i], keys[i])
        seq.num_registered = full

    def clear(self) -> None:
        self.alloc.clear_cached()

"""Physical KV blocks of the paged path: reference counts, a free list and the eviction order of cached blocks.

A block is free (refcount 0, no cached content), in use (refcount >= 1: it sits in that many block tables), or
cached-and-evictable (refcount 0 but still registered in the prefix cache, so a later request with the same prefix
can take it back). `allocate` prefers truly free blocks and evicts cached ones least recently released first.
Which prefix a block holds is the prefix cache's business (vattn.kv_cache.prefix_cache); the pool only asks it
whether a block is cached, and tells it when a cached block is evicted.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from vattn.kv_cache.prefix_cache import PrefixCache


class BlockPoolExhaustedError(RuntimeError):
    """No free or evictable block is left."""


class BlockPool:
    def __init__(self, num_blocks: int, cache: PrefixCache | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.cache = cache
        self.refcount = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0; oldest release first
        self.num_evictions = 0

    # -- counts -----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out now: free plus cached-but-evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_shared(self) -> int:
        return sum(1 for r in self.refcount if r > 1)

    # -- allocation -------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A block with refcount 1 and no cached identity; evicts the least recently released cached block if needed."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self.cache.forget(block)
            self.num_evictions += 1
        else:
            raise BlockPoolExhaustedError(f"all {self.num_blocks} blocks are in use")
        self.refcount[block] = 1
        return block

    def incref(self, block: int) -> None:
        """One more block table holds `block` (sharing, or taking a cached block back)."""
        self._check(block)
        if self.refcount[block] == 0:
            if block not in self._evictable:
                raise ValueError(f"block {block} is free (not cached): it cannot be shared")
            del self._evictable[block]
        self.refcount[block] += 1

    def decref(self, block: int) -> None:
        """One block table dropped `block`; at zero it goes to the free list, or stays cached if it is indexed."""
        self._check(block)
        if self.refcount[block] <= 0:
            raise ValueError(f"block {block} is not in use (refcount {self.refcount[block]})")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if self.cache is not None and block in self.cache:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def clear_cache(self) -> int:
        """Forget every cached-but-evictable block (they become plain free blocks); returns how many."""
        n = len(self._evictable)
        for block in self._evictable:
            self.cache.forget(block)
            self._free.append(block)
        self._evictable.clear()
        return n

    def _check(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block} out of range [0, {self.num_blocks})")

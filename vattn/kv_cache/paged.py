"""The paged KV cache: per layer one K and one V pool [num_blocks, block_size, kv_heads, head_dim], allocated up front.

A sequence owns a block table (a list of block ids); token p lives in block table[p // block_size] at offset
p % block_size, in every layer. A "unit" (KVStats) is one block across all layers, K and V.

Sharing. `fork(parent, child)` gives the child the parent's blocks for the parent's computed tokens (refcount + 1
each). A shared block is never written: before a sequence's next token lands in a shared, partially filled block,
`allocate` copies that block (every layer) into a fresh one (copy-on-write). A shared full block needs no copy.

Prefix caching (enable_prefix_caching=True). Once a full block is computed it is registered in the pool's index
under the hash chain of the tokens up to its end (vattn.kv_cache.prefix_hash). A newly admitted sequence takes the
longest chain of cached blocks matching its tokens (refcount + 1). Freed indexed blocks stay cached and evictable,
least recently released first. Counters are in tokens: prefix_cache_queries += len(seq) per lookup, and
prefix_cache_hits += the tokens served from the cache, so hits / queries is the fraction of prompt tokens skipped.
"""

from __future__ import annotations

import torch

from vattn.attention.metadata import AttentionMetadata
from vattn.attention.paged import PagedAttention
from vattn.kv_cache.base import KVCacheManager, KVStats
from vattn.kv_cache.block_pool import BlockPool
from vattn.kv_cache.prefix_hash import BlockHash, extend_chain
from vattn.sequence import Sequence


class PagedKVCache(KVCacheManager):
    kind = "paged"

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_num_seqs: int, max_model_len: int, memory_bytes: int,
                 block_size: int = 16, enable_prefix_caching: bool = False, attention_kernel: str = "auto"):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                            ("block_size", block_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.device = torch.device(device)
        self.num_layers, self.block_size = num_layers, block_size
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.token_bytes = 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8  # all layers, K+V
        self.block_bytes = self.token_bytes * block_size
        num_blocks = memory_bytes // self.block_bytes
        if num_blocks < 1:
            raise ValueError(f"memory_bytes={memory_bytes} is less than one block ({self.block_bytes} bytes)")
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # empty, not zeros: host pages are committed only when written, and kernels never read unwritten slots
        self.k_pools = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_pools = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.pool = BlockPool(num_blocks)
        self._attn = PagedAttention(self.k_pools, self.v_pools, scale=head_dim ** -0.5, block_size=block_size,
                                    kernel=attention_kernel)
        self.enable_prefix_caching = enable_prefix_caching
        self.tables: dict[int, list[int]] = {}  # seq_id -> block ids
        self.num_tokens: dict[int, int] = {}  # seq_id -> tokens allocated (live)
        self._hashes: dict[int, list[BlockHash]] = {}  # seq_id -> hash chain of its full blocks (computed or not)
        self._registered: dict[int, int] = {}  # seq_id -> leading blocks already offered to the index
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_cow_copies = 0

    # -- sizes ---------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq: Sequence) -> list[int]:
        return self.tables[seq.seq_id]

    # -- the scheduler's questions ---------------------------------------------------------------
    def can_admit(self, seq: Sequence, num_tokens: int) -> bool:
        held = len(self.tables.get(seq.seq_id, ()))
        return self.blocks_for(num_tokens) - held <= self.pool.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s table to hold `num_tokens` tokens (copy-on-write first if its next write hits a shared block)."""
        if num_tokens > self.max_model_len:
            raise ValueError(f"num_tokens={num_tokens} exceeds max_model_len={self.max_model_len}")
        sid = seq.seq_id
        table = self.tables.get(sid, [])
        self._register_computed(seq)
        cow = self._shared_write_block(seq, table, num_tokens)
        need = max(0, self.blocks_for(num_tokens) - len(table)) + int(cow is not None)
        if need > self.pool.num_free:
            return False
        if cow is not None:
            self._copy_on_write(table, cow)
        table.extend(self.pool.allocate() for _ in range(self.blocks_for(num_tokens) - len(table)))
        self.tables[sid] = table
        self.num_tokens[sid] = max(num_tokens, self.num_tokens.get(sid, 0))
        return True

    def _shared_write_block(self, seq: Sequence, table: list[int], num_tokens: int) -> int | None:
        """Index in `table` of a shared block that growing `seq` to `num_tokens` would write into, if any.

        Only the block holding position num_computed_tokens can be both shared and written: blocks before it are
        full (never written again), blocks after it were allocated by this sequence alone.
        """
        written = seq.num_computed_tokens
        i = written // self.block_size
        if written < num_tokens and i < len(table) and self.pool.refcount[table[i]] > 1:
            return i
        return None

    def _copy_on_write(self, table: list[int], i: int) -> None:
        old, new = table[i], self.pool.allocate()
        for pool in self.k_pools + self.v_pools:
            pool[new].copy_(pool[old])
        self.pool.decref(old)
        table[i] = new
        self.num_cow_copies += 1

    def free(self, seq: Sequence) -> None:
        sid = seq.seq_id
        if sid not in self.tables:
            return
        self._register_computed(seq)
        table = self.tables.pop(sid)
        for block in reversed(table):  # the tail of a prefix is evicted before its head
            self.pool.decref(block)
        self.num_tokens.pop(sid, None)
        self._hashes.pop(sid, None)
        self._registered.pop(sid, None)

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Let `child` share `parent`'s blocks for the parent's computed tokens; sets child.num_computed_tokens.

        The child must hold no cache yet and start with the same tokens as the parent. Needs no free block: always
        True (the copy of a shared partial block happens later, in allocate, when one of them writes into it).
        """
        if child.seq_id in self.tables:
            raise ValueError(f"child sequence {child.seq_id} already holds KV blocks")
        if parent.seq_id not in self.tables:
            raise ValueError(f"parent sequence {parent.seq_id} holds no KV blocks")
        n = parent.num_computed_tokens
        if len(child) < n or child.token_ids[:n] != parent.token_ids[:n]:
            raise ValueError(f"child's tokens differ from the parent's first {n} computed tokens")
        shared = self.tables[parent.seq_id][: self.blocks_for(n)]
        for block in shared:
            self.pool.incref(block)
        self.tables[child.seq_id] = list(shared)
        self.num_tokens[child.seq_id] = n
        full = n // self.block_size
        self._hashes[child.seq_id] = list(self._hashes.get(parent.seq_id, [])[:full])
        self._registered[child.seq_id] = min(self._registered.get(parent.seq_id, 0), full)
        child.num_computed_tokens = n
        return True

    # -- swapping -------------------------------------------------------------------------------
    def _slots(self, seq: Sequence, n: int) -> torch.Tensor:
        table = self.tables[seq.seq_id]
        if self.blocks_for(n) > len(table):
            raise ValueError(f"sequence {seq.seq_id} holds {len(table)} blocks, too few for {n} tokens")
        pos = torch.arange(n)
        blocks = torch.tensor(table, dtype=torch.int64)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).to(self.device)

    def _flat(self, pool: torch.Tensor) -> torch.Tensor:
        return pool.view(self.num_blocks * self.block_size, *pool.shape[2:])

    def read_tokens(self, seq: Sequence, n: int) -> list[torch.Tensor]:
        """Host copies of the first n tokens' K/V: [n, kv_heads, head_dim] per layer, all K layers then all V."""
        slots = self._slots(seq, n)
        return [self._flat(p).index_select(0, slots).to("cpu") for p in self.k_pools + self.v_pools]

    def write_tokens(self, seq: Sequence, data: list[torch.Tensor]) -> None:
        """Inverse of read_tokens, into `seq`'s freshly allocated (unshared) blocks."""
        pools = self.k_pools + self.v_pools
        if len(data) != len(pools):
            raise ValueError(f"data has {len(data)} tensors, expected {len(pools)} (K then V of every layer)")
        slots = self._slots(seq, data[0].shape[0])
        shared = {b for b in self.tables[seq.seq_id][: self.blocks_for(data[0].shape[0])] if self.pool.refcount[b] > 1}
        if shared:
            raise RuntimeError(f"write_tokens would write shared blocks {sorted(shared)}")
        for p, d in zip(pools, data):
            self._flat(p).index_copy_(0, slots, d.to(p.device, p.dtype))

    # -- prefix caching -------------------------------------------------------------------------
    def _chain(self, seq: Sequence, num_blocks: int) -> list[BlockHash]:
        return extend_chain(self._hashes.setdefault(seq.seq_id, []), seq.token_ids, self.block_size, num_blocks)

    def _register_computed(self, seq: Sequence) -> None:
        """Index the full blocks of `seq` whose tokens are all computed."""
        if not self.enable_prefix_caching:
            return
        sid = seq.seq_id
        table = self.tables.get(sid, [])
        full = min(seq.num_computed_tokens // self.block_size, len(table))
        done = self._registered.get(sid, 0)
        if full <= done:
            return
        chain = self._chain(seq, full)
        for i in range(done, full):
            self.pool.register(table[i], chain[i])
        self._registered[sid] = full

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """Attach the longest run of cached full blocks matching `seq`'s tokens; returns the tokens they hold.

        Never the whole sequence: at least its last token is left to compute, so the model yields logits.
        Sequences that want prompt logprobs skip the cache (they need logits for every prompt token).
        """
        if not self.enable_prefix_caching or seq.seq_id in self.tables:
            return 0
        params = getattr(seq, "params", None)
        if params is not None and getattr(params, "prompt_logprobs", None) is not None:
            return 0
        self.prefix_cache_queries += len(seq)
        chain = self._chain(seq, (len(seq) - 1) // self.block_size)
        blocks = []
        for h in chain:
            block = self.pool.lookup(h)
            if block is None:
                break
            blocks.append(block)
        if not blocks:
            return 0
        for block in blocks:
            self.pool.incref(block)
        self.tables[seq.seq_id] = blocks
        self._registered[seq.seq_id] = len(blocks)
        cached = len(blocks) * self.block_size
        self.num_tokens[seq.seq_id] = cached
        self.prefix_cache_hits += cached
        return cached

    def reclaim_all(self) -> None:
        """Nothing is held idle on the paged path (cached blocks already count as free)."""

    # -- per step -------------------------------------------------------------------------------
    def build_metadata(self, seqs: list[Sequence], query_lens: list[int], device: torch.device) -> AttentionMetadata:
        context_lens = [s.num_computed_tokens + q for s, q in zip(seqs, query_lens)]
        tables = [self.tables[s.seq_id] for s in seqs]
        for s, table, ctx in zip(seqs, tables, context_lens):
            if len(table) < self.blocks_for(ctx):
                raise ValueError(f"sequence {s.seq_id} holds {len(table)} blocks, too few for {ctx} tokens: "
                                 "call allocate() first")
            cow = self._shared_write_block(s, table, ctx)  # a fork after allocate(): copy now
            if cow is not None:
                if not self.pool.num_free:
                    raise RuntimeError(f"sequence {s.seq_id} must copy shared block {table[cow]} before writing, "
                                       "but no block is free")
                self._copy_on_write(table, cow)
        return AttentionMetadata.build_paged(query_lens, context_lens, tables, self.block_size, device)

    @property
    def attention_backend(self) -> PagedAttention:
        return self._attn

    def stats(self) -> KVStats:
        fill: dict[int, int] = {}  # block -> most tokens any holder keeps in it
        for sid, table in self.tables.items():
            n = self.num_tokens.get(sid, 0)
            for i, block in enumerate(table):
                fill[block] = max(fill.get(block, 0), min(self.block_size, max(0, n - i * self.block_size)))
        used = self.pool.num_used
        return KVStats(
            kind=self.kind, page_bytes=self.block_bytes, tokens_per_unit=self.block_size,
            units_total=self.num_blocks, units_free=self.pool.num_free, units_mapped=used, units_idle=0,
            units_shared=self.pool.num_shared, live_tokens=sum(self.num_tokens.values()),
            reserved_bytes=self.num_blocks * self.block_bytes, mapped_bytes=used * self.block_bytes,
            used_bytes=sum(fill.values()) * self.token_bytes,
            prefix_cache_queries=self.prefix_cache_queries, prefix_cache_hits=self.prefix_cache_hits,
        )

    def close(self) -> None:
        self.k_pools, self.v_pools = [], []
        self._attn = None
        self.tables.clear()

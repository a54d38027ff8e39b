"""The paged KV cache: per layer one K and one V pool [num_blocks, block_size, kv_heads, head_dim], allocated up front.

A sequence owns a block table (a list of block ids); token p lives in block table[p // block_size] at offset
p % block_size, in every layer. A "unit" (KVStats) is one block across all layers, K and V.

Sharing. `fork(parent, child)` gives the child the parent's blocks for the parent's computed tokens (refcount + 1
each). A shared block is never written: before a sequence's next token lands in a shared, partially filled block,
`allocate` copies that block (every layer) into a fresh one (copy-on-write). A shared full block needs no copy.

Prefix caching (enable_prefix_caching=True). Once a full block is computed it is registered in the prefix cache
(vattn.kv_cache.prefix_cache) under the hash chain of the tokens up to its end. `match_prefix` finds the longest
chain of cached blocks for a new sequence and `allocate` takes them (refcount + 1). Freed indexed blocks stay cached
and evictable, least recently released first.
"""

from __future__ import annotations

import torch

from vattn.attention.metadata import MetadataArgs
from vattn.attention.paged import PagedAttention
from vattn.kv_cache.base import NO_MATCH, KVCacheManager, KVStats, PrefixMatch
from vattn.kv_cache.block_pool import BlockPool
from vattn.kv_cache.prefix_cache import PrefixCache
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
        self.prefix = PrefixCache(block_size) if enable_prefix_caching else None
        self.pool = BlockPool(num_blocks, self.prefix)
        self._attn = PagedAttention(self.k_pools, self.v_pools, scale=head_dim ** -0.5, block_size=block_size,
                                    kernel=attention_kernel)
        self.tables: dict[int, list[int]] = {}  # seq_id -> block ids
        self.num_tokens: dict[int, int] = {}  # seq_id -> tokens allocated (live)
        self._registered: dict[int, int] = {}  # seq_id -> leading blocks already offered to the prefix cache
        self.num_cow_copies = 0
        self._copies: list[tuple[int, int]] | None = None  # block copies since the last drain, when recording

    # -- sizes ---------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def max_sequence_tokens(self) -> int:
        """The most tokens one sequence could hold with the whole pool to itself."""
        return self.num_blocks * self.block_size

    def block_table(self, seq: Sequence) -> list[int]:
        return self.tables[seq.seq_id]

    # -- lookup, then commit -----------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Sequences that want prompt logprobs skip the cache: they need logits for every prompt token."""
        if self.prefix is None or seq.params.prompt_logprobs is not None or seq.seq_id in self.tables:
            return NO_MATCH
        blocks = self.prefix.match(seq)
        return PrefixMatch(tuple(blocks), len(blocks) * self.block_size, len(seq))

    def allocate(self, seq: Sequence, num_tokens: int, match: PrefixMatch = NO_MATCH) -> bool:
        self.check_length(num_tokens)
        sid = seq.seq_id
        new = sid not in self.tables
        if new:
            table, start = list(match.units), match.num_tokens
            taken = sum(1 for b in table if self.pool.refcount[b] == 0)  # cached blocks leave the free count
            cow = None  # matched blocks are full: the first write lands after them
        else:
            table, start, taken = self.tables[sid], seq.num_computed_tokens, 0
            self._register_computed(seq)
            cow = self._shared_write_block(table, start, num_tokens)
        grow = max(0, self.blocks_for(num_tokens) - len(table))
        if grow + taken + int(cow is not None) > self.pool.num_free:
            return False
        if new:
            for block in table:
                self.pool.incref(block)
            self.tables[sid], self._registered[sid] = table, len(table)
            if self.prefix is not None:
                self.prefix.record(match.queried_tokens, match.num_tokens)
        if cow is not None:
            self._copy_on_write(table, cow)
        table.extend(self.pool.allocate() for _ in range(grow))
        self.num_tokens[sid] = max(num_tokens, self.num_tokens.get(sid, 0))
        return True

    def _copy_block(self, old: int, new: int) -> None:
        for pool in self.k_pools + self.v_pools:
            pool[new].copy_(pool[old])

    def _shared_write_block(self, table: list[int], start: int, stop: int) -> int | None:
        """Index in `table` of a shared block that writing positions [start, stop) would touch, if any.

        Only the block holding position `start` can be both shared and written: blocks before it are full (never
        written again), blocks after it were allocated by this sequence alone.
        """
        i = start // self.block_size
        if start < stop and i < len(table) and self.pool.refcount[table[i]] > 1:
            return i
        return None

    def _copy_on_write(self, table: list[int], i: int) -> None:
        old, new = table[i], self.pool.allocate()
        self._copy_block(old, new)
        if self._copies is not None:
            self._copies.append((old, new))
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
        self._registered.pop(sid, None)
        if self.prefix is not None:
            self.prefix.drop_chain(sid)

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """The child shares the parent's blocks up to its computed tokens (refcount + 1 each).

        A shared partial block is copied later, by whichever of the two writes into it first (allocate). If the
        parent has already been given room past its computed tokens (it writes this step), the child gets its own
        copy of that partial block now; that needs one free block, else False.
        """
        if child.seq_id in self.tables:
            raise ValueError(f"child sequence {child.seq_id} already holds KV blocks")
        if parent.seq_id not in self.tables:
            raise ValueError(f"parent sequence {parent.seq_id} holds no KV blocks")
        n = parent.num_computed_tokens
        if len(child) < n or child.token_ids[:n] != parent.token_ids[:n]:
            raise ValueError(f"child's tokens differ from the parent's first {n} computed tokens")
        copy_last = n % self.block_size != 0 and self.num_tokens[parent.seq_id] > n
        if copy_last and not self.pool.num_free:
            return False
        table = self.tables[parent.seq_id][: self.blocks_for(n)]
        for block in table:
            self.pool.incref(block)
        if copy_last:
            self._copy_on_write(table, len(table) - 1)
        self.tables[child.seq_id] = table
        self.num_tokens[child.seq_id] = n
        full = n // self.block_size
        self._registered[child.seq_id] = min(self._registered.get(parent.seq_id, 0), full)
        if self.prefix is not None:
            self.prefix.fork_chain(parent.seq_id, child.seq_id, full)
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
    def _register_computed(self, seq: Sequence) -> None:
        """Index the full blocks of `seq` whose tokens are all computed."""
        if self.prefix is None:
            return
        sid = seq.seq_id
        table = self.tables.get(sid, [])
        full = min(seq.num_computed_tokens // self.block_size, len(table))
        done = self._registered.get(sid, 0)
        if full > done:
            self.prefix.register_prefix(seq, table[:full], done)
            self._registered[sid] = full

    # -- per step -------------------------------------------------------------------------------
    def metadata_args(self, seqs: list[Sequence], query_lens: list[int]) -> MetadataArgs:
        context_lens = [s.num_computed_tokens + q for s, q in zip(seqs, query_lens)]
        tables = [self.tables[s.seq_id] for s in seqs]
        for s, table, ctx in zip(seqs, tables, context_lens):
            if self.num_tokens[s.seq_id] < ctx:
                raise ValueError(f"sequence {s.seq_id} holds room for {self.num_tokens[s.seq_id]} tokens, too few "
                                 f"for {ctx}: call allocate() first")
            cow = self._shared_write_block(table, s.num_computed_tokens, ctx)
            if cow is not None:
                raise RuntimeError(f"sequence {s.seq_id} would write shared block {table[cow]}: allocate() makes "
                                   "the blocks a step writes private first")
        return MetadataArgs(query_lens, context_lens, block_tables=tables,
                            block_size=self.block_size)

    # -- tensor parallelism: rank 0 records its block copies, the workers make the same ones --------
    def start_recording(self) -> None:
        self._copies = []

    def drain_ops(self) -> list:
        if self._copies is None:
            return []
        ops, self._copies = self._copies, []
        return ops

    def apply_ops(self, ops: list) -> None:
        for old, new in ops:
            self._copy_block(old, new)

    def check_step(self, args: MetadataArgs) -> None:
        bad = [b for t in args.block_tables for b in t if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block ids {bad[:5]} are outside this rank's {self.num_blocks} blocks")

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
        prefix = self.prefix.stats if self.prefix is not None else None
        return KVStats(
            kind=self.kind, page_bytes=self.block_bytes, tokens_per_unit=self.block_size,
            units_total=self.num_blocks, units_free=self.pool.num_free, units_mapped=used, units_idle=0,
            units_shared=self.pool.num_shared, live_tokens=sum(self.num_tokens.values()),
            reserved_bytes=self.num_blocks * self.block_bytes, mapped_bytes=used * self.block_bytes,
            used_bytes=sum(fill.values()) * self.token_bytes,
            prefix_cache_queries=prefix.queries if prefix else 0, prefix_cache_hits=prefix.hits if prefix else 0,
        )

    def close(self) -> None:
        self.k_pools, self.v_pools = [], []
        self._attn = None
        self.tables.clear()

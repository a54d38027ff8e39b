"""The vAttention KV cache: per layer one K and one V *virtual* tensor [max_num_seqs, slot_len, kv_heads, head_dim].

(Or, with layout="interleaved", one virtual tensor [max_num_seqs, slot_len, layers, 2, kv_heads, head_dim] whose
per-layer K and V are strided views: a page then holds every layer of a few tokens, so large pages (2 MiB on GPUs)
still come in small token steps. Which layout attention kernels prefer is for the benchmarks to say.)

Each running sequence owns a batch slot (a row). Physical pages are mapped into the row, in every layer at once,
as the sequence grows. A finished sequence's row keeps its pages mapped for the next sequence in that slot
(deferred reclamation); idle rows give pages back only when the pool runs short. A helper thread maps the pages
the next decode step will need while the current step computes; one lock orders it with everything else here.

Sharing (prefix caching, fork) works in units of one page per tensor holding a whole number of tokens: the unit of
the prefix cache is the tuple of those physical pages. A page mapped in several rows is never written: the
positions a sequence will write are made private (copy-on-write) when they are allocated.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from allocator import (
    JournalMismatchError,
    PagePool,
    PoolExhaustedError,
    VirtualTensor,
    copy_on_write_many,
    map_many,
    open_backend,
    replay,
    unmap_many,
)
from vattn.attention.contiguous import ContiguousAttention
from vattn.attention.metadata import MetadataArgs
from vattn.kv_cache.base import NO_MATCH, KVCacheManager, KVStats, PrefixMatch
from vattn.kv_cache.prefix_cache import PrefixCache
from vattn.kv_cache.slot_table import SlotTable
from vattn.sequence import Sequence

LAYOUTS = ("per_layer", "interleaved")


class VAttentionKVCache(KVCacheManager):
    kind = "vattention"

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_num_seqs: int, max_model_len: int, memory_bytes: int,
                 page_size: int | None = None, background_mapping: bool = True, attention_kernel: str = "auto",
                 enable_prefix_caching: bool = True, layout: str = "per_layer"):
        if layout not in LAYOUTS:
            raise ValueError(f"kv layout must be one of {LAYOUTS}, got {layout!r}")
        device = torch.device(device)
        if device.type == "cuda":  # pages are made on the asked device (cuda:1 is not cuda:0)
            self.backend = open_backend("cuda", page_size=page_size, device=device.index or 0)
        else:
            self.backend = open_backend("host", page_size=page_size)
        self.page_size = page = self.backend.page_size
        self.device = device
        self.num_layers = num_layers
        self.layout = layout
        # bytes of one token in one virtual tensor: a layer's K (or V), or every layer's K and V when interleaved
        self.token_bytes = num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        if layout == "interleaved":
            self.token_bytes *= 2 * num_layers
        # Pad each row to a whole number of pages so that every slot starts on a page boundary.
        align = page // math.gcd(page, self.token_bytes)
        self.slot_len = -(-max_model_len // align) * align
        self.max_model_len = max_model_len
        self.pages_per_slot = self.slot_len * self.token_bytes // page
        self.max_num_seqs = max_num_seqs
        try:
            self._build(num_layers, num_kv_heads, head_dim, dtype, memory_bytes, attention_kernel, layout)
        except BaseException:  # release what was created: a failed start must not keep the pool
            self.close()
            raise
        self.slots = SlotTable(max_num_seqs)
        self.lock = threading.RLock()  # the background mapper takes it per row; every public method holds it
        self.map_wait_seconds = 0.0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vattn-map",
                                            initializer=self.backend.make_current) if background_mapping else None
        self._pending = None
        # A page of the prefix cache must hold a whole number of tokens.
        self.tokens_per_full_page = page // self.token_bytes if page % self.token_bytes == 0 else 0
        self.prefix = PrefixCache(self.tokens_per_full_page) if enable_prefix_caching and self.tokens_per_full_page \
            else None
        self._registered: dict[int, int] = {}  # seq_id -> leading full pages already offered to the prefix cache

    def _build(self, num_layers, num_kv_heads, head_dim, dtype, memory_bytes, attention_kernel, layout) -> None:
        self.tensors: list[VirtualTensor] = []
        self.pool = PagePool(self.backend, memory_bytes)
        num_tensors = 2 * num_layers if layout == "per_layer" else 1
        if self.pool.num_pages < num_tensors:
            raise ValueError(f"kv_cache_memory={memory_bytes} bytes holds {self.pool.num_pages} pages of "
                             f"{self.page_size} bytes, but a token needs a page in each of the {num_tensors} KV "
                             f"tensors: give at least {num_tensors * self.page_size} bytes")
        rows = (self.max_num_seqs, self.slot_len)
        if layout == "per_layer":  # one K and one V tensor per layer: a page holds one layer's K (or V) of tokens
            self.tensors = [VirtualTensor(self.pool, (*rows, num_kv_heads, head_dim), dtype)
                            for _ in range(2 * num_layers)]
            k_views = [t.tensor for t in self.tensors[:num_layers]]
            v_views = [t.tensor for t in self.tensors[num_layers:]]
        else:  # one tensor [slot, token, layer, k|v, head, dim]: a page holds every layer of a few tokens
            self.tensors = [VirtualTensor(self.pool, (*rows, num_layers, 2, num_kv_heads, head_dim), dtype)]
            whole = self.tensors[0].tensor
            k_views = [whole[:, :, layer, 0] for layer in range(num_layers)]  # strided views, no copy
            v_views = [whole[:, :, layer, 1] for layer in range(num_layers)]
        self._attn = ContiguousAttention(k_views, v_views, scale=head_dim ** -0.5, kernel=attention_kernel)

    # -- sizes ---------------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        """Pages (per tensor) a row needs to hold `num_tokens` tokens."""
        return -(-num_tokens * self.token_bytes // self.page_size)

    @property
    def tokens_per_page(self) -> float:
        return self.page_size / self.token_bytes

    @property
    def max_sequence_tokens(self) -> int:
        """The most tokens one sequence could hold with the whole pool to itself."""
        units = self.pool.num_pages // len(self.tensors)
        return min(self.slot_len, units * self.page_size // self.token_bytes)

    def slot(self, seq: Sequence) -> int:
        return self.slots.slot_of[seq.seq_id]

    def _unit(self, slot: int, page: int) -> tuple[int, ...]:
        """The physical pages (one per tensor) mapped at page `page` of row `slot`."""
        v = slot * self.pages_per_slot + page
        return tuple(t.page_at(v) for t in self.tensors)

    def _free_units(self) -> int:
        """Page indices that could be mapped in every tensor from the free list alone."""
        return self.pool.num_free // len(self.tensors)

    # -- lookup, then commit -----------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Sequences that want prompt logprobs skip the cache: they need logits for every prompt token."""
        if self.prefix is None or seq.params.prompt_logprobs is not None or seq.seq_id in self.slots.slot_of:
            return NO_MATCH
        with self.lock:
            units = self.prefix.match(seq)
        return PrefixMatch(tuple(units), len(units) * self.tokens_per_full_page, len(seq))

    def allocate(self, seq: Sequence, num_tokens: int, match: PrefixMatch = NO_MATCH) -> bool:
        self.check_length(num_tokens)
        t0 = time.perf_counter()
        with self.lock:
            self.map_wait_seconds += time.perf_counter() - t0  # the mapping thread held the lock
            slot = self.slots.slot_of.get(seq.seq_id)
            if slot is not None:
                self._register(seq, slot)
                if self._fits_without_change(slot, seq.num_computed_tokens, num_tokens):
                    self.slots.live[slot] = max(self.slots.live[slot], num_tokens)  # the decode step's common case
                    return True
            new = slot is None
            if new:
                slot = self.slots.pick(self.pages_for(num_tokens))
                if slot is None:
                    return False
                start = match.num_tokens
            else:
                start = seq.num_computed_tokens
            k = len(match.units) if new else 0
            written = self._pages_written(slot, start, num_tokens, skip=k)
            shared = [p for p in written if self.pool.refcount(self._unit(slot, p)[0]) > 1]
            missing = max(0, self.pages_for(num_tokens) - max(self.slots.mapped[slot], k))
            need = missing + len(shared)
            if need > self._free_units() and need > self._free_units() + self._reclaimable(slot, set(match.units)):
                return False
            # commit
            if new:
                self.slots.take(seq.seq_id, slot, num_tokens)
                for i, unit in enumerate(match.units):
                    self._share_into(slot, i, unit)
                self._registered[seq.seq_id] = k
                if self.prefix is not None:
                    self.prefix.record(match.queried_tokens, match.num_tokens)
            t1 = time.perf_counter()
            if need > self._free_units():
                self._reclaim(need - self._free_units(), keep=slot)
            base = slot * self.pages_per_slot
            if shared:  # copy-on-write: a shared page is never written while shared (one batch, one device sync)
                copy_on_write_many(self.tensors, [base + p for p in shared])
            if self.prefix is not None:
                for p in written:
                    if p not in shared:
                        self.prefix.forget(self._unit(slot, p))  # its content is about to change
            if missing:
                self._map(slot, missing)
            self.slots.live[slot] = max(self.slots.live[slot], num_tokens)
            self.map_wait_seconds += time.perf_counter() - t1
        return True

    def _sharing_anything(self) -> bool:
        """Some page is mapped in two places or held by the prefix cache: writes must be checked."""
        return bool(self.pool.num_shared or (self.prefix is not None and len(self.prefix)))

    def _fits_without_change(self, slot: int, start: int, stop: int) -> bool:
        """Row `slot` already maps every page for `stop` tokens, and none it writes is shared or cached."""
        if self.pages_for(stop) > self.slots.mapped[slot]:
            return False
        if stop <= start or not self._sharing_anything():
            return True
        # Tokens landing in the page the owner's previous token went to: that write already made the page
        # private and took it out of the prefix cache (only full pages are cached), so only a fork since then
        # (the page shared again) needs the slow path.
        page = start * self.token_bytes // self.page_size
        if start == 0 or (start - 1) * self.token_bytes // self.page_size != page \
                or (stop * self.token_bytes - 1) // self.page_size != page:
            return False
        return self.pool.refcount(self.tensors[0].page_at(slot * self.pages_per_slot + page)) == 1

    def _pages_written(self, slot: int, start: int, stop: int, skip: int = 0) -> list[int]:
        """Mapped pages of the row that writing tokens [start, stop) touches (pages < skip are about to be replaced)."""
        if stop <= start or not self._sharing_anything():
            return []  # nothing shared and nothing cached: the decode step's common case costs no lookups
        first = max(start * self.token_bytes // self.page_size, skip)
        last = (stop * self.token_bytes - 1) // self.page_size
        return list(range(first, min(last + 1, self.slots.mapped[slot])))

    def _map(self, slot: int, count: int) -> None:
        first = slot * self.pages_per_slot + self.slots.mapped[slot]
        map_many(self.tensors, first, count)
        self.slots.mapped[slot] += count

    # -- reclamation ------------------------------------------------------------------------------
    def _spare(self, keep: int | None) -> list[tuple[int, int]]:
        """(row, trailing pages not holding live tokens): idle rows first, largest first, then live rows' surplus
        (left by a longer predecessor in the slot, or mapped ahead)."""
        idle = [(s, self.slots.mapped[s]) for s in sorted(self.slots.free, key=lambda s: -self.slots.mapped[s])]
        surplus = [(s, self.slots.mapped[s] - self.pages_for(self.slots.live[s])) for s in self.slots.slot_of.values()]
        return [(s, n) for s, n in idle + surplus if s != keep and n > 0]

    def _reclaimable(self, keep: int | None, protect: set = frozenset()) -> int:
        """Pages (per tensor) that unmapping spare pages would give back to the pool (not those mapped elsewhere too)."""
        spare = self._spare(keep)
        if not self.pool.num_shared and not protect:
            return sum(n for _, n in spare)
        units = (self._unit(s, p) for s, n in spare for p in range(self.slots.mapped[s] - n, self.slots.mapped[s]))
        return sum(1 for u in units if self.pool.refcount(u[0]) == 1 and u not in protect)

    def _reclaim(self, units: int, keep: int | None = None) -> None:
        """Unmap spare trailing pages until `units` more pages (per tensor) are free, or nothing is spare."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing may still read a page we unmap
        goal = self._free_units() + units
        for slot, spare in self._spare(keep):
            while spare and self._free_units() < goal:
                self._unmap_tail(slot, 1)
                spare -= 1

    def _unmap_tail(self, slot: int, n: int) -> None:
        first = slot * self.pages_per_slot + self.slots.mapped[slot] - n
        units = [self._unit(slot, self.slots.mapped[slot] - n + i) for i in range(n)]
        unmap_many(self.tensors, first, n)
        self.slots.mapped[slot] -= n
        for unit in units:
            if self.prefix is not None and self.pool.refcount(unit[0]) == 0:
                self.prefix.forget(unit)

    def reclaim_all(self) -> None:
        self._drain()
        with self.lock:
            self._reclaim(sum(self.slots.mapped))

    def free(self, seq: Sequence) -> None:
        with self.lock:
            slot = self.slots.slot_of.get(seq.seq_id)
            if slot is None:
                return
            self._register(seq, slot)
            self.slots.release(seq.seq_id)  # pages stay mapped for the slot's next sequence
            self._registered.pop(seq.seq_id, None)
            if self.prefix is not None:
                self.prefix.drop_chain(seq.seq_id)

    # -- sharing: prefix caching and fork --------------------------------------------------------
    def _register(self, seq: Sequence, slot: int) -> None:
        """Enter the sequence's full, computed pages into the prefix cache."""
        if self.prefix is None:
            return
        full = min(seq.num_computed_tokens // self.tokens_per_full_page, self.slots.mapped[slot])
        done = self._registered.get(seq.seq_id, 0)
        if full > done:
            self.prefix.register_prefix(seq, [self._unit(slot, i) for i in range(full)], done)
            self._registered[seq.seq_id] = full

    def _share_into(self, slot: int, page: int, unit: tuple[int, ...]) -> None:
        """Make page `page` of the row map the physical pages `unit` (one per tensor)."""
        v = slot * self.pages_per_slot + page
        current = self.tensors[0].page_at(v)
        if current == unit[0]:
            return
        if current is not None:
            old = self._unit(slot, page)
            for t in self.tensors:
                t.unmap(v)
            if self.prefix is not None and self.pool.refcount(old[0]) == 0:
                self.prefix.forget(old)
        for t, pid in zip(self.tensors, unit):
            t.map_shared(v, pid)
        self.slots.mapped[slot] = max(self.slots.mapped[slot], page + 1)

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """The child's row maps the parent's pages holding its computed tokens.

        A shared partial page is copied later, by whichever of the two writes into it first (allocate). If the
        parent has already been given room past its computed tokens (it writes this step), the child gets its own
        copy of that partial page now; that needs a free page, else False.
        """
        with self.lock:
            if child.seq_id in self.slots.slot_of:
                raise ValueError(f"child sequence {child.seq_id} already holds a KV row")
            if parent.seq_id not in self.slots.slot_of:
                raise ValueError(f"parent sequence {parent.seq_id} holds no KV row")
            n = parent.num_computed_tokens
            if len(child) < n or child.token_ids[:n] != parent.token_ids[:n]:
                raise ValueError(f"child's tokens differ from the parent's first {n} computed tokens")
            pslot, pages = self.slots.slot_of[parent.seq_id], self.pages_for(n)
            slot = self.slots.pick(pages)
            if slot is None:
                return False
            copy_last = (n * self.token_bytes) % self.page_size != 0 and self.slots.live[pslot] > n
            if copy_last and self._free_units() < 1:
                if self._reclaimable(None) < 1:  # (the chosen row has no owner yet: its spare pages count too)
                    return False
                self._reclaim(1)
            self.slots.take(child.seq_id, slot, n)
            for p in range(pages):
                self._share_into(slot, p, self._unit(pslot, p))
            if copy_last:
                copy_on_write_many(self.tensors, [slot * self.pages_per_slot + pages - 1])
            if self.prefix is not None:
                full = n // self.tokens_per_full_page
                self._registered[child.seq_id] = min(self._registered.get(parent.seq_id, 0), full)
                self.prefix.fork_chain(parent.seq_id, child.seq_id, full)
            return True

    # -- swapping: the first n tokens of a sequence's K/V, per tensor ----------------------------
    def read_tokens(self, seq: Sequence, n: int) -> list[torch.Tensor]:
        slot = self.slot(seq)
        return [t.tensor[slot, :n].to("cpu", copy=True) for t in self.tensors]

    def write_tokens(self, seq: Sequence, data: list[torch.Tensor]) -> None:
        slot = self.slot(seq)
        for t, d in zip(self.tensors, data):
            t.tensor[slot, : d.shape[0]].copy_(d)

    # -- background mapping -----------------------------------------------------------------------
    def prefetch(self, seqs: list[Sequence]) -> None:
        """Map, on the helper thread, the page each sequence's next token will need (free pages only)."""
        if self._executor is None or not seqs:
            return
        t0 = time.perf_counter()
        self._drain()
        self.map_wait_seconds += time.perf_counter() - t0
        work = [(self.slots.slot_of[s.seq_id], self.pages_for(min(len(s) + 1, self.max_model_len))) for s in seqs]
        work = [(slot, need) for slot, need in work if need > self.slots.mapped[slot]]
        if work:
            self._pending = self._executor.submit(self._prefetch, work)

    def _prefetch(self, work: list[tuple[int, int]]) -> None:
        for slot, need in work:
            with self.lock:  # a row freed meanwhile only gains surplus pages, which reclamation can take back
                missing = need - self.slots.mapped[slot]
                if missing <= 0:
                    continue
                if missing > self._free_units():
                    return  # the scheduler will reclaim or preempt on the main thread
                try:
                    self._map(slot, missing)
                except PoolExhaustedError:
                    return

    def _drain(self) -> None:
        """Wait for the mapping thread's last batch (before queueing another, and before closing)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    # -- per step -------------------------------------------------------------------------------
    def metadata_args(self, seqs: list[Sequence], query_lens: list[int]) -> MetadataArgs:
        context_lens = [s.num_computed_tokens + q for s, q in zip(seqs, query_lens)]
        slots = [self.slots.slot_of[s.seq_id] for s in seqs]
        for s, slot, ctx in zip(seqs, slots, context_lens):
            if self.slots.live[slot] < ctx:
                raise ValueError(f"sequence {s.seq_id} holds room for {self.slots.live[slot]} tokens, too few for "
                                 f"{ctx}: call allocate() first")
        return MetadataArgs(query_lens, context_lens, slots=slots)

    # -- tensor parallelism: rank 0 records its page operations, the workers replay them ---------
    def start_recording(self) -> None:
        self.pool.start_journal()

    def drain_ops(self) -> list:
        return self.pool.journal.drain() if self.pool.journal is not None else []

    def apply_ops(self, ops: list) -> None:
        replay(self.pool, ops)

    def check_step(self, args: MetadataArgs) -> None:
        """A worker's cheap check before it computes: each sequence's last position is mapped here too."""
        for slot, ctx in zip(args.slots, args.context_lens):
            v = slot * self.pages_per_slot + (ctx * self.token_bytes - 1) // self.page_size
            if not all(t.is_mapped(v) for t in (self.tensors[0], self.tensors[-1])):
                raise JournalMismatchError(f"row {slot} needs page {v} mapped for {ctx} tokens, but this rank's "
                                           "replayed journal left it unmapped")

    @property
    def attention_backend(self) -> ContiguousAttention:
        return self._attn

    def unmapped_positions(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """(tensor index, page) pairs that should hold one of the first `num_tokens` tokens but are not mapped."""
        first = self.slot(seq) * self.pages_per_slot
        return [(i, first + p) for i, t in enumerate(self.tensors)
                for p in range(self.pages_for(num_tokens)) if not t.is_mapped(first + p)]

    def stats(self) -> KVStats:
        with self.lock:
            per_unit = len(self.tensors)
            total = self.pool.num_pages // per_unit
            mapped = self.pool.num_used // per_unit  # physical: a page shared by several rows counts once
            live_pages = {s: min(self.slots.mapped[s], self.pages_for(self.slots.live[s]))
                          for s in self.slots.slot_of.values()}
            if self.pool.num_shared:  # a page mapped in several live rows holds live tokens once
                live = len({self._unit(s, p)[0] for s, n in live_pages.items() for p in range(n)})
            else:
                live = sum(live_pages.values())
            live_tokens = sum(self.slots.live)
            st = self.pool.stats()
            prefix = self.prefix.stats if self.prefix is not None else None
            return KVStats(
                kind=self.kind, page_bytes=self.page_size * per_unit, tokens_per_unit=int(self.tokens_per_page),
                units_total=total, units_free=total - live, units_mapped=mapped, units_idle=mapped - live,
                units_shared=self.pool.num_shared // per_unit, live_tokens=live_tokens,
                prefix_cache_queries=prefix.queries if prefix else 0, prefix_cache_hits=prefix.hits if prefix else 0,
                reserved_bytes=sum(t.num_pages for t in self.tensors) * self.page_size,
                mapped_bytes=mapped * self.page_size * per_unit,
                used_bytes=live_tokens * self.token_bytes * per_unit,
                map_seconds=st.map_seconds, map_wait_seconds=self.map_wait_seconds,
            )

    def close(self) -> None:
        """Unmap and release everything; safe on a half-built cache and when called twice."""
        if getattr(self, "_executor", None) is not None:
            self._drain()
            self._executor.shutdown(wait=True)
            self._executor = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing may still read a page we unmap
        self._attn = None  # its K/V views must not outlive the mappings
        for t in getattr(self, "tensors", []):
            t.close()
        self.tensors = []
        if getattr(self, "pool", None) is not None:
            self.pool.close()
            self.pool = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None

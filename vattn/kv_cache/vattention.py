"""The vAttention KV cache: per layer one K and one V *virtual* tensor [max_num_seqs, slot_len, kv_heads, head_dim].

(Or, with layout="interleaved", one virtual tensor [max_num_seqs, slot_len, layers, 2, kv_heads, head_dim] whose
per-layer K and V are strided views: a page then holds every layer of a few tokens, so large pages (2 MiB on GPUs)
still come in small token steps. Which layout attention kernels prefer is for the benchmarks to say.)

Each running sequence owns a batch slot (a row). Physical pages are mapped into the row, in every layer at once,
as the sequence grows. A finished sequence's row keeps its pages mapped for the next sequence in that slot
(deferred reclamation); idle rows give pages back only when the pool runs short. A helper thread maps the pages
the next decode step will need while the current step computes.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from allocator import PagePool, PoolExhaustedError, VirtualTensor, map_many, open_backend, unmap_many
from vattn.attention.contiguous import ContiguousAttention
from vattn.attention.metadata import AttentionMetadata
from vattn.kv_cache.base import KVCacheManager, KVStats
from vattn.kv_cache.prefix_hash import extend_chain, hash_chain
from vattn.sequence import Sequence

LAYOUTS = ("per_layer", "interleaved")


@dataclass
class PrefixCache:
    """Chain hash of a full page of tokens -> the physical pages (one per tensor) that hold its K/V.
    An entry lives while its pages keep their content: it goes when a page is freed or about to be written."""

    pages: dict[bytes, tuple[int, ...]] = field(default_factory=dict)
    hash_of: dict[int, bytes] = field(default_factory=dict)  # first tensor's physical page -> chain hash
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found cached

    def add(self, h: bytes, pids: tuple[int, ...]) -> None:
        if h not in self.pages and pids[0] not in self.hash_of:
            self.pages[h] = pids
            self.hash_of[pids[0]] = h

    def forget_page(self, pid: int) -> None:
        h = self.hash_of.pop(pid, None)
        if h is not None:
            del self.pages[h]

    def longest_prefix(self, hashes: list[bytes]) -> list[tuple[int, ...]]:
        hits = []
        for h in hashes:
            if h not in self.pages:
                break
            hits.append(self.pages[h])
        return hits

    def record_query(self, tokens: int, hit_tokens: int) -> None:
        self.queries += tokens
        self.hits += hit_tokens


class VAttentionKVCache(KVCacheManager):
    kind = "vattention"

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_num_seqs: int, max_model_len: int, memory_bytes: int,
                 page_size: int | None = None, background_mapping: bool = True, attention_kernel: str = "auto",
                 enable_prefix_caching: bool = True, layout: str = "per_layer"):
        self.backend = open_backend("cuda" if device.type == "cuda" else "host", page_size=page_size)
        self.page_size = page = self.backend.page_size
        self.device = device
        self.num_layers = num_layers
        if layout not in LAYOUTS:
            raise ValueError(f"kv layout must be one of {LAYOUTS}, got {layout!r}")
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
        self.pool = PagePool(self.backend, memory_bytes)
        rows = (max_num_seqs, self.slot_len)
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
        self.slot_of: dict[int, int] = {}  # seq_id -> slot
        self.free_slots: list[int] = list(range(max_num_seqs))
        self.mapped = [0] * max_num_seqs  # leading pages mapped in each slot's row (same in every tensor)
        self.live = [0] * max_num_seqs  # tokens of the owning sequence a slot must keep mapped
        self.lock = threading.Lock()
        self.map_wait_seconds = 0.0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vattn-map",
                                            initializer=self.backend.make_current) if background_mapping else None
        self._pending: Future | None = None
        # Sharing: a cached page is one physical page per tensor holding one full page of tokens. Only possible
        # when a page holds a whole number of tokens.
        self.tokens_per_full_page = page // self.token_bytes if page % self.token_bytes == 0 else 0
        self.prefix_caching = enable_prefix_caching and self.tokens_per_full_page > 0
        self.cache = PrefixCache()
        self.seq_hashes: dict[int, list[int]] = {}  # seq_id -> chain hashes of its full, computed pages

    # -- sizes ---------------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        """Pages (per tensor) a row needs to hold `num_tokens` tokens."""
        return -(-num_tokens * self.token_bytes // self.page_size)

    @property
    def tokens_per_page(self) -> float:
        return self.page_size / self.token_bytes

    def _free_units(self) -> int:
        """Page indices that could be mapped in every tensor from the free list alone."""
        return self.pool.num_free // len(self.tensors)

    def _idle_units(self, exclude: int | None = None) -> int:
        """Pages (per tensor) that reclamation could unmap: idle rows and the surplus of live rows."""
        return (sum(self.mapped[s] for s in self.free_slots if s != exclude)
                + sum(self._surplus(s) for s in self.slot_of.values()))

    # -- the scheduler's questions ---------------------------------------------------------------
    def _pick_slot(self, num_tokens: int) -> int:
        """A free slot, preferring one whose row already holds enough mapped pages (deferred reclamation)."""
        need = self.pages_for(num_tokens)
        return min(self.free_slots, key=lambda s: (self.mapped[s] < need, -self.mapped[s] if self.mapped[s] < need
                                                   else self.mapped[s]))

    def _slot_for(self, seq: Sequence, num_tokens: int) -> int | None:
        slot = self.slot_of.get(seq.seq_id)
        if slot is None and self.free_slots:
            slot = self._pick_slot(num_tokens)
        return slot

    def can_admit(self, seq: Sequence, num_tokens: int) -> bool:
        self.wait_prefetch()
        slot = self._slot_for(seq, num_tokens)
        if slot is None:
            return False
        missing = self.pages_for(num_tokens) - self.mapped[slot]
        return missing <= self._free_units() + self._idle_units(exclude=slot)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        if num_tokens > self.max_model_len:
            raise ValueError(f"sequence of {num_tokens} tokens exceeds max_model_len={self.max_model_len}")
        self.wait_prefetch()
        slot = self._slot_for(seq, num_tokens)
        if slot is None:
            return False
        new_slot = seq.seq_id not in self.slot_of
        if self.prefix_caching and not new_slot:
            self._register(seq, slot)
        shared = self._shared_pages_to_write(slot, seq.num_computed_tokens, num_tokens)
        missing = max(0, self.pages_for(num_tokens) - self.mapped[slot])
        if missing + len(shared) > self._free_units():
            self._reclaim(missing + len(shared) - self._free_units(), keep=slot)
            if missing + len(shared) > self._free_units():
                return False
        t0 = time.perf_counter()
        with self.lock:
            base = slot * self.pages_per_slot
            for p in shared:  # copy-on-write: a shared page is never written while shared
                for t in self.tensors:
                    t.copy_on_write(base + p)
            if missing:
                self._map(slot, missing)
        self.map_wait_seconds += time.perf_counter() - t0
        if new_slot:
            self.free_slots.remove(slot)
            self.slot_of[seq.seq_id] = slot
        self.live[slot] = num_tokens
        return True

    def _shared_pages_to_write(self, slot: int, start: int, stop: int) -> list[int]:
        """Pages of the slot that tokens [start, stop) will be written to and that are mapped elsewhere too.
        Pages written while cached only here leave the prefix cache (their content is about to change)."""
        if stop <= start or not (self.pool.num_shared or self.cache.pages):
            return []  # nothing shared and nothing cached: the decode step's common case costs no lookups
        base = slot * self.pages_per_slot
        first, last = start * self.token_bytes // self.page_size, (stop * self.token_bytes - 1) // self.page_size
        shared = []
        for p in range(first, min(last + 1, self.mapped[slot])):
            pid = self.tensors[0].page_at(base + p)
            if self.pool.refcount(pid) > 1:
                shared.append(p)
            else:
                self.cache.forget_page(pid)
        return shared

    def _map(self, slot: int, count: int) -> None:
        first = slot * self.pages_per_slot + self.mapped[slot]
        map_many(self.tensors, first, count)
        self.mapped[slot] += count

    def _surplus(self, slot: int) -> int:
        """Pages mapped in a live row beyond what its sequence holds (left by a longer predecessor, or mapped ahead)."""
        return max(0, self.mapped[slot] - self.pages_for(self.live[slot]))

    def _reclaim(self, units: int, keep: int | None = None) -> None:
        """Unmap up to `units` trailing pages: from idle rows first (largest first), then the surplus of live rows."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing may still read a page we unmap
        idle = [(s, self.mapped[s]) for s in sorted(self.free_slots, key=lambda s: -self.mapped[s]) if s != keep]
        surplus = [(s, self._surplus(s)) for s in self.slot_of.values() if s != keep]
        for slot, spare in idle + surplus:
            if units <= 0:
                break
            n = min(units, spare)
            if n:
                self._unmap_tail(slot, n)
                units -= n

    def _unmap_tail(self, slot: int, n: int) -> None:
        first = slot * self.pages_per_slot + self.mapped[slot] - n
        pids = [self.tensors[0].page_at(first + i) for i in range(n)]
        with self.lock:
            unmap_many(self.tensors, first, n)
            self.mapped[slot] -= n
        for pid in pids:
            if self.pool.refcount(pid) == 0:
                self.cache.forget_page(pid)

    def free(self, seq: Sequence) -> None:
        slot = self.slot_of.get(seq.seq_id)
        if slot is None:
            return
        if self.prefix_caching:
            self._register(seq, slot)
        del self.slot_of[seq.seq_id]
        self.seq_hashes.pop(seq.seq_id, None)
        self.live[slot] = 0
        self.free_slots.append(slot)  # pages stay mapped for the slot's next sequence

    def reclaim_all(self) -> None:
        self.wait_prefetch()
        self._reclaim(sum(self.mapped))

    def slot(self, seq: Sequence) -> int:
        return self.slot_of[seq.seq_id]

    # -- sharing: prefix caching and fork --------------------------------------------------------
    def _register(self, seq: Sequence, slot: int) -> None:
        """Enter the sequence's full, computed pages into the prefix cache."""
        tpp = self.tokens_per_full_page
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        full = seq.num_computed_tokens // tpp
        if full <= len(hashes):
            return
        start = len(hashes)
        extend_chain(hashes, seq.token_ids, tpp, limit=full)
        base = slot * self.pages_per_slot
        for i in range(start, full):
            self.cache.add(hashes[i], tuple(t.page_at(base + i) for t in self.tensors))

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """Map the longest cached run of full pages of `seq`'s tokens into a slot for it; return its length."""
        if not self.prefix_caching or seq.params.prompt_logprobs is not None or not self.free_slots:
            return 0
        self.wait_prefetch()
        tpp = self.tokens_per_full_page
        usable = (len(seq) - 1) // tpp  # always compute at least one token, so the model yields logits
        hashes = hash_chain(seq.token_ids, tpp, limit=usable)
        hits = self.cache.longest_prefix(hashes)
        self.cache.record_query(len(seq), len(hits) * tpp)
        if not hits:
            return 0
        slot = self._pick_slot(len(seq))
        with self.lock:
            for i, pages in enumerate(hits):
                self._share_into(slot, i, pages)
        self.free_slots.remove(slot)
        self.slot_of[seq.seq_id] = slot
        self.seq_hashes[seq.seq_id] = hashes[: len(hits)]
        self.live[slot] = len(hits) * tpp
        return len(hits) * tpp

    def _share_into(self, slot: int, page: int, pids: tuple[int, ...]) -> None:
        """Make virtual page `page` of the slot map the physical pages `pids` (one per tensor)."""
        v = slot * self.pages_per_slot + page
        current = self.tensors[0].page_at(v)
        if current == pids[0]:
            return
        if current is not None:
            for t in self.tensors:
                t.unmap(v)
            if self.pool.refcount(current) == 0:
                self.cache.forget_page(current)
        for t, pid in zip(self.tensors, pids):
            t.map_shared(v, pid)
        self.mapped[slot] = max(self.mapped[slot], page + 1)

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Let `child` share all of `parent`'s cached tokens (its pages are mapped into the child's slot)."""
        self.wait_prefetch()
        n = parent.num_computed_tokens
        if not self.free_slots:
            return False
        slot, pslot = self._pick_slot(n), self.slot_of[parent.seq_id]
        pbase = pslot * self.pages_per_slot
        with self.lock:
            for p in range(self.pages_for(n)):
                self._share_into(slot, p, tuple(t.page_at(pbase + p) for t in self.tensors))
        self.free_slots.remove(slot)
        self.slot_of[child.seq_id] = slot
        self.live[slot] = n
        if parent.seq_id in self.seq_hashes:
            self.seq_hashes[child.seq_id] = list(self.seq_hashes[parent.seq_id])
        return True

    # -- swapping: the first n tokens of a sequence's K/V, per tensor ----------------------------
    def read_tokens(self, seq: Sequence, n: int) -> list[torch.Tensor]:
        slot = self.slot_of[seq.seq_id]
        return [t.tensor[slot, :n].to("cpu", copy=True) for t in self.tensors]

    def write_tokens(self, seq: Sequence, data: list[torch.Tensor]) -> None:
        slot = self.slot_of[seq.seq_id]
        for t, d in zip(self.tensors, data):
            t.tensor[slot, : d.shape[0]].copy_(d)

    # -- background mapping -----------------------------------------------------------------------
    def prefetch(self, seqs: list[Sequence]) -> None:
        """Map, on the helper thread, the page each sequence's next token will need (free pages only)."""
        if self._executor is None:
            return
        work = [(self.slot_of[s.seq_id], self.pages_for(min(len(s) + 1, self.max_model_len))) for s in seqs]
        work = [(slot, need - self.mapped[slot]) for slot, need in work if need > self.mapped[slot]]
        if work:
            self._pending = self._executor.submit(self._prefetch, work)

    def _prefetch(self, work: list[tuple[int, int]]) -> None:
        for slot, missing in work:
            with self.lock:
                if missing > self._free_units():
                    return  # the scheduler will reclaim or preempt on the main thread
                try:
                    self._map(slot, missing)
                except PoolExhaustedError:
                    return

    def wait_prefetch(self) -> None:
        if self._pending is not None:
            t0 = time.perf_counter()
            self._pending.result()
            self.map_wait_seconds += time.perf_counter() - t0
            self._pending = None

    # -- per step -------------------------------------------------------------------------------
    def build_metadata(self, seqs: list[Sequence], query_lens: list[int], device: torch.device) -> AttentionMetadata:
        context_lens = [s.num_computed_tokens + q for s, q in zip(seqs, query_lens)]
        slots = [self.slot_of[s.seq_id] for s in seqs]
        return AttentionMetadata.build_contiguous(query_lens, context_lens, slots, device)

    @property
    def attention_backend(self) -> ContiguousAttention:
        return self._attn

    def unmapped_positions(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """(tensor index, page) pairs that should hold one of the first `num_tokens` tokens but are not mapped."""
        slot = self.slot_of[seq.seq_id]
        first = slot * self.pages_per_slot
        return [(i, first + p) for i, t in enumerate(self.tensors)
                for p in range(self.pages_for(num_tokens)) if not t.is_mapped(first + p)]

    def stats(self) -> KVStats:
        unit_pages = len(self.tensors)
        mapped_units = self.pool.num_used // unit_pages  # physical: a page shared by several rows counts once
        idle = self._idle_units()
        live_units = sum(self.mapped[s] for s in self.slot_of.values())
        if self.pool.num_shared:  # count a page mapped in several live rows once
            t0 = self.tensors[0]
            live_units = len({t0.page_at(s * self.pages_per_slot + p) for s in self.slot_of.values()
                              for p in range(self.mapped[s])})
        live_tokens = sum(self.live)
        st = self.pool.stats()
        return KVStats(
            kind=self.kind, page_bytes=self.page_size * unit_pages, tokens_per_unit=int(self.tokens_per_page),
            units_total=self.pool.num_pages // unit_pages, units_free=self.pool.num_pages // unit_pages - live_units,
            units_mapped=mapped_units, units_idle=idle,
            units_shared=self.pool.num_shared // unit_pages, live_tokens=live_tokens,
            prefix_cache_queries=self.cache.queries, prefix_cache_hits=self.cache.hits,
            reserved_bytes=sum(t.num_pages for t in self.tensors) * self.page_size,
            mapped_bytes=mapped_units * self.page_size * unit_pages,
            used_bytes=live_tokens * self.token_bytes * unit_pages,
            map_seconds=st.map_seconds, map_wait_seconds=self.map_wait_seconds,
        )

    def close(self) -> None:
        if self._executor is not None:
            self.wait_prefetch()
            self._executor.shutdown(wait=True)
            self._executor = None
        for t in self.tensors:
            t.close()
        self.tensors = []
        self.pool.close()
        self.backend.close()

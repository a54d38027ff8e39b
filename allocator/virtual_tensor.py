"""VirtualTensor: a torch tensor over reserved address space, backed page by page on demand."""

import math
import time
from dataclasses import asdict

import torch

from .errors import AllocatorError, MappingError
from .pool import PagePool
from .stats import AllocatorStats, Counters


def _check_shape(shape) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of positive ints, got {shape!r}") from None
    if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in dims):
        raise ValueError(f"shape must be a non-empty sequence of positive ints, got {shape!r}")
    return dims


class VirtualTensor:
    """A tensor of `shape` / `dtype` whose address range is reserved up front (rounded up to whole
    pages) and whose pages are mapped from a PagePool on demand.

    `tensor` is a plain torch tensor over the range (no copy), usable by unmodified kernels.
    Reading or writing an unmapped page kills the process (SIGSEGV on host, illegal address on
    cuda). On cuda, wait for kernels that use a page before unmapping or remapping it.
    After close() the range is gone: do not keep using `tensor`.
    """

    def __init__(self, pool: PagePool, shape, dtype: torch.dtype = torch.float16):
        if not isinstance(pool, PagePool):
            raise ValueError(f"pool must be a PagePool, got {type(pool).__name__}")
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
        self.shape = _check_shape(shape)
        self.dtype = dtype
        self.pool = pool
        self.backend = pool.backend
        self.page_size = pool.page_size
        self.nbytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()
        self.num_pages = -(-self.nbytes // self.page_size)
        self.reserved_bytes = self.num_pages * self.page_size
        self.counters = Counters()
        self.closed = False
        self._pages: dict[int, int] = {}  # vpage -> physical page id; sparse, so reserving is O(1)
        with pool.lock:
            pool.check_open("VirtualTensor")
            self.address = self.backend.reserve(self.reserved_bytes)
            try:
                self._tensor = self.backend.tensor(self.address, self.shape, dtype, owner=self)
            except BaseException:
                self.backend.free_reservation(self.address, self.reserved_bytes)
                raise
            self.index = pool.register(self)  # journal entries name tensors by it

    # -- views --------------------------------------------------------------------------
    @property
    def tensor(self) -> torch.Tensor:
        if self.closed:
            raise AllocatorError("VirtualTensor.tensor: the tensor is closed")
        return self._tensor

    def page_at(self, vpage: int) -> int | None:
        """Physical page id mapped at virtual page `vpage`, or None."""
        self._check_range("page_at", vpage, 1)
        return self._pages.get(vpage)

    def is_mapped(self, vpage: int) -> bool:
        return self.page_at(vpage) is not None

    def mapped_pages(self) -> list[int]:
        """Sorted virtual pages that are mapped."""
        return sorted(self._pages)

    def page_of_offset(self, byte_offset: int) -> int:
        """The virtual page that byte `byte_offset` of the tensor falls in."""
        if not isinstance(byte_offset, int) or isinstance(byte_offset, bool) or not 0 <= byte_offset < self.nbytes:
            raise MappingError(f"page_of_offset: byte_offset={byte_offset!r} is outside the tensor (0..{self.nbytes - 1})")
        return byte_offset // self.page_size

    def pages_for_bytes(self, start: int, stop: int) -> range:
        """Virtual pages covering bytes [start, stop) of the tensor (empty range if stop <= start)."""
        if stop <= start:
            return range(0)
        return range(self.page_of_offset(start), self.page_of_offset(stop - 1) + 1)

    @property
    def num_mapped(self) -> int:
        """Number of virtual pages currently mapped."""
        return len(self._pages)

    @property
    def stats(self) -> AllocatorStats:
        """Bytes and call counters of this tensor; page counts of the whole pool."""
        pool, c = self.pool, self.counters
        return AllocatorStats(
            reserved_bytes=0 if self.closed else self.reserved_bytes, mapped_bytes=self.num_mapped * self.page_size,
            pages_total=pool.num_pages, pages_free=pool.num_free, pages_used=pool.num_used,
            pages_shared=pool.num_shared, **asdict(c),
        )

    # -- mapping ------------------------------------------------------------------------
    def map(self, first: int, count: int = 1) -> list[int]:
        """Map `count` fresh pool pages at virtual pages [first, first+count); returns their ids.

        All or nothing: PoolExhaustedError (nothing changed) if the pool has too few free pages.
        """
        with self.pool.lock:
            self.check_can_map("map", first, count)
            ids = self.pool.take(count)
            try:
                self._map_ids(first, ids)
            except BaseException:
                for pid in ids:
                    self.pool.decref(pid)
                raise
            if self.pool.journal is not None:
                self.pool.journal.record("map", (self.index,), first, count, [list(ids)])
            return ids

    def map_shared(self, vpage: int, page_id: int) -> None:
        """Map physical page `page_id`, already used elsewhere, at `vpage` as well (refcount += 1)."""
        with self.pool.lock:
            self.check_can_map("map_shared", vpage, 1)
            self.pool.incref("map_shared", page_id)
            try:
                self._map_ids(vpage, [page_id])
            except BaseException:
                self.pool.decref(page_id)
                raise
            if self.pool.journal is not None:
                self.pool.journal.record("share", self.index, vpage, page_id)

    def unmap(self, first: int, count: int = 1) -> None:
        """Unmap virtual pages [first, first+count); each page's refcount drops by one."""
        with self.pool.lock:
            self.check_can_unmap("unmap", first, count)
            self._unmap_range(first, count)
            if self.pool.journal is not None:
                self.pool.journal.record("unmap", (self.index,), first, count)

    def copy_on_write(self, vpage: int) -> bool:
        """If the page at `vpage` is shared, give this tensor a private copy; True if it copied.
        (copy_on_write_many does many pages, of many tensors, with one device synchronization.)"""
        with self.pool.lock:
            self.check_can_unmap("copy_on_write", vpage, 1)
            return copy_on_write_pages(self.pool, [(self, vpage)]) == 1

    def close(self) -> None:
        """Unmap every page and free the reservation. Idempotent.

        Waits for the device first (nothing queued may still read a page). Afterwards `tensor` raises, and a
        write through a view taken before close() raises RuntimeError instead of touching freed memory (where
        torch offers that); a read through such a view still faults: drop views before closing.
        """
        with self.pool.lock:
            if self.closed:
                return
            self.backend.synchronize()
            vpages, i = sorted(self._pages), 0
            while i < len(vpages):  # unmap runs of consecutive virtual pages, one backend call each
                n = 1
                while i + n < len(vpages) and vpages[i + n] == vpages[i] + n:
                    n += 1
                self._unmap_range(vpages[i], n)
                i += n
            self.backend.free_reservation(self.address, self.reserved_bytes)
            self.pool.unregister(self)
            _forbid_writes(self._tensor)
            self._tensor = None
            self.closed = True

    def __enter__(self) -> "VirtualTensor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VirtualTensor(shape={self.shape}, dtype={self.dtype}, pages={self.num_mapped}/{self.num_pages} "
                f"mapped, closed={self.closed})")

    # -- checks (shared with map_many / unmap_many) -------------------------------------
    def _check_range(self, what: str, first: int, count: int) -> None:
        if self.closed:
            raise MappingError(f"{what}: the VirtualTensor is closed")
        for name, v in (("first", first), ("count", count)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise MappingError(f"{what}: {name} must be an int, got {v!r}")
        if count < 1:
            raise MappingError(f"{what}: count={count} must be >= 1")
        if first < 0 or first + count > self.num_pages:
            raise MappingError(f"{what}: virtual pages [{first}, {first + count}) are outside the tensor's "
                               f"{self.num_pages} page(s)")

    def check_can_map(self, what: str, first: int, count: int) -> None:
        self.pool.check_open(what)
        self._check_range(what, first, count)
        taken = [v for v in range(first, first + count) if v in self._pages]
        if taken:
            raise MappingError(f"{what}: virtual page(s) {_short(taken)} already mapped; unmap first")

    def check_can_unmap(self, what: str, first: int, count: int) -> None:
        self._check_range(what, first, count)
        missing = [v for v in range(first, first + count) if v not in self._pages]
        if missing:
            raise MappingError(f"{what}: virtual page(s) {_short(missing)} not mapped")

    # -- backend calls with bookkeeping (caller holds the pool lock) ----------------------
    def _timed_map(self, addr: int, ids: list[int], remap: bool = False) -> None:
        _map_timed(self.pool, addr, ids, (self.counters, self.pool.counters), remap)

    def _timed_unmap(self, addr: int, count: int) -> None:
        _unmap_timed(self.pool, addr, count, (self.counters, self.pool.counters))

    def _map_ids(self, first: int, ids: list[int]) -> None:
        self._timed_map(self.address + first * self.page_size, ids)
        for i, pid in enumerate(ids):
            self._pages[first + i] = pid

    def _unmap_range(self, first: int, count: int) -> None:
        self._timed_unmap(self.address + first * self.page_size, count)
        for v in range(first, first + count):
            self.pool.decref(self._pages.pop(v))


def _short(items: list[int], limit: int = 8) -> str:
    return str(items) if len(items) <= limit else f"{items[:limit]} ... ({len(items)} in all)"


def _map_timed(pool: PagePool, addr: int, ids: list[int], counters, remap: bool = False) -> None:
    t0 = time.perf_counter()
    (pool.backend.remap if remap else pool.backend.map)(addr, pool.phys, ids)
    dt = time.perf_counter() - t0
    for c in counters:
        c.map_calls += 1
        c.map_seconds += dt
        c.pages_mapped += len(ids)


def _unmap_timed(pool: PagePool, addr: int, count: int, counters) -> None:
    t0 = time.perf_counter()
    pool.backend.unmap(addr, count)
    dt = time.perf_counter() - t0
    for c in counters:
        c.unmap_calls += 1
        c.unmap_seconds += dt
        c.pages_unmapped += count


def copy_on_write_pages(pool: PagePool, items: list[tuple["VirtualTensor", int]]) -> int:
    """Give each (tensor, mapped vpage) whose page is shared a private copy; returns how many were copied.

    The caller holds pool.lock and has checked that every vpage is mapped. Items are decided in order: a page
    shared by exactly two of the items is copied for the first only. All copies go through one staging range
    and one backend.copy_many (one device synchronization for the whole batch). PoolExhaustedError if the pool
    lacks free pages for every copy, with nothing changed; after a backend failure the items already switched
    keep their private copies and the rest keep their shared pages.
    """
    planned: dict[int, int] = {}
    plan = []
    for t, v in items:
        old = t._pages[v]
        if pool.refcount(old) - planned.get(old, 0) >= 2:
            planned[old] = planned.get(old, 0) + 1
            plan.append((t, v, old))
    if not plan:
        return 0
    ps = pool.page_size
    new = pool.take(len(plan))
    try:  # fill the fresh pages through a staging range: map, copy, unmap
        scratch = pool.scratch(len(plan))
        _map_timed(pool, scratch, new, (pool.counters,))
        try:
            pool.backend.copy_many([(scratch + i * ps, t.address + v * ps, ps) for i, (t, v, _) in enumerate(plan)])
        finally:
            _unmap_timed(pool, scratch, len(plan), (pool.counters,))
    except BaseException:
        for pid in new:
            pool.decref(pid)
        raise
    for i, ((t, v, old), pid) in enumerate(zip(plan, new)):  # then swap each copy in where the shared page was
        addr = t.address + v * ps
        try:
            _map_timed(pool, addr, [pid], (t.counters, pool.counters), remap=True)
        except BaseException:
            for rest in new[i:]:
                pool.decref(rest)
            pool.backend.remap(addr, pool.phys, [old])  # put the shared page back
            raise
        t._pages[v] = pid
        pool.decref(old)
        t.counters.cow_copies += 1
        pool.counters.cow_copies += 1
    if pool.journal is not None:
        pool.journal.record("cow", [(t.index, v) for t, v in items], [t._pages[v] for t, v in items])
    return len(plan)


def _forbid_writes(tensor: torch.Tensor | None) -> None:
    """Make writes through any view of `tensor` raise (torch's flag on the shared storage), where torch has it."""
    forbid = getattr(torch._C, "_set_throw_on_mutable_data_ptr", None)
    if tensor is not None and forbid is not None:
        forbid(tensor)

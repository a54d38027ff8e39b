"""PagePool: a fixed set of physical pages created up front, with refcounts and a free list."""

import heapq
import threading
from dataclasses import asdict

from .backend import Backend
from .errors import AllocatorError, MappingError, PoolExhaustedError
from .journal import Journal
from .stats import AllocatorStats, Counters


class PagePool:
    """floor(budget_bytes / page_size) physical pages of one backend.

    A page is free (refcount 0), used (>= 1 mapping) or shared (>= 2 mappings). Free pages are
    handed out lowest id first, so pages taken together tend to be physically consecutive.
    One re-entrant lock guards the pool and every VirtualTensor on it, so a background thread
    may map while another unmaps.

    close() releases the physical pages. It raises AllocatorError while VirtualTensors on this
    pool are still open, unless force=True, which closes them first (leaving the `with` block
    does that too). Fresh pages are not zeroed.
    """

    def __init__(self, backend: Backend, budget_bytes: int):
        if not isinstance(backend, Backend):
            raise ValueError(f"backend must be an allocator Backend, got {type(backend).__name__}")
        if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be a positive int, got {budget_bytes!r}")
        num_pages = budget_bytes // backend.page_size
        if num_pages == 0:
            raise ValueError(f"budget_bytes={budget_bytes} is less than one page ({backend.page_size} bytes): "
                             "the pool would have 0 pages")
        backend.check_open("PagePool")
        self.backend = backend
        self.page_size = backend.page_size
        self.num_pages = num_pages
        self.lock = threading.RLock()
        self.counters = Counters()
        self.closed = False
        self._refcount = [0] * num_pages
        self._free = list(range(num_pages))  # a sorted list is already a valid heap
        self._num_shared = 0
        self._tensors: dict[int, object] = {}  # id -> open VirtualTensor
        self._by_index: dict[int, object] = {}  # index (opening order) -> open VirtualTensor
        self._next_index = 0
        self.journal: Journal | None = None  # records page operations when started (see allocator.journal)
        self._scratch: int | None = None  # a reservation used to stage copy-on-write copies
        self._scratch_pages = 0
        self.phys = backend.create_physical(num_pages)  # last: nothing after it can fail and leak the pages

    # -- public state -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def num_shared(self) -> int:
        return self._num_shared

    def refcount(self, page_id: int) -> int:
        self._check_id("refcount", page_id)
        return self._refcount[page_id]

    @property
    def tensors(self) -> list:
        """The VirtualTensors currently open on this pool."""
        return list(self._tensors.values())

    def stats(self) -> AllocatorStats:
        with self.lock:
            c = self.counters
            return AllocatorStats(
                reserved_bytes=sum(t.reserved_bytes for t in self._tensors.values()),
                mapped_bytes=sum(t.num_mapped for t in self._tensors.values()) * self.page_size,
                pages_total=self.num_pages, pages_free=self.num_free, pages_used=self.num_used,
                pages_shared=self._num_shared, **asdict(c),
            )

    # -- used by VirtualTensor (callers hold self.lock) -----------------------------------
    def check_open(self, what: str) -> None:
        if self.closed:
            raise AllocatorError(f"{what}: the page pool is closed")

    def _check_id(self, what: str, page_id: int) -> None:
        if not isinstance(page_id, int) or isinstance(page_id, bool) or not 0 <= page_id < self.num_pages:
            raise MappingError(f"{what}: page_id={page_id!r} is not a page of this pool (0..{self.num_pages - 1})")

    def take(self, count: int) -> list[int]:
        """Take `count` free pages (refcount 0 -> 1). All or nothing."""
        if count > len(self._free):
            raise PoolExhaustedError(f"pool exhausted: {count} page(s) requested, {len(self._free)} of "
                                     f"{self.num_pages} free ({self.page_size} bytes each)")
        ids = [heapq.heappop(self._free) for _ in range(count)]
        for pid in ids:
            self._refcount[pid] = 1
        return ids

    def incref(self, what: str, page_id: int) -> None:
        """Add a mapping of a page that is already used (sharing)."""
        self._check_id(what, page_id)
        rc = self._refcount[page_id]
        if rc == 0:
            raise MappingError(f"{what}: physical page {page_id} is free (refcount 0); "
                               "only a page that is mapped somewhere can be shared")
        self._refcount[page_id] = rc + 1
        if rc == 1:
            self._num_shared += 1

    def decref(self, page_id: int) -> None:
        """Drop one mapping of a page; at refcount 0 it goes back to the free list."""
        rc = self._refcount[page_id]
        if rc <= 0:
            raise AllocatorError(f"internal: decref of free page {page_id}")
        self._refcount[page_id] = rc - 1
        if rc == 2:
            self._num_shared -= 1
        elif rc == 1:
            heapq.heappush(self._free, page_id)

    def scratch(self, num_pages: int = 1) -> int:
        """Address of a reservation of at least `num_pages` pages used as a staging area (copy-on-write); it
        grows by doubling and lives until close()."""
        if self._scratch_pages < num_pages:
            size = max(num_pages, 2 * self._scratch_pages)
            addr = self.backend.reserve(size * self.page_size)
            if self._scratch is not None:
                self.backend.free_reservation(self._scratch, self._scratch_pages * self.page_size)
            self._scratch, self._scratch_pages = addr, size
        return self._scratch

    def register(self, tensor) -> int:
        """Track an open tensor; returns its index: 0, 1, ... in the order tensors are opened on this pool."""
        index, self._next_index = self._next_index, self._next_index + 1
        self._tensors[id(tensor)] = tensor
        self._by_index[index] = tensor
        return index

    def unregister(self, tensor) -> None:
        self._tensors.pop(id(tensor), None)
        self._by_index.pop(getattr(tensor, "index", None), None)

    def tensor_at(self, index: int):
        """The open VirtualTensor opened `index`-th on this pool."""
        if index not in self._by_index:
            raise MappingError(f"no open VirtualTensor with index {index} on this pool")
        return self._by_index[index]

    def start_journal(self) -> Journal:
        """Record every map / share / unmap / copy-on-write from now on, for replay on a twin pool."""
        with self.lock:
            if self.journal is None:
                self.journal = Journal(self.lock)
            return self.journal

    # -- lifetime ---------------------------------------------------------------------
    def close(self, force: bool = False) -> None:
        """Release all physical pages (see the class docstring for open tensors)."""
        with self.lock:
            if self.closed:
                return
            if self._tensors and not force:
                mapped = sum(t.num_mapped for t in self._tensors.values())
                raise AllocatorError(f"pool.close: {len(self._tensors)} VirtualTensor(s) still open, mapping "
                                     f"{mapped} page(s); close them first or call close(force=True)")
            for t in list(self._tensors.values()):
                t.close()
            if self.num_free != self.num_pages:
                raise AllocatorError(f"internal: {self.num_used} page(s) still used after closing all tensors")
            if self._scratch is not None:
                self.backend.free_reservation(self._scratch, self._scratch_pages * self.page_size)
                self._scratch, self._scratch_pages = None, 0
            self.backend.release_physical(self.phys)
            self.closed = True

    def __enter__(self) -> "PagePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close(force=True)

    def __repr__(self) -> str:
        return (f"PagePool({self.backend.name}, pages={self.num_pages}, free={self.num_free}, "
                f"shared={self.num_shared}, page_size={self.page_size})")

"""Counters reported by a PagePool or a VirtualTensor."""

from dataclasses import dataclass


@dataclass
class AllocatorStats:
    """A snapshot of allocator state.

    Page counts are pool-wide. Byte and call counters cover the whole pool in `PagePool.stats()`
    and one tensor in `VirtualTensor.stats`. `map_calls` / `unmap_calls` count backend calls (one
    call may map a run of pages); `pages_mapped` / `pages_unmapped` count pages.
    """

    reserved_bytes: int = 0
    mapped_bytes: int = 0
    pages_total: int = 0
    pages_free: int = 0
    pages_used: int = 0
    pages_shared: int = 0
    map_calls: int = 0
    unmap_calls: int = 0
    map_seconds: float = 0.0
    unmap_seconds: float = 0.0
    pages_mapped: int = 0
    pages_unmapped: int = 0
    cow_copies: int = 0


@dataclass
class Counters:
    """Mutable call counters shared by the pool and each tensor."""

    map_calls: int = 0
    unmap_calls: int = 0
    map_seconds: float = 0.0
    unmap_seconds: float = 0.0
    pages_mapped: int = 0
    pages_unmapped: int = 0
    cow_copies: int = 0

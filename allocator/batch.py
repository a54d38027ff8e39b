"""map_many / unmap_many / copy_on_write_many: the same virtual pages in many tensors at once (e.g. K and V of
every layer)."""

from collections.abc import Sequence

from .errors import MappingError
from .virtual_tensor import VirtualTensor, copy_on_write_pages


def _check_tensors(what: str, tensors: Sequence[VirtualTensor]):
    tensors = list(tensors)
    if not tensors:
        raise MappingError(f"{what}: tensors is empty")
    for i, t in enumerate(tensors):
        if not isinstance(t, VirtualTensor):
            raise MappingError(f"{what}: tensors[{i}] is a {type(t).__name__}, not a VirtualTensor")
    pool = tensors[0].pool
    for i, t in enumerate(tensors):
        if t.pool is not pool:
            raise MappingError(f"{what}: tensors[{i}] belongs to a different PagePool than tensors[0]")
    if len({id(t) for t in tensors}) != len(tensors):
        raise MappingError(f"{what}: the same VirtualTensor appears more than once in tensors")
    return tensors, pool


def map_many(tensors: Sequence[VirtualTensor], first: int, count: int = 1) -> list[list[int]]:
    """Map fresh pages at virtual pages [first, first+count) of every tensor; returns the page ids
    per tensor. All or nothing: on PoolExhaustedError or a backend failure nothing stays mapped."""
    tensors, pool = _check_tensors("map_many", tensors)
    with pool.lock:
        for i, t in enumerate(tensors):
            t.check_can_map(f"map_many (tensors[{i}])", first, count)
        ids = pool.take(count * len(tensors))
        per_tensor = [ids[i * count:(i + 1) * count] for i in range(len(tensors))]
        done = 0
        try:
            for t, tids in zip(tensors, per_tensor):
                t._map_ids(first, tids)
                done += 1
        except BaseException:
            for t in tensors[:done]:
                t._unmap_range(first, count)
            for tids in per_tensor[done:]:
                for pid in tids:
                    pool.decref(pid)
            raise
        if pool.journal is not None:
            pool.journal.record("map", tuple(t.index for t in tensors), first, count, per_tensor)
        return per_tensor


def unmap_many(tensors: Sequence[VirtualTensor], first: int, count: int = 1) -> None:
    """Unmap virtual pages [first, first+count) of every tensor. Checks all tensors before
    unmapping anything."""
    tensors, pool = _check_tensors("unmap_many", tensors)
    with pool.lock:
        for i, t in enumerate(tensors):
            t.check_can_unmap(f"unmap_many (tensors[{i}])", first, count)
        for t in tensors:
            t._unmap_range(first, count)
        if pool.journal is not None:
            pool.journal.record("unmap", tuple(t.index for t in tensors), first, count)


def copy_on_write_many(tensors: Sequence[VirtualTensor], vpages: Sequence[int]) -> int:
    """Make virtual pages `vpages` of every tensor private: each one whose physical page is shared gets a copy.
    Returns the number of pages copied. One device synchronization for the whole batch (not one per page), so
    call it once per step with every page about to be written. Checks every (tensor, page) before copying;
    PoolExhaustedError, with nothing changed, if the pool has too few free pages for all the copies."""
    tensors, pool = _check_tensors("copy_on_write_many", tensors)
    vpages = list(vpages)
    if len(set(vpages)) != len(vpages):
        raise MappingError(f"copy_on_write_many: vpages {vpages} name a page more than once")
    with pool.lock:
        for i, t in enumerate(tensors):
            for v in vpages:
                t.check_can_unmap(f"copy_on_write_many (tensors[{i}])", v, 1)
        return copy_on_write_pages(pool, [(t, v) for v in vpages for t in tensors])

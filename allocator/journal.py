"""Journal: a pool's page operations recorded in order, to be replayed on a twin pool.

A twin is a PagePool with the same page count whose VirtualTensors were opened in the same order (tensor `index`
0, 1, ...), possibly with other shapes or contents (another shard of the same data, on another device). Replaying
a journal makes the twin map the same physical page ids at the same virtual pages, share them the same way and
make the same copy-on-write copies (each twin copies its own contents). Free pages are handed out lowest id
first, so a twin that has replayed every entry so far takes exactly the ids the journal names; replay checks
that and raises JournalMismatchError instead of diverging silently.

    journal = pool.start_journal()   # on the leader: every map / unmap / share / copy-on-write is recorded
    entries = journal.drain()        # e.g. once per step, shipped to the followers
    replay(twin_pool, entries)       # on each follower, before it touches the memory

Entries are plain tuples of ints (picklable, small). A caller may add entries of its own with `journal.note(...)`
(under the pool's lock, so they keep their place among the page operations): replay hands those, in order, to
its `on_note` callback.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import AllocatorError, PoolExhaustedError


class JournalMismatchError(AllocatorError):
    """A replay does not reproduce the journal (different page ids, a pool too small, a missing tensor)."""


class Journal:
    """An append-only list of a pool's page operations. Appended to under the pool's lock (any thread)."""

    def __init__(self, lock):
        self._lock = lock
        self._entries: list[tuple] = []

    def record(self, *entry) -> None:
        self._entries.append(entry)

    def note(self, payload) -> None:
        """A caller's own entry, kept in order with the page operations; replay passes it to `on_note`."""
        with self._lock:
            self._entries.append(("note", payload))

    def drain(self) -> list[tuple]:
        """The entries recorded since the last drain, oldest first."""
        with self._lock:
            entries, self._entries = self._entries, []
        return entries

    def __len__(self) -> int:
        return len(self._entries)


def replay(pool, entries: list[tuple], on_note: Callable[[object], None] | None = None) -> None:
    """Apply `entries` (from a Journal of a twin pool) to `pool`; JournalMismatchError on any divergence."""
    from .batch import map_many, unmap_many
    from .virtual_tensor import copy_on_write_pages

    with pool.lock:
        for k, entry in enumerate(entries):
            op, args = entry[0], entry[1:]
            try:
                if op == "map":  # (tensor indices, first, count, ids per tensor)
                    idx, first, count, ids = args
                    got = map_many([pool.tensor_at(i) for i in idx], first, count)
                    if got != ids:
                        raise JournalMismatchError(f"the journal mapped pages {ids}, this pool gave {got}")
                elif op == "share":  # (tensor index, vpage, page id)
                    i, vpage, pid = args
                    pool.tensor_at(i).map_shared(vpage, pid)
                elif op == "unmap":  # (tensor indices, first, count)
                    idx, first, count = args
                    unmap_many([pool.tensor_at(i) for i in idx], first, count)
                elif op == "cow":  # ([(tensor index, vpage)], [new page id per copied item])
                    items, new_ids = args
                    tensors = [(pool.tensor_at(i), v) for i, v in items]
                    copy_on_write_pages(pool, tensors)
                    got = [t.page_at(v) for t, v in tensors]
                    if got != new_ids:
                        raise JournalMismatchError(f"the journal's copy-on-write left pages {new_ids}, "
                                                   f"this pool's left {got}")
                elif op == "note":
                    if on_note is None:
                        raise JournalMismatchError(f"a note entry {args[0]!r} but no on_note handler")
                    on_note(args[0])
                else:
                    raise JournalMismatchError(f"unknown journal entry {op!r}")
            except PoolExhaustedError as exc:
                raise JournalMismatchError(f"journal entry {k} ({op}) does not fit this pool of "
                                           f"{pool.num_pages} pages: {exc}") from exc
            except JournalMismatchError as exc:
                raise JournalMismatchError(f"journal entry {k} ({op}{args!r}): {exc}") from None
            except AllocatorError as exc:
                raise JournalMismatchError(f"journal entry {k} ({op}{args!r}) failed on this pool: {exc}") from exc

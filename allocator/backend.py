"""The interface every memory backend implements (host mmap, CUDA driver VMM).

A backend knows three things: physical pages (created up front, addressed by page id),
virtual address reservations, and how to map the former into the latter. Bookkeeping
(refcounts, which page sits where) lives in PagePool / VirtualTensor, not here.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from .errors import AllocatorError


def contiguous_runs(page_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split page ids into runs of consecutive ids: [(index_in_list, first_id, length)]."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(page_ids) + 1):
        if i == len(page_ids) or page_ids[i] != page_ids[i - 1] + 1:
            runs.append((start, page_ids[start], i - start))
            start = i
    return runs


class Backend(ABC):
    """Physical pages + address reservations + mapping, for one device."""

    name: str = "abstract"

    def __init__(self, page_size: int, device: torch.device):
        self.page_size = page_size
        self.device = device
        self.closed = False
        self._live_physical = 0
        self._live_reservations = 0

    # -- physical pages ---------------------------------------------------------------
    @abstractmethod
    def create_physical(self, num_pages: int) -> object:
        """Create `num_pages` physical pages up front; returns an opaque handle."""

    @abstractmethod
    def release_physical(self, phys: object) -> None:
        """Release physical pages created by `create_physical` (none may still be mapped)."""

    # -- address space ----------------------------------------------------------------
    @abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserve `nbytes` (a multiple of page_size) of address space; returns its address."""

    @abstractmethod
    def free_reservation(self, addr: int, nbytes: int) -> None:
        """Give a reservation back (anything mapped in it is unmapped)."""

    # -- mapping ----------------------------------------------------------------------
    @abstractmethod
    def map(self, addr: int, phys: object, page_ids: Sequence[int]) -> None:
        """Map page_ids[i] at addr + i * page_size. All-or-nothing: undoes itself on failure."""

    @abstractmethod
    def unmap(self, addr: int, num_pages: int) -> None:
        """Unmap `num_pages` mapped pages starting at addr; the reservation stays."""

    def remap(self, addr: int, phys: object, page_ids: Sequence[int]) -> None:
        """Replace what is mapped at addr with page_ids (unmap, then map)."""
        self.unmap(addr, len(page_ids))
        self.map(addr, phys, page_ids)

    @abstractmethod
    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Copy bytes between two mapped addresses; complete when it returns."""

    def copy_many(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """Several copies `(dst, src, nbytes)`, all complete when it returns (CUDA: one synchronization for the
        batch, not one per copy)."""
        for dst, src, nbytes in copies:
            self.copy(dst, src, nbytes)

    def synchronize(self) -> None:
        """Wait until no queued work on the device can still touch its memory (host: nothing to wait for)."""
        return None

    @abstractmethod
    def tensor(self, addr: int, shape: tuple[int, ...], dtype: torch.dtype, owner: object = None) -> torch.Tensor:
        """A torch tensor of this shape/dtype whose storage is the memory at addr (no copy). The tensor and
        every view of it keep `owner` alive (the VirtualTensor the range belongs to)."""

    def make_current(self) -> None:
        """Prepare the calling thread to use this backend (CUDA: set the primary context)."""
        return None

    # -- lifetime ---------------------------------------------------------------------
    def check_open(self, what: str) -> None:
        if self.closed:
            raise AllocatorError(f"{what}: the {self.name} backend is closed")

    def close(self) -> None:
        """Close the backend. Raises AllocatorError if pools or reservations still use it."""
        if self.closed:
            return
        if self._live_physical or self._live_reservations:
            raise AllocatorError(
                f"backend.close: {self._live_physical} page pool(s) and {self._live_reservations} "
                f"reservation(s) still use this {self.name} backend; close them first"
            )
        self._close()
        self.closed = True

    def _close(self) -> None:
        """Backend-specific teardown."""
        return None

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(page_size={self.page_size}, device={self.device})"

"""Host backend: the same virtual-memory model on Linux mmap, so everything runs without a GPU.

- reservation: mmap(PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE) costs address space only;
- physical pages: page-sized slices of one memfd file (the kernel backs a slice on first touch;
  `populate=True` commits them all up front with posix_fallocate);
- map: mmap(MAP_FIXED|MAP_SHARED, memfd, page_id * page_size), one call per run of consecutive ids;
- unmap: map the PROT_NONE reservation back over the range, so the range stays reserved.

Mapping one page at two addresses is real sharing. Touching an unmapped page raises SIGSEGV.
Faulted-in memfd pages are counted as RssShmem in /proc/<pid>/status.
"""

import ctypes
import mmap as _pymmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import libc
from .backend import Backend, contiguous_runs
from .errors import AllocatorError

OS_PAGE = _pymmap.PAGESIZE
DEFAULT_PAGE_SIZE = 64 * 1024
_RESERVE_FLAGS = libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE


@dataclass
class HostPhysical:
    """Physical pages of the host backend: one memfd, page i at offset i * page_size."""

    fd: int
    num_pages: int


class HostBackend(Backend):
    """Virtual memory on the host (CPU) through mmap + memfd."""

    name = "host"

    def __init__(self, page_size: int | None = None, populate: bool = False):
        page_size = DEFAULT_PAGE_SIZE if page_size is None else page_size
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size <= 0:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if page_size % OS_PAGE:
            raise ValueError(f"page_size={page_size} must be a multiple of the OS page size ({OS_PAGE})")
        if not hasattr(os, "memfd_create"):
            raise AllocatorError("host backend needs Linux (os.memfd_create is missing)")
        super().__init__(page_size, torch.device("cpu"))
        self.populate = populate

    def create_physical(self, num_pages: int) -> HostPhysical:
        self.check_open("create_physical")
        fd = os.memfd_create("vattn-pages", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, num_pages * self.page_size)
            if self.populate:
                os.posix_fallocate(fd, 0, num_pages * self.page_size)
        except OSError as e:
            os.close(fd)
            raise AllocatorError(f"creating {num_pages} host pages of {self.page_size} bytes failed: {e}") from e
        self._live_physical += 1
        return HostPhysical(fd, num_pages)

    def release_physical(self, phys: HostPhysical) -> None:
        os.close(phys.fd)
        self._live_physical -= 1

    def reserve(self, nbytes: int) -> int:
        self.check_open("reserve")
        addr = libc.mmap(None, nbytes, libc.PROT_NONE, _RESERVE_FLAGS)
        self._live_reservations += 1
        return addr

    def free_reservation(self, addr: int, nbytes: int) -> None:
        libc.munmap(addr, nbytes)
        self._live_reservations -= 1

    def map(self, addr: int, phys: HostPhysical, page_ids: Sequence[int]) -> None:
        ps = self.page_size
        prot = libc.PROT_READ | libc.PROT_WRITE
        try:
            for index, first_id, length in contiguous_runs(page_ids):
                libc.mmap(addr + index * ps, length * ps, prot, libc.MAP_SHARED | libc.MAP_FIXED,
                          phys.fd, first_id * ps)
        except BaseException:
            self.unmap(addr, len(page_ids))  # put the reservation back over whatever we mapped
            raise

    def remap(self, addr: int, phys: HostPhysical, page_ids: Sequence[int]) -> None:
        self.map(addr, phys, page_ids)  # MAP_FIXED replaces the old mapping atomically

    def unmap(self, addr: int, num_pages: int) -> None:
        libc.mmap(addr, num_pages * self.page_size, libc.PROT_NONE, _RESERVE_FLAGS | libc.MAP_FIXED)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def tensor(self, addr: int, shape: tuple[int, ...], dtype: torch.dtype, owner: object = None) -> torch.Tensor:
        nbytes = _nbytes(shape, dtype)
        buf = (ctypes.c_uint8 * nbytes).from_address(addr)
        buf.owner = owner  # torch.frombuffer keeps buf alive as long as any view of the tensor
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n

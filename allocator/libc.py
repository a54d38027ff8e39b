"""Thin ctypes wrappers over libc mmap/munmap that check every return value.

ctypes.CDLL calls release the GIL, so another Python thread keeps running while we map.
Flag values are Linux's (x86-64 and arm64 share them).
"""

import ctypes
import os

from .errors import AllocatorError

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

MAP_FAILED = ctypes.c_void_p(-1).value


class LibcError(AllocatorError, OSError):
    """A libc call failed; errno and the call with its arguments are in the message."""


def _fail(call: str) -> LibcError:
    err = ctypes.get_errno()
    hint = ""
    if err == 12:  # ENOMEM
        hint = " (out of address space, or too many mappings: see /proc/sys/vm/max_map_count)"
    return LibcError(err, f"{call} failed: {os.strerror(err)}{hint}")


def mmap(addr: int | None, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2); returns the address. With MAP_FIXED, checks the kernel used `addr`."""
    res = _mmap(addr, length, prot, flags, fd, offset)
    call = f"mmap(addr={addr and hex(addr)}, length={length}, prot={prot:#x}, flags={flags:#x}, fd={fd}, offset={offset})"
    if res is None or res == MAP_FAILED:
        raise _fail(call)
    if flags & MAP_FIXED and res != addr:
        raise LibcError(0, f"{call} returned {res:#x}, not the fixed address")
    return res


def munmap(addr: int, length: int) -> None:
    """munmap(2)."""
    if _munmap(addr, length) != 0:
        raise _fail(f"munmap(addr={addr:#x}, length={length})")

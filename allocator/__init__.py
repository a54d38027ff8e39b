"""Engine-agnostic virtual memory: reserve address ranges, create physical pages up front, and map,
share, copy-on-write and unmap them on demand. Backends: "host" (mmap + memfd) and "cuda" (driver VMM).

    backend = open_backend("host", page_size=64 * 1024)
    pool = PagePool(backend, budget_bytes=64 << 20)
    vt = VirtualTensor(pool, shape=(8, 4096, 8, 128), dtype=torch.float16)
    vt.map(0, 4)          # back the first four pages; vt.tensor[...] is usable there
"""

from .backend import Backend
from .batch import copy_on_write_many, map_many, unmap_many
from .errors import AllocatorError, MappingError, PoolExhaustedError
from .factory import open_backend
from .journal import Journal, JournalMismatchError, replay
from .pool import PagePool
from .stats import AllocatorStats
from .virtual_tensor import VirtualTensor

__all__ = [
    "AllocatorError",
    "AllocatorStats",
    "Backend",
    "Journal",
    "JournalMismatchError",
    "MappingError",
    "PagePool",
    "PoolExhaustedError",
    "VirtualTensor",
    "copy_on_write_many",
    "map_many",
    "open_backend",
    "replay",
    "unmap_many",
]

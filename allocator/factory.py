"""open_backend: pick and open a memory backend by name."""

import torch

from .backend import Backend

BACKENDS = ("host", "cuda", "auto")


def open_backend(kind: str = "auto", page_size: int | None = None, **options) -> Backend:
    """Open a backend: "host" (mmap + memfd), "cuda" (driver VMM) or "auto" (cuda if available).

    page_size None means the backend default: 64 KiB on host, the driver granularity (2 MiB) on cuda.
    Extra options go to the backend (host: populate=bool; cuda: device=int).
    """
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "host"
    if kind == "host":
        from .host import HostBackend

        return HostBackend(page_size, **options)
    if kind == "cuda":
        from .cuda import CudaBackend

        return CudaBackend(page_size, **options)
    raise ValueError(f"kind must be one of {BACKENDS}, got {kind!r}")

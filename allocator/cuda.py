"""CUDA backend: driver virtual memory management through cuda-python.

Physical pages are cuMemCreate allocations of page_size bytes each (pinned device memory on
one device), all created up front. A reservation is cuMemAddressReserve; mapping is cuMemMap
per page plus one cuMemSetAccess over each contiguous range; unmapping is cuMemUnmap per page.
All calls run in the device's primary context (the one torch uses); every entry point makes it
current in the calling thread, and `make_current()` does so explicitly for a background thread.

`cuda.bindings` is imported only when this backend is opened.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backend import Backend
from .errors import AllocatorError


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - cuda-python is a dependency
        raise AllocatorError(f"cuda backend needs cuda-python (from cuda.bindings import driver): {e}") from e
    return driver


def check(driver, call: str, result: tuple):
    """Raise AllocatorError unless result[0] is CUDA_SUCCESS; return the remaining items."""
    err = result[0]
    if err != driver.CUresult.CUDA_SUCCESS:
        name = getattr(err, "name", str(err))
        raise AllocatorError(f"{call} failed: {name} ({int(err)})")
    rest = result[1:]
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


@dataclass
class CudaPhysical:
    """Physical pages of the CUDA backend: one cuMemCreate handle per page."""

    handles: list
    num_pages: int


class _DeviceArray:
    """Exposes a device range through __cuda_array_interface__ so torch can wrap it."""

    def __init__(self, addr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "strides": None, "version": 3,
        }


class CudaBackend(Backend):
    """Virtual memory on an NVIDIA GPU through the CUDA driver VMM API."""

    name = "cuda"

    def __init__(self, page_size: int | None = None, device: int | None = None):
        drv = _driver()
        self._drv = drv
        try:
            init = drv.cuInit(0)
        except Exception as e:  # the bindings raise when libcuda itself cannot be loaded
            raise AllocatorError(f"cuInit failed: no usable CUDA driver ({e})") from e
        check(drv, "cuInit", init)
        if device is None:
            device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        self.ordinal = int(device)
        self._dev = check(drv, f"cuDeviceGet({self.ordinal})", drv.cuDeviceGet(self.ordinal))
        self._ctx = check(drv, "cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain(self._dev))
        self.make_current()

        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.ordinal
        self._prop = prop
        access = drv.CUmemAccessDesc()
        access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.ordinal
        access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        self.granularity = int(check(drv, "cuMemGetAllocationGranularity", drv.cuMemGetAllocationGranularity(
            prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)))

        page_size = self.granularity if page_size is None else page_size
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size <= 0:
            self._release_ctx()
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if page_size % self.granularity:
            self._release_ctx()
            raise ValueError(f"page_size={page_size} must be a multiple of the driver granularity "
                             f"({self.granularity} bytes) on cuda:{self.ordinal}")
        super().__init__(page_size, torch.device("cuda", self.ordinal))

    def make_current(self) -> None:
        """Make the device's primary context current in the calling thread."""
        check(self._drv, "cuCtxSetCurrent", self._drv.cuCtxSetCurrent(self._ctx))

    def create_physical(self, num_pages: int) -> CudaPhysical:
        self.check_open("create_physical")
        self.make_current()
        drv = self._drv
        handles = []
        try:
            for i in range(num_pages):
                handles.append(check(drv, f"cuMemCreate(page {i} of {num_pages}, {self.page_size} bytes)",
                                     drv.cuMemCreate(self.page_size, self._prop, 0)))
        except BaseException:
            for h in handles:
                drv.cuMemRelease(h)
            raise
        self._live_physical += 1
        return CudaPhysical(handles, num_pages)

    def release_physical(self, phys: CudaPhysical) -> None:
        self.make_current()
        errors = [r[0] for h in phys.handles if (r := self._drv.cuMemRelease(h))[0] != self._drv.CUresult.CUDA_SUCCESS]
        phys.handles = []
        self._live_physical -= 1
        if errors:
            raise AllocatorError(f"cuMemRelease failed for {len(errors)} page(s): {errors[0]}")

    def reserve(self, nbytes: int) -> int:
        self.check_open("reserve")
        self.make_current()
        ptr = check(self._drv, f"cuMemAddressReserve({nbytes})",
                    self._drv.cuMemAddressReserve(nbytes, self.page_size, 0, 0))
        self._live_reservations += 1
        return int(ptr)

    def free_reservation(self, addr: int, nbytes: int) -> None:
        self.make_current()
        check(self._drv, f"cuMemAddressFree({addr:#x}, {nbytes})", self._drv.cuMemAddressFree(addr, nbytes))
        self._live_reservations -= 1

    def map(self, addr: int, phys: CudaPhysical, page_ids: Sequence[int]) -> None:
        self.make_current()
        drv, ps = self._drv, self.page_size
        done = 0
        try:
            for i, pid in enumerate(page_ids):
                check(drv, f"cuMemMap({addr + i * ps:#x}, page {pid})",
                      drv.cuMemMap(addr + i * ps, ps, 0, phys.handles[pid], 0))
                done += 1
            check(drv, f"cuMemSetAccess({addr:#x}, {len(page_ids) * ps})",
                  drv.cuMemSetAccess(addr, len(page_ids) * ps, self._access, 1))
        except BaseException:
            for i in range(done):
                drv.cuMemUnmap(addr + i * ps, ps)
            raise

    def unmap(self, addr: int, num_pages: int) -> None:
        self.make_current()
        ps = self.page_size
        for i in range(num_pages):
            check(self._drv, f"cuMemUnmap({addr + i * ps:#x})", self._drv.cuMemUnmap(addr + i * ps, ps))

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device-to-device copy; synchronizes the context before and after (copy-on-write is rare)."""
        self.make_current()
        drv = self._drv
        check(drv, "cuCtxSynchronize", drv.cuCtxSynchronize())
        check(drv, f"cuMemcpyDtoD({dst:#x}, {src:#x}, {nbytes})", drv.cuMemcpyDtoD(dst, src, nbytes))
        check(drv, "cuCtxSynchronize", drv.cuCtxSynchronize())

    def tensor(self, addr: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            nbytes *= d
        raw = torch.as_tensor(_DeviceArray(addr, nbytes), device=self.device)
        return raw.view(dtype).view(shape)

    def _release_ctx(self) -> None:
        self._drv.cuDevicePrimaryCtxRelease(self._dev)

    def _close(self) -> None:
        self._release_ctx()

"""CUDA backend: driver virtual memory management through cuda-python.

Physical pages are cuMemCreate allocations of page_size bytes each (pinned device memory on
one device), all created up front. A reservation is cuMemAddressReserve; mapping is cuMemMap
per page plus one cuMemSetAccess over each contiguous range; unmapping is cuMemUnmap per page.
All calls run in the device's primary context (the one torch uses); every entry point makes it
current in the calling thread, and `make_current()` does so explicitly for a background thread.

cuda-python (`cuda.bindings`) must have the CUDA major version of the torch build in use (torch
2.11+cu130 -> cuda-bindings 13.x; a cu12x build -> 12.x), and the driver must be at least that
major version: `check_cuda_versions` enforces both when the backend opens.
`cuda.bindings` is imported only when this backend is opened.
"""

import importlib.metadata
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


# -- pure decisions (tested on CPU) ------------------------------------------------------------
def _major(version: str, what: str) -> int:
    try:
        return int(str(version).strip().split(".")[0])
    except ValueError:
        raise AllocatorError(f"cannot read the major version of {what} from {version!r}") from None


def check_cuda_versions(torch_cuda: str | None, bindings: str, driver: int | None = None) -> None:
    """Fail clearly unless cuda-python's major version is torch's CUDA major version and the driver can run it.

    torch_cuda: `torch.version.cuda` ("13.0"; None for a CPU-only build); bindings: the installed cuda-bindings
    (or cuda-python) version ("13.4.4"); driver: `cuDriverGetVersion()` (13000 for CUDA 13.0), None if unknown.
    Mismatched bindings load but fail in places (13.x bindings on a CUDA 12 driver), so refuse them up front.
    """
    if torch_cuda is None:
        raise AllocatorError("cuda backend: this torch build has no CUDA (torch.version.cuda is None); "
                             "install a CUDA build of torch or use the host backend")
    want = _major(torch_cuda, "torch.version.cuda")
    have = _major(bindings, "cuda-bindings")
    if have != want:
        raise AllocatorError(
            f"cuda backend: cuda-bindings {bindings} does not match this torch build's CUDA {torch_cuda}; "
            f"install the bindings of the same major version: pip install 'cuda-bindings=={want}.*'")
    if driver is not None and driver // 1000 < have:
        raise AllocatorError(
            f"cuda backend: the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, older than "
            f"cuda-bindings {bindings} (CUDA {have}) and torch's CUDA {torch_cuda}: upgrade the driver, or use a "
            f"torch build and cuda-bindings for CUDA {driver // 1000}")


def bindings_version() -> str:
    """The installed cuda-bindings version (cuda-python before 12.6 shipped the bindings under its own name)."""
    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise AllocatorError("cuda backend needs cuda-python: neither cuda-bindings nor cuda-python is installed")


def check_page_size(page_size, granularity: int, ordinal: int = 0) -> int:
    """A valid page size for a device whose allocation granularity is `granularity`: a positive int multiple of
    it (the driver maps nothing smaller). Returns page_size."""
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size <= 0:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    if page_size % granularity:
        raise ValueError(f"page_size={page_size} must be a multiple of the driver granularity "
                         f"({granularity} bytes) on cuda:{ordinal}")
    return page_size


def reserve_alignment(page_size: int, granularity: int) -> int:
    """Alignment for cuMemAddressReserve: a power of two (the driver refuses anything else), the largest one that
    divides page_size, so every page starts on a boundary at least as coarse as the granularity."""
    if granularity <= 0 or granularity & (granularity - 1):
        raise AllocatorError(f"the driver reported an allocation granularity of {granularity}, not a power of two")
    return page_size & -page_size


def device_ordinal(device, current: int = 0) -> int:
    """The CUDA ordinal of `device` (int, "cuda:1", torch.device or None for `current`)."""
    if device is None:
        return current
    if isinstance(device, bool):
        raise ValueError(f"device must be a CUDA device, got {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device must be a CUDA ordinal >= 0, got {device}")
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a CUDA device, got {device!r}") from None
    if dev.type != "cuda":
        raise ValueError(f"the cuda backend needs a CUDA device, got {dev}")
    return current if dev.index is None else dev.index


@dataclass
class CudaPhysical:
    """Physical pages of the CUDA backend: one cuMemCreate handle per page."""

    handles: list
    num_pages: int


class _DeviceArray:
    """Exposes a device range through __cuda_array_interface__ so torch can wrap it. torch keeps this object
    alive as long as any view of the tensor, and this object keeps `owner` (the VirtualTensor) alive."""

    def __init__(self, addr: int, nbytes: int, owner: object = None):
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "strides": None, "version": 3,
        }


class CudaBackend(Backend):
    """Virtual memory on an NVIDIA GPU through the CUDA driver VMM API.

    device: an ordinal, "cuda:N" or torch.device (None: torch's current device). Pages are created on that
    device and every call runs in its primary context.
    """

    name = "cuda"

    def __init__(self, page_size: int | None = None, device=None):
        drv = _driver()
        self._drv = drv
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
        self.ordinal = device_ordinal(device, current)
        try:
            init = drv.cuInit(0)
            err, driver_version = drv.cuDriverGetVersion()
        except Exception as e:  # the bindings raise when libcuda itself cannot be loaded
            raise AllocatorError(f"cuInit failed: no usable CUDA driver ({e})") from e
        ok = err == drv.CUresult.CUDA_SUCCESS
        check_cuda_versions(torch.version.cuda, bindings_version(), int(driver_version) if ok else None)
        check(drv, "cuInit", init)
        count = check(drv, "cuDeviceGetCount", drv.cuDeviceGetCount())
        if self.ordinal >= count:
            raise ValueError(f"device cuda:{self.ordinal} does not exist ({count} CUDA device(s) visible)")
        self._dev = check(drv, f"cuDeviceGet({self.ordinal})", drv.cuDeviceGet(self.ordinal))
        self._ctx = check(drv, "cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain(self._dev))
        try:  # from here on a failure must give the retained context back
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
            page_size = check_page_size(self.granularity if page_size is None else page_size, self.granularity,
                                        self.ordinal)
            self.alignment = reserve_alignment(page_size, self.granularity)
        except BaseException:
            self._release_ctx()
            raise
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
        ptr = check(self._drv, f"cuMemAddressReserve({nbytes}, alignment={self.alignment})",
                    self._drv.cuMemAddressReserve(nbytes, self.alignment, 0, 0))
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
        self.copy_many([(dst, src, nbytes)])

    def copy_many(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """Device-to-device copies, complete on return: one context-wide synchronize before (kernels still
        using the sources finish), the copies queued on the default stream, one synchronize after."""
        if not copies:
            return
        self.make_current()
        drv, stream = self._drv, self._drv.CUstream(0)
        check(drv, "cuCtxSynchronize", drv.cuCtxSynchronize())
        for dst, src, nbytes in copies:
            check(drv, f"cuMemcpyDtoDAsync({dst:#x}, {src:#x}, {nbytes})",
                  drv.cuMemcpyDtoDAsync(dst, src, nbytes, stream))
        check(drv, "cuCtxSynchronize", drv.cuCtxSynchronize())

    def synchronize(self) -> None:
        self.make_current()
        check(self._drv, "cuCtxSynchronize", self._drv.cuCtxSynchronize())

    def tensor(self, addr: int, shape: tuple[int, ...], dtype: torch.dtype, owner: object = None) -> torch.Tensor:
        nbytes = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            nbytes *= d
        try:  # an explicit device index: torch builds the tensor without looking the (unmapped) pointer up
            raw = torch.as_tensor(_DeviceArray(addr, nbytes, owner), device=self.device)
        except RuntimeError as e:
            raise AllocatorError(
                f"torch {torch.__version__} cannot build a CUDA tensor over an unmapped reservation at {addr:#x} "
                f"({e}); the cuda backend needs a torch whose __cuda_array_interface__ import honours an explicit "
                "device index (torch >= 2.11, see pyproject.toml)") from e
        return raw.view(dtype).view(shape)

    def _release_ctx(self) -> None:
        self._drv.cuDevicePrimaryCtxRelease(self._dev)

    def _close(self) -> None:
        self._release_ctx()

"""Subprocess probes for allocator tests that measure the whole process or may crash it.

Run as `python -m tests.allocator_probe MODE [ARGS]`; prints one JSON line (or dies by a signal).
"""

import gc
import json
import os
import sys

import torch

from allocator import PagePool, VirtualTensor, open_backend

KIB = 1024


def status_kib() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile / RssShmem of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    return out


def rss(touch_pages: int) -> dict:
    """Reserve 64 GiB, then map and touch `touch_pages` 64 KiB pages; report RSS at each stage."""
    page = 64 * KIB
    backend = open_backend("host", page_size=page)
    pool = PagePool(backend, 4 * touch_pages * page)
    with VirtualTensor(pool, shape=(page,), dtype=torch.uint8) as warm:  # first-use costs of torch/ctypes paths
        warm.map(0)
        warm.tensor.fill_(1)
        warm.unmap(0)
    before = status_kib()
    vt = VirtualTensor(pool, shape=(64, 1024, 1024, 1024), dtype=torch.uint8)  # 64 GiB
    reserved = status_kib()
    vt.map(0, touch_pages)
    mapped = status_kib()
    flat = vt.tensor.view(-1)
    flat[: touch_pages * page].fill_(1)  # writes every byte of every mapped page
    checksum = int(flat[: touch_pages * page : 4096].sum())
    touched = status_kib()
    vt.unmap(0, touch_pages)
    unmapped = status_kib()
    result = {"reserved_bytes": vt.reserved_bytes, "page": page, "checksum": checksum,
              "before": before, "reserved": reserved, "mapped": mapped, "touched": touched, "unmapped": unmapped}
    vt.close()
    pool.close()
    backend.close()
    return result


def segv(where: str) -> dict:
    """Touch memory the allocator does not back: should die with SIGSEGV before printing."""
    backend = open_backend("host", page_size=64 * KIB)
    pool = PagePool(backend, 1 << 20)
    vt = VirtualTensor(pool, shape=(4, 64 * KIB), dtype=torch.uint8)
    vt.map(0)
    vt.tensor[0].fill_(3)  # mapped: fine
    print(json.dumps({"mapped_ok": int(vt.tensor[0, 0])}), flush=True)
    if where == "never-mapped":
        vt.tensor[1].fill_(3)
    elif where == "after-unmap":
        vt.unmap(0)
        vt.tensor[0].fill_(3)
    return {"survived": where}


def counts() -> tuple[int, int]:
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return len(os.listdir("/proc/self/fd")), maps


def churn(rounds: int) -> dict:
    """Create, use and close backend + pool + tensors `rounds` times; report fds and mappings."""

    def once():
        backend = open_backend("host", page_size=64 * KIB)
        pool = PagePool(backend, 1 << 20)
        a = VirtualTensor(pool, shape=(8, 64 * KIB), dtype=torch.uint8)
        b = VirtualTensor(pool, shape=(8, 64 * KIB), dtype=torch.uint8)
        ids = a.map(0, 3)
        a.tensor[1].fill_(5)
        b.map_shared(2, ids[1])
        b.copy_on_write(2)
        a.close()
        b.close()
        pool.close()
        backend.close()

    once()  # warm up lazily created interpreter / torch state
    gc.collect()
    fds0, maps0 = counts()
    for _ in range(rounds):
        once()
    gc.collect()
    fds1, maps1 = counts()
    return {"fds_before": fds0, "fds_after": fds1, "maps_before": maps0, "maps_after": maps1}


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "rss":
        out = rss(int(argv[1]))
    elif mode == "segv":
        out = segv(argv[1])
    elif mode == "churn":
        out = churn(int(argv[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

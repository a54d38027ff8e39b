"""Map / unmap latency of the allocator backends.

    vattn bench allocator [--backend host|cuda|all] [--sizes 4K,64K,2M] [--pages N] [--json PATH]

For each backend and page size: map then unmap N pages one call per page ("single"), and N pages
in one call ("run": physically consecutive pages, so the host backend needs one mmap). Reports
microseconds per page (and per call for runs), measured around the public API, so bookkeeping
is included. Host only: first-touch cost per page (page faults into the memfd).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from allocator import AllocatorError, PagePool, VirtualTensor, open_backend
from vattn.bench import options
from vattn.bench.report import Report, command_line, size_label
from vattn.cli import parse_size


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench_one(kind: str, page_size: int, pages: int, repeats: int, touch_limit: int) -> dict:
    backend = open_backend(kind, page_size=page_size)
    pool = PagePool(backend, pages * page_size)
    vt = VirtualTensor(pool, shape=(pages, page_size), dtype=torch.uint8)
    single_map, single_unmap, run_map, run_unmap, touch = [], [], [], [], []
    try:
        vt.map(0, pages)  # warm up: first mappings of the memfd / handles
        vt.unmap(0, pages)
        for _ in range(repeats):
            for v in range(pages):
                t0 = time.perf_counter()
                vt.map(v)
                single_map.append(time.perf_counter() - t0)
            for v in range(pages):
                t0 = time.perf_counter()
                vt.unmap(v)
                single_unmap.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            vt.map(0, pages)
            run_map.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            vt.unmap(0, pages)
            run_unmap.append(time.perf_counter() - t0)
        if kind == "host":
            n = max(1, min(pages, touch_limit // page_size))
            vt.map(0, n)
            flat = vt.tensor.view(-1)
            t0 = time.perf_counter()
            flat[: n * page_size : 4096].fill_(1)  # one write per OS page: pure fault cost
            touch.append(time.perf_counter() - t0)
            vt.unmap(0, n)
            touch_pages = n
    finally:
        vt.close()
        pool.close()
        backend.close()
    us = 1e6
    row = {
        "backend": kind, "page_size": page_size, "pages": pages, "repeats": repeats,
        "map_us_per_page": statistics.mean(single_map) * us,
        "map_us_per_page_p50": pct(single_map, 0.5) * us,
        "map_us_per_page_p90": pct(single_map, 0.9) * us,
        "unmap_us_per_page": statistics.mean(single_unmap) * us,
        "unmap_us_per_page_p50": pct(single_unmap, 0.5) * us,
        "unmap_us_per_page_p90": pct(single_unmap, 0.9) * us,
        "run_map_us_per_call": statistics.mean(run_map) * us,
        "run_map_us_per_page": statistics.mean(run_map) * us / pages,
        "run_unmap_us_per_call": statistics.mean(run_unmap) * us,
        "run_unmap_us_per_page": statistics.mean(run_unmap) * us / pages,
    }
    if touch:
        row["first_touch_us_per_page"] = touch[0] * us / touch_pages
        row["first_touch_us_per_4k"] = touch[0] * us / (touch_pages * page_size // 4096)
    return row


COLUMNS = [("backend", "s"), ("page", "s"), ("pages", "d"), ("map_us_per_page", ".2f"), ("map_us_per_page_p50", ".2f"),
           ("map_us_per_page_p90", ".2f"), ("unmap_us_per_page", ".2f"), ("unmap_us_per_page_p90", ".2f"),
           ("run_map_us_per_page", ".2f"), ("run_unmap_us_per_page", ".2f"), ("first_touch_us_per_page", ".1f")]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[2:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="vattn bench allocator", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="all", choices=["host", "cuda", "all"])
    ap.add_argument("--sizes", default="4K,64K,2M", help="comma-separated page sizes (host); cuda rounds up")
    ap.add_argument("--pages", type=int, default=256, help="pages per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--touch-limit", default="256M", help="most bytes to fault in for the first-touch measurement")
    options.add_output_args(ap)
    args = ap.parse_args(argv)
    options.positive(args, "pages", "repeats")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    kinds = ["host", "cuda"] if args.backend == "all" else [args.backend]
    if "cuda" in kinds and not torch.cuda.is_available():
        if args.backend == "cuda":
            raise ValueError("--backend cuda: no CUDA GPU available")
        kinds.remove("cuda")
    device = "cuda" if "cuda" in kinds else "cpu"
    report = Report("allocator", device, command_line(["allocator", *argv]),
                    options.out_path(args, device, "allocator"), {"kernel": platform.release()})
    rows, skipped = [], []
    for kind in kinds:
        for size in sizes:
            try:
                row = bench_one(kind, size, args.pages, args.repeats, parse_size(args.touch_limit))
                rows.append({"page": size_label(size), **row})
            except (ValueError, AllocatorError) as e:  # e.g. 64K pages on a stock CUDA driver
                skipped.append(f"{kind} {size}: {e}")
    notes = ["all times in microseconds; map/unmap per page = one call per page; run = all pages in one call",
             *[f"skipped: {s}" for s in skipped]]
    return report.finish(rows, COLUMNS, notes, {"skipped": skipped})

"""Map / unmap latency of the allocator backends.

    python -m benchmarks.bench_allocator [--backend host|cuda|all] [--sizes 4K,64K,2M] [--pages N] [--out PATH]

For each backend and page size: map then unmap N pages one call per page ("single"), and N pages
in one call ("run": physically consecutive pages, so the host backend needs one mmap). Reports
microseconds per page (and per call for runs), measured around the public API, so bookkeeping
is included. Host only: first-touch cost per page (page faults into the memfd).
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from allocator import AllocatorError, PagePool, VirtualTensor, open_backend
from benchmarks.common import machine_label, parse_size


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


def format_table(rows: list[dict]) -> str:
    head = (f"{'backend':7} {'page':>6} {'pages':>5} | {'map/pg':>8} {'p50':>7} {'p90':>7} | {'unmap/pg':>8} {'p50':>7} "
            f"{'p90':>7} | {'run map/call':>12} {'/pg':>6} | {'run unmap/call':>14} {'/pg':>6} | {'touch/pg':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        size = r["page_size"]
        label = f"{size >> 20}M" if size >= 1 << 20 else f"{size >> 10}K"
        touch = f"{r['first_touch_us_per_page']:8.1f}" if "first_touch_us_per_page" in r else f"{'-':>8}"
        lines.append(
            f"{r['backend']:7} {label:>6} {r['pages']:>5} | {r['map_us_per_page']:8.2f} {r['map_us_per_page_p50']:7.2f} "
            f"{r['map_us_per_page_p90']:7.2f} | {r['unmap_us_per_page']:8.2f} {r['unmap_us_per_page_p50']:7.2f} "
            f"{r['unmap_us_per_page_p90']:7.2f} | {r['run_map_us_per_call']:12.1f} {r['run_map_us_per_page']:6.2f} | "
            f"{r['run_unmap_us_per_call']:14.1f} {r['run_unmap_us_per_page']:6.2f} | {touch}")
    lines.append("all times in microseconds; map/pg = one call per page; run = all pages in one call")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="all", choices=["host", "cuda", "all"])
    ap.add_argument("--sizes", default="4K,64K,2M", help="comma-separated page sizes (host); cuda rounds up")
    ap.add_argument("--pages", type=int, default=256, help="pages per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--touch-limit", default="256M", help="most bytes to fault in for the first-touch measurement")
    ap.add_argument("--out", default=None, help="JSON path (a .txt with the table is written beside it)")
    args = ap.parse_args(argv)
    if args.pages < 1:
        raise ValueError(f"--pages must be >= 1, got {args.pages}")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    kinds = ["host", "cuda"] if args.backend == "all" else [args.backend]
    if "cuda" in kinds and not torch.cuda.is_available():
        if args.backend == "cuda":
            raise SystemExit("--backend cuda: no CUDA GPU available")
        kinds.remove("cuda")

    rows, skipped = [], []
    for kind in kinds:
        for size in sizes:
            try:
                rows.append(bench_one(kind, size, args.pages, args.repeats, parse_size(args.touch_limit)))
            except (ValueError, AllocatorError) as e:  # e.g. 64K pages on a stock CUDA driver
                skipped.append(f"{kind} {size}: {e}")

    command = "python -m benchmarks.bench_allocator " + shlex.join(sys.argv[1:] if argv is None else argv)
    machine = "; ".join(f"{k}: {machine_label(k)}" for k in kinds)
    table = format_table(rows)
    header = f"machine: {machine}\ncommand: {command}\ntorch {torch.__version__}, python {platform.python_version()}"
    text = "\n".join([header, table] + [f"skipped: {s}" for s in skipped])
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "command": command, "torch": torch.__version__,
                       "python": platform.python_version(), "kernel": platform.release(),
                       "results": rows, "skipped": skipped}, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
